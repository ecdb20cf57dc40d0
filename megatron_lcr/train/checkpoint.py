"""Checkpoints written by a running job: atomic across ranks, newest N kept.

All ranks save into one temporary directory chosen by rank 0; rank 0 adds the metadata and the
Hugging Face config/tokenizer, then renames it to ``iter_NNNNNNN`` and only then deletes checkpoints
beyond ``keep_last``. A job killed mid-save leaves a ``.tmp`` directory, never a checkpoint that
looks complete. The directory is a megatron_lcr checkpoint: ``lcr convert megatron-to-hf`` reads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_lcr.models.hf_checkpoint import copy_hf_metadata
from megatron_lcr.models.megatron_checkpoint import HF_DIR, checkpoint_meta, save_model, write_meta
from megatron_lcr.parallel.layout import ParallelConfig


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def save_checkpoint(policy, parallel: ParallelConfig, out_dir: str | os.PathLike, *, step: int, keep_last: int) -> Path:
    """Collectively save the policy at ``step`` under ``out_dir/checkpoints``; returns its path."""
    root = Path(out_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    names = [None]
    if torch.distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        names[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
    torch.distributed.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    save_model([chunk.module for chunk in policy.chunks], tmp)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        copy_hf_metadata(policy.hf_config_dir, tmp / HF_DIR)
        write_meta(tmp, checkpoint_meta(policy.arch, policy.model_cfg, parallel, iteration=step))
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("iter_*"))[:-keep_last]:
            shutil.rmtree(old)
    torch.distributed.barrier()
    return final
