#!/usr/bin/env python3
"""Block-expand a Hugging Face model (LLaMA Pro): same function, more layers, same tokenizer.

    python tools/expand_blocks.py examples/tiny/base --layers 8 --out runs/teacher_init

Inserted layers are copies whose output projections are zero (see megatron_lcr/models/expand.py),
so the new model's logits equal the original's until it is trained. Errors are one line, exit 1.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lcr.models.expand import expand_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers of the expanded model")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        config = expand_checkpoint(args.src, args.out, args.layers, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # ExpandError, HFCheckpointError, FileExistsError, ...
        print(f"expand_blocks: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {config['num_hidden_layers']} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
