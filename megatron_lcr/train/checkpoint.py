"""Checkpoints written by a running job: atomic across ranks, newest N kept, exact resume.

All ranks save into one temporary directory chosen by rank 0; rank 0 adds the metadata and the
Hugging Face config/tokenizer, then renames it to ``iter_NNNNNNN`` and only then deletes checkpoints
beyond ``keep_last``. A job killed mid-save leaves a ``.tmp`` directory, never a checkpoint that
looks complete. The directory is a megatron_lcr checkpoint: ``lcr convert megatron-to-hf`` reads it.

For resuming, a checkpoint may also hold the training state: ``state/rank_NNNNN.pt`` per rank
(optimizer, LR schedule, every RNG: Python, torch CPU/CUDA and Megatron's tensor-parallel tracker)
and ``trainer_state.json`` (step, data cursor and whatever the loop needs to continue identically).
A resume needs the same parallel layout as the save (the optimizer state is per rank).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_lcr.models.hf_checkpoint import copy_hf_metadata
from megatron_lcr.models.megatron_checkpoint import HF_DIR, checkpoint_meta, save_model, write_meta
from megatron_lcr.parallel.layout import ParallelConfig

TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint with training state under ``out_dir/checkpoints``, if any."""
    found = sorted((Path(out_dir) / "checkpoints").glob("iter_*"))
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    return found[-1] if found else None


def _rank_state(optimizer, scheduler) -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker_rng": get_cuda_rng_tracker().get_states(),
    }


def save_checkpoint(policy, parallel: ParallelConfig, out_dir: str | os.PathLike, *, step: int, keep_last: int,
                    optimizer=None, scheduler=None, trainer_state: dict | None = None) -> Path:
    """Collectively save the policy at ``step`` (and, given ``optimizer``, the training state)."""
    root = Path(out_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    names = [None]
    if torch.distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        names[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
    torch.distributed.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    save_model([chunk.module for chunk in policy.chunks], tmp)
    if optimizer is not None:
        (tmp / STATE_DIR).mkdir(exist_ok=True)
        torch.save(_rank_state(optimizer, scheduler), tmp / STATE_DIR / f"rank_{torch.distributed.get_rank():05d}.pt")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        copy_hf_metadata(policy.hf_config_dir, tmp / HF_DIR)
        write_meta(tmp, checkpoint_meta(policy.arch, policy.model_cfg, parallel, iteration=step))
        if trainer_state is not None:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("iter_*"))[:-keep_last]:
            shutil.rmtree(old)
    torch.distributed.barrier()
    return final


def load_training_state(ckpt: str | os.PathLike, optimizer, scheduler) -> dict:
    """Restore this rank's optimizer, schedule and RNGs from ``ckpt``; returns the trainer state."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    ckpt = Path(ckpt)
    path = ckpt / STATE_DIR / f"rank_{torch.distributed.get_rank():05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state for rank {torch.distributed.get_rank()} "
                                "(was the checkpoint saved with another number of ranks?)")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_checkpoint
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    get_cuda_rng_tracker().set_states(state["tracker_rng"])
    return json.loads((ckpt / TRAINER_STATE).read_text())
