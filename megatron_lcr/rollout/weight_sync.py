"""Push the trainer's weights to rollout engines after every optimizer step.

Trainer side of the sync (engines implement the SGLang endpoints it calls):

1. Gather: every rank iterates :func:`hf_tensors_on_source`. Per parameter, TP shards are all-gathered
   on each pipeline stage and un-fused into Hugging Face tensors (``models.transfer``); stages other
   than the first send theirs to global rank 0, the *source*, point to point. Tensors stream one at
   a time: no rank ever holds the whole model.
2. Bucket: the source groups tensors into buckets of about ``bucket_bytes`` (default 512 MiB; one
   request and one round of broadcasts per bucket instead of per tensor).
3. Transport, by ``mode``:
   ``distributed``  a process group of the source (rank 0, hosting the store) and every engine rank
                    (``/init_weights_update_group``); per bucket the source POSTs
                    ``/update_weights_from_distributed`` and broadcasts each tensor in order
                    (gloo on CPU, NCCL on GPU);
   ``disk``         safetensors shards in a directory, then ``/update_weights_from_disk`` on each engine.
4. Generation is paused and the cache flushed around the sync; every engine gets the new
   ``weight_version``; optional per-tensor checksums prove the engines hold exactly these weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_lcr.models.builder import use_transformer_engine
from megatron_lcr.models.transfer import export_chunk_to_hf, maps_for_rank


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How new weights reach the rollout engines."""

    mode: Literal["distributed", "disk"] = "distributed"
    """Transport: broadcast over a trainer+engines process group, or safetensors on a shared disk."""
    bucket_bytes: int = 512 * 2**20
    """Bytes of tensors per update request (bytes)."""
    checksum: bool = False
    """Compare per-tensor SHA-256 of trainer and engines after each sync (slow; for debugging and tests)."""
    group_name: str = "lcr_weight_sync"
    """Name of the trainer+engines process group."""
    disk_dir: str = ""
    """Directory for mode 'disk' (must be visible to every engine)."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.mode == "disk" and not self.disk_dir:
            raise ValueError("mode 'disk' needs disk_dir (a directory every engine can read)")


def _stage_tensors(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's HF tensors on its TP rank 0 (all TP ranks must iterate: all-gathers inside)."""
    from megatron.core import parallel_state as ps

    vp_size = ps.get_virtual_pipeline_model_parallel_world_size()
    te = use_transformer_engine(policy.model_cfg)
    for vp_stage, chunk in enumerate(policy.chunks):
        maps = maps_for_rank(policy.arch, te=te, padded_vocab=policy.model_cfg.padded_vocab_size,
                             vp_stage=vp_stage if vp_size else None)
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or bare
        yield from export_chunk_to_hf(module, maps, tp_group=ps.get_tensor_model_parallel_group())


def hf_tensors_on_source(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """Every Hugging Face tensor of the policy, yielded on global rank 0 (nothing elsewhere).

    Every rank must exhaust this iterator. The ranks of data-parallel replica 0 (context-parallel
    rank 0) export: each stage all-gathers its TP shards; stage roots (TP rank 0) of stages > 0 send
    their tensors to rank 0 point to point. Other replicas hold the same weights and do nothing.
    Order: stage 0's tensors, then stage 1's, ...
    """
    from megatron.core import parallel_state as ps

    exporter = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    if torch.distributed.get_rank() == 0:
        # Rank 0's pipeline group is exactly the stage roots (same TP/CP/DP coordinates), in order.
        roots = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        yield from _stage_tensors(policy)
        for src in roots[1:]:
            yield from _receive_stage(src)
    elif exporter:
        for name, tensor in _stage_tensors(policy):  # yields only on TP rank 0 (a stage root)
            torch.distributed.send_object_list([(name, tensor.dtype, tuple(tensor.shape))], dst=0)
            torch.distributed.send(tensor.contiguous(), dst=0)
        if ps.get_tensor_model_parallel_rank() == 0:
            torch.distributed.send_object_list([None], dst=0)


def _receive_stage(src: int) -> Iterator[tuple[str, torch.Tensor]]:
    while True:
        box = [None]
        torch.distributed.recv_object_list(box, src=src)
        if box[0] is None:
            return
        name, dtype, shape = box[0]
        tensor = torch.empty(shape, dtype=dtype)
        torch.distributed.recv(tensor, src=src)
        yield name, tensor


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs in order into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
