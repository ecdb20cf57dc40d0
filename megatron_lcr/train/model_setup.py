"""Build this rank's trainable policy: model chunks from a HF directory or a checkpoint, wrapped in DDP.

Weights come from, in order of precedence: a megatron_lcr checkpoint (``load``), the Hugging Face
weights next to ``model.hf_path``, or a seeded random initialisation when ``model.random_init`` says
so explicitly (the tiny CPU demo). A directory without weights is an error otherwise: silently
training a random model is the worst outcome of a typo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_lcr.models.builder import ModelConfig, build_gpt_model, resolved_vocab_size, use_transformer_engine
from megatron_lcr.models.families import HFArch, hf_arch
from megatron_lcr.models.hf_checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    HFCheckpointError,
    SafetensorsReader,
    load_hf_config,
)
from megatron_lcr.models.megatron_checkpoint import HF_DIR, load_model, read_meta
from megatron_lcr.models.transfer import load_hf_into_chunk, maps_for_rank
from megatron_lcr.parallel.layout import ParallelConfig


@dataclass
class Policy:
    """This rank's model chunks (DDP-wrapped) and what they were built from."""

    chunks: list
    """Megatron DDP-wrapped GPTModel chunks (one per virtual pipeline stage)."""
    arch: HFArch
    """The Hugging Face architecture."""
    model_cfg: ModelConfig
    """Model config with the padded vocabulary resolved."""
    hf_config_dir: Path
    """Directory holding config.json and tokenizer files (copied into every checkpoint)."""


def has_hf_weights(path: Path) -> bool:
    return (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()


def build_policy(model_cfg: ModelConfig, parallel: ParallelConfig, *, load: str | None = None,
                 trainable: bool = True) -> Policy:
    """Build, fill and DDP-wrap this rank's chunks (Megatron must be initialised).

    ``trainable=False`` (a teacher): frozen, in eval mode and not DDP-wrapped, so no gradient buffers
    (for a 70B teacher those would be 280 GB of fp32 spread over its ranks).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if load:
        meta = read_meta(load)
        config_dir = Path(load) / HF_DIR
        model_cfg = replace(model_cfg, padded_vocab_size=meta.padded_vocab_size)
    else:
        config_dir = Path(model_cfg.hf_path)
        if not model_cfg.random_init and not has_hf_weights(config_dir):
            raise HFCheckpointError(
                f"{config_dir}: no {SINGLE_NAME} or {INDEX_NAME} (set model.random_init: true to train from scratch)"
            )
    arch = hf_arch(load_hf_config(config_dir))
    model_cfg = replace(model_cfg, padded_vocab_size=resolved_vocab_size(arch, model_cfg, parallel))
    vp_size = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunks.append(
            build_gpt_model(
                arch,
                model_cfg,
                parallel,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
        )
    if load:
        load_model(chunks, load)
    elif has_hf_weights(config_dir):
        reader = SafetensorsReader(config_dir)
        for vp_stage, chunk in enumerate(chunks):
            maps = maps_for_rank(arch, te=use_transformer_engine(model_cfg), padded_vocab=model_cfg.padded_vocab_size,
                                 vp_stage=vp_stage if vp_size else None)
            load_hf_into_chunk(chunk, maps, reader.get, tp_rank=ps.get_tensor_model_parallel_rank(),
                               tp_size=parallel.tensor_model_parallel_size)
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    if not trainable:
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return Policy(chunks=chunks, arch=arch, model_cfg=model_cfg, hf_config_dir=config_dir)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.use_distributed_optimizer
    )
    wrapped = [
        DistributedDataParallel(chunk.config, ddp_cfg, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    return Policy(chunks=wrapped, arch=arch, model_cfg=model_cfg, hf_config_dir=config_dir)
