#!/usr/bin/env python3
"""A run as a SLURM job, as a script: the same as `lcr launch slurm ...`.

    python tools/launch_slurm.py examples/depo/qwen2.5-7b-dapo.yaml --out runs/qwen2.5-7b-dapo \
        --nodes 2 --gpus-per-node 8 --rollout-nodes 1 --partition gpu --time 48:00:00
    python tools/launch_slurm.py examples/tiny/depo.yaml --out runs/depo --gpus-per-node 0 --dry-run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lcr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["launch", "slurm", *sys.argv[1:]]))
