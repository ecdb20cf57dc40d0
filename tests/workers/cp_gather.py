"""torchrun worker for tests/parallel/test_context.py: zigzag-split full tensors, gather them back over gloo.

Usage: ``cp_gather.py INPUTS_PT OUT_DIR``. INPUTS_PT holds ``dense`` (a dict of name -> full tensor,
sequence dim 1), ``packed`` (name -> full packed ``[1, T]`` row) and ``cu_seqlens`` (the packed rows'
padded offsets). Each rank (the CP group is an explicit ``new_group`` of all ranks) takes its zigzag
part of every tensor, calls ``gather_from_cp`` / ``gather_from_cp_packed``, and writes
``OUT_DIR/rank{r}.pt``: the gathered tensors, and the error message of gathering a tensor that
requires grad.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(inputs_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_lcr.parallel.context import (
        gather_from_cp,
        gather_from_cp_packed,
        zigzag_split,
        zigzag_split_packed,
    )
    from megatron_lcr.parallel.env import init_process_group, read_dist_env

    init_process_group(read_dist_env(os.environ), backend="gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    inputs = torch.load(inputs_path)
    cu = inputs["cu_seqlens"]
    result = {"dense": {}, "packed": {}}
    for name, full in inputs["dense"].items():
        result["dense"][name] = gather_from_cp(zigzag_split(full, cp_size, cp_rank), group)
    for name, full in inputs["packed"].items():
        local = zigzag_split_packed(full, cu, cp_size, cp_rank)
        result["packed"][name] = gather_from_cp_packed(local, cu, group)

    needs_grad = zigzag_split(inputs["dense"]["logp"], cp_size, cp_rank).requires_grad_()
    try:
        gather_from_cp(needs_grad, group)
    except RuntimeError as err:
        result["grad_error"] = str(err)
    with torch.no_grad():  # the same tensor is fine without grad mode
        result["no_grad"] = gather_from_cp(needs_grad, group)
    torch.save(result, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
