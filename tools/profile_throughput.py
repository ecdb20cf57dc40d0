#!/usr/bin/env python3
"""Throughput profile as a script: the same as `lcr profile ...`.

    python tools/profile_throughput.py examples/tiny/depo.yaml --steps 4 --out runs/profile_depo
    python tools/profile_throughput.py CONFIG --steps 10 --out DIR --launcher "torchrun --nproc_per_node=8" --trace-steps 5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lcr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
