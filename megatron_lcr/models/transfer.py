"""Move weights between Hugging Face tensors and this rank's Megatron model chunks.

Loading: each rank reads only the Hugging Face tensors its own parameters are made of, fuses them into the
full Megatron layout and keeps its tensor-parallel shard (``weight_map``). The maps must cover the
chunk's parameters exactly: a parameter without a map, or a map without a parameter, is an error
rather than a silently random or missing weight. Exporting is the inverse: TP shards are gathered
per parameter and un-fused into Hugging Face names (checkpoint conversion and weight sync use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_lcr.models.families import HFArch
from megatron_lcr.models.weight_map import TensorMap, chunk_maps, tp_shard, tp_unshard


def maps_for_rank(arch: HFArch, *, te: bool, padded_vocab: int, vp_stage: int | None = None) -> list[TensorMap]:
    """Weight maps of this rank's chunk, from Megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    return chunk_maps(
        arch,
        te=te,
        padded_vocab=padded_vocab,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vp_stage=vp_stage,
        vp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def check_coverage(chunk: torch.nn.Module, maps: list[TensorMap]) -> dict[str, torch.nn.Parameter]:
    """The chunk's parameters by name, after checking the maps name exactly these parameters."""
    params = dict(chunk.named_parameters())
    mapped = {m.megatron for m in maps}
    unmapped = sorted(set(params) - mapped)
    missing = sorted(mapped - set(params))
    if unmapped or missing:
        raise RuntimeError(
            f"weight map does not match the Megatron model: parameters without a map {unmapped[:4]}, "
            f"maps without a parameter {missing[:4]}"
        )
    return params


@torch.no_grad()
def load_hf_into_chunk(
    chunk: torch.nn.Module,
    maps: list[TensorMap],
    get_hf: Callable[[str], torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Fill every parameter of ``chunk`` from Hugging Face tensors (``get_hf(name) -> tensor``)."""
    params = check_coverage(chunk, maps)
    for tm in maps:
        param = params[tm.megatron]
        full = tm.fuse([get_hf(name) for name in tm.hf])
        shard = tp_shard(full, tm.tp, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise RuntimeError(
                f"{tm.megatron}: Hugging Face tensors {tm.hf} give shape {tuple(shard.shape)} on "
                f"TP rank {tp_rank}, the model expects {tuple(param.shape)}"
            )
        param.copy_(shard)
        if on_tensor is not None:
            on_tensor(tm.megatron)


@torch.no_grad()
def export_chunk_to_hf(
    chunk: torch.nn.Module, maps: list[TensorMap], *, tp_group, on_tensor: Callable[[str], None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for this chunk, on TP rank 0 only (every TP rank must iterate).

    Per parameter: all-gather the TP shards (one collective per tensor), undo the shard layout, then
    un-fuse into Hugging Face tensors. Peak extra memory is one full parameter.
    """
    params = check_coverage(chunk, maps)
    tp_size = torch.distributed.get_world_size(tp_group)
    tp_rank = torch.distributed.get_rank(tp_group)
    for tm in maps:
        shard = params[tm.megatron].detach().contiguous()
        if tp_size > 1 and tm.tp != "replicated":
            shards = [torch.empty_like(shard) for _ in range(tp_size)]
            torch.distributed.all_gather(shards, shard, group=tp_group)
            full = tp_unshard(shards, tm.tp)
        else:
            full = shard
        if tp_rank == 0 and tm.export:
            yield from zip(tm.hf, (t.cpu() for t in tm.split(full)))
        if on_tensor is not None:
            on_tensor(tm.megatron)
