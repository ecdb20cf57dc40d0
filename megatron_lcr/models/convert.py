"""Checkpoint conversion between Hugging Face and Megatron (``lcr convert``).

hf-to-megatron: every input problem (config, architecture, layout, missing shards or tensors) is
found in the parent process before any work starts. Then TP x PP worker processes (gloo, CPU) each
build their own model chunk, read only the Hugging Face tensors their shard is made of
(memory-mapped), and save collectively with Megatron's ``dist_checkpointing``: no process ever holds
more than its shard of the model.

megatron-to-hf: TP x PP workers load the checkpoint (any layout: dist_checkpointing reshards), then
per parameter gather the TP shards on TP rank 0 of each stage, un-fuse them into Hugging Face
tensors and stream them into safetensors parts; the parent names the parts and writes the index.
Peak memory per process is its shard plus one gathered parameter and one output shard.

Workers receive the parsed architecture from the parent, so they never import ``transformers``.
Both write into a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.models.builder import DTYPES, ModelConfig, build_gpt_model, resolved_vocab_size
from megatron_lcr.models.families import HFArch, hf_arch, model_dims
from megatron_lcr.models.hf_checkpoint import (
    HFCheckpointError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_hf_metadata,
    finalize_shards,
    load_hf_config,
)
from megatron_lcr.models.megatron_checkpoint import (
    HF_DIR,
    CheckpointMeta,
    checkpoint_meta,
    read_meta,
    save_model,
    write_meta,
)
from megatron_lcr.models.weight_map import hf_names
from megatron_lcr.parallel.env import free_port
from megatron_lcr.parallel.layout import ParallelConfig, validate_layout


def _hf_dtype(hf_config, dtype: str) -> str:
    """Resolve ``--dtype auto`` to the checkpoint's own dtype (bfloat16 when it does not say)."""
    if dtype != "auto":
        return dtype
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "bfloat16")
    name = name.removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def _set_worker_env(rank: int, world_size: int, port: int) -> None:
    """torchrun-style variables for a conversion worker on this machine."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ---- Hugging Face -> Megatron ------------------------------------------------------------------


def hf_to_megatron(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
    dtype: str = "auto", overwrite: bool = False,
) -> CheckpointMeta:
    """Convert a Hugging Face model directory into a megatron_lcr checkpoint written at TP x PP."""
    hf_dir = Path(hf_dir)
    hf_config = load_hf_config(hf_dir)
    arch = hf_arch(hf_config)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_layout(parallel, world_size=tp * pp, dims=model_dims(arch))
    reader = SafetensorsReader(hf_dir)
    missing = [name for name in hf_names(arch) if name not in reader]
    if missing:
        raise HFCheckpointError(f"{hf_dir}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    model_cfg = ModelConfig(params_dtype=_hf_dtype(hf_config, dtype), transformer_impl="local")
    meta = checkpoint_meta(arch, model_cfg, parallel)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        torch.multiprocessing.start_processes(
            _hf_to_megatron_worker,
            args=(tp * pp, free_port(), str(hf_dir), str(tmp), arch, model_cfg, parallel),
            nprocs=tp * pp,
            start_method="spawn",
        )
        copy_hf_metadata(hf_dir, tmp / HF_DIR)
        write_meta(tmp, meta)
    return meta


def _hf_to_megatron_worker(
    rank: int, world_size: int, port: int, hf_dir: str, out: str, arch: HFArch, model_cfg: ModelConfig,
    parallel: ParallelConfig,
) -> None:
    """One rank of hf-to-megatron: build this rank's chunk, fill it from HF tensors, save."""
    from tqdm import tqdm

    _set_worker_env(rank, world_size, port)
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.transfer import load_hf_into_chunk, maps_for_rank
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    initialize_megatron(parallel)
    chunk = build_gpt_model(
        arch, model_cfg, parallel, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    maps = maps_for_rank(arch, te=False, padded_vocab=resolved_vocab_size(arch, model_cfg, parallel))
    reader = SafetensorsReader(hf_dir)
    bar = tqdm(total=len(maps), desc="hf-to-megatron (rank 0)", unit="tensor", disable=rank != 0, file=sys.stderr)
    load_hf_into_chunk(
        chunk, maps, reader.get, tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=parallel.tensor_model_parallel_size, on_tensor=lambda name: bar.update(),
    )
    bar.close()
    save_model([chunk], out)
    destroy_megatron()


# ---- Megatron -> Hugging Face ------------------------------------------------------------------


def megatron_to_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int | None = None, pp: int | None = None,
    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
) -> CheckpointMeta:
    """Convert a megatron_lcr checkpoint into a Hugging Face directory (sharded safetensors + index).

    The checkpoint is read by TP x PP workers (default: the layout it was saved at), so no process
    holds more than its shard of the model plus one gathered parameter.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    arch = hf_arch(load_hf_config(ckpt_dir / HF_DIR))
    tp = tp or meta.tensor_model_parallel_size
    pp = pp or meta.pipeline_model_parallel_size
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_layout(parallel, world_size=tp * pp, dims=model_dims(arch))
    if meta.padded_vocab_size % tp:
        raise ValueError(f"--tp {tp} does not divide the checkpoint's padded vocabulary {meta.padded_vocab_size}")
    model_cfg = ModelConfig(params_dtype=meta.params_dtype, transformer_impl="local",
                            padded_vocab_size=meta.padded_vocab_size)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        torch.multiprocessing.start_processes(
            _megatron_to_hf_worker,
            args=(tp * pp, free_port(), str(ckpt_dir), str(tmp), arch, model_cfg, parallel, max_shard_bytes),
            nprocs=tp * pp,
            start_method="spawn",
        )
        finalize_shards(tmp, [str(stage) for stage in range(pp)])
        copy_hf_metadata(ckpt_dir / HF_DIR, tmp)
    return meta


def _megatron_to_hf_worker(
    rank: int, world_size: int, port: int, ckpt_dir: str, out: str, arch: HFArch, model_cfg: ModelConfig,
    parallel: ParallelConfig, max_shard_bytes: int,
) -> None:
    """One rank of megatron-to-hf: load this rank's chunk, gather TP shards, stream HF tensors out."""
    from tqdm import tqdm

    _set_worker_env(rank, world_size, port)
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.megatron_checkpoint import load_model
    from megatron_lcr.models.transfer import export_chunk_to_hf, maps_for_rank
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    initialize_megatron(parallel)
    chunk = build_gpt_model(
        arch, model_cfg, parallel, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    load_model([chunk], ckpt_dir)
    maps = maps_for_rank(arch, te=False, padded_vocab=model_cfg.padded_vocab_size)
    stage = ps.get_pipeline_model_parallel_rank()
    writer = ShardedSafetensorsWriter(out, part=str(stage), max_shard_bytes=max_shard_bytes)
    bar = tqdm(total=len(maps), desc="megatron-to-hf (rank 0)", unit="tensor", disable=rank != 0, file=sys.stderr)
    for name, tensor in export_chunk_to_hf(chunk, maps, tp_group=ps.get_tensor_model_parallel_group(),
                                           on_tensor=lambda _: bar.update()):
        writer.add(name, tensor)
    bar.close()
    if ps.get_tensor_model_parallel_rank() == 0:
        writer.close()
    destroy_megatron()
