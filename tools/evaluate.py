#!/usr/bin/env python3
"""Benchmark evaluation as a script: the same as `lcr eval ...`.

    python tools/evaluate.py --model DIR --data hotpotqa.jsonl data.json --out eval_out
    python tools/evaluate.py --model CKPT --data qa_1/validation.jsonl --engine sglang --out eval_out
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lcr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
