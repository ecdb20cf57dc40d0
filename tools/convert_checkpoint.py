#!/usr/bin/env python3
"""Checkpoint conversion as a script: the same as `lcr convert ...`.

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --ckpt DIR --out DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lcr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
