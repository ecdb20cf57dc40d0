"""Checkpoints written by a running job: atomic across ranks, newest N kept, exact resume.

All ranks save into one temporary directory chosen by rank 0; rank 0 adds the metadata and the
Hugging Face config/tokenizer, then renames it to ``iter_NNNNNNN`` and only then deletes checkpoints
beyond ``keep_last``. A job killed mid-save leaves a ``.tmp`` directory, never a checkpoint that
looks complete. The directory is a megatron_lcr checkpoint: ``lcr convert megatron-to-hf`` reads it.

For resuming, a checkpoint may also hold the training state: ``state/rank_NNNNN.pt`` per rank
(optimizer, LR schedule, every RNG: Python, torch CPU/CUDA and Megatron's tensor-parallel tracker)
and ``trainer_state.json`` (step, data cursor and whatever the loop needs to continue identically).
A resume needs the same parallel layout as the save (the optimizer state is per rank).

Megatron's distributed optimizer (ZeRO-1) keeps the parameter-shaped state (fp32 master weights,
Adam's moments and, with torch's Adam, its per-parameter step) out of ``state_dict()``:
``load_state_dict`` only allocates placeholders for it (``distrib_optimizer.py``). Each rank saves its
own shard of that state (``get_parameter_state_dp_reshardable``: no communication, tensors in bucket
order) to ``state/params_rank_NNNNN.pt`` and loads it back into the placeholders. Megatron's
``save/load_parameter_state`` (gather to data-parallel rank 0) is not used: in megatron-core 0.16.1
it drops torch Adam's per-parameter ``step``, which its loader then asks for (KeyError 'step'), so
it fails wherever Apex / Transformer Engine's fused Adam is absent.
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


def distributed_optimizers(optimizer) -> list:
    """The Megatron DistributedOptimizers inside ``optimizer`` (a ChainedOptimizer or a single one)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part for part in parts if isinstance(part, DistributedOptimizer)]


def _param_state_path(ckpt: Path) -> Path:
    return ckpt / STATE_DIR / f"params_rank_{torch.distributed.get_rank():05d}.pt"


def _parameter_state(optimizer) -> list[dict]:
    """This rank's shard of every distributed optimizer's parameter state, in the layout
    ``load_parameter_state_from_dp_reshardable`` reads (it skips entries marked as padding)."""
    shards = []
    for part in distributed_optimizers(optimizer):
        shard = part.get_parameter_state_dp_reshardable()
        for gbuf_idx, by_dtype in shard.items():
            if isinstance(gbuf_idx, int):
                for buckets in by_dtype.values():
                    for entry in (e for bucket in buckets for e in bucket):
                        # Host copies: the state tensors are views (an fp32 model's masters view the whole
                        # parameter buffer, which torch.save would write out in full).
                        entry.update({k: v.detach().to("cpu", copy=True) for k, v in entry.items() if torch.is_tensor(v)})
                        entry["padding"] = False
        shards.append(shard)
    return shards


def _unshare_steps(part) -> None:
    """Give every parameter its own Adam step counter. With torch's Adam, megatron-core 0.16.1's
    ``DistributedOptimizer.load_state_dict`` puts ONE step tensor into every parameter's state;
    Adam then increments it once per parameter and step, so after a resume the bias correction
    used step counts in the hundreds (found by the resume test: step 4 differed from an
    uninterrupted run's)."""
    for state in part.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _rank_state(optimizer, scheduler) -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "optimizer": optimizer.state_dict(),
        "distributed_optimizer": bool(distributed_optimizers(optimizer)),
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
        if distributed_optimizers(optimizer):
            torch.save(_parameter_state(optimizer), _param_state_path(tmp))
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
    """Restore this rank's optimizer (with a distributed optimizer's parameter state: master weights
    and Adam moments), schedule and RNGs from ``ckpt``; returns the trainer state. Collective.

    The model's weights must have been loaded from ``ckpt`` first: the master weights are refreshed
    from them before the optimizer state (which holds the exact fp32 masters) overwrites them."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    ckpt = Path(ckpt)
    path = ckpt / STATE_DIR / f"rank_{torch.distributed.get_rank():05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state for rank {torch.distributed.get_rank()} "
                                "(was the checkpoint saved with another number of ranks?)")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_checkpoint
    distributed = distributed_optimizers(optimizer)
    if state.get("distributed_optimizer", False) != bool(distributed):
        raise ValueError(f"{ckpt}: saved with parallel.use_distributed_optimizer="
                         f"{str(state.get('distributed_optimizer', False)).lower()}, resumed with "
                         f"{str(bool(distributed)).lower()}: the optimizer state cannot be carried over")
    params = _param_state_path(ckpt)
    if distributed and not params.is_file():
        raise FileNotFoundError(f"{params}: no distributed-optimizer state (master weights, Adam moments)")
    with torch.no_grad():  # fp32 masters of a distributed optimizer are views of the (leaf) parameters
        optimizer.reload_model_params()  # masters built before the weights were loaded would be stale
        optimizer.load_state_dict(state["optimizer"])  # distributed: placeholders for moments and masters
        if distributed:
            shards = torch.load(params, map_location="cpu", weights_only=False)  # written by save_checkpoint
            for part, shard in zip(distributed, shards, strict=True):
                _unshare_steps(part)
                part.load_parameter_state_from_dp_reshardable(shard)
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    get_cuda_rng_tracker().set_states(state["tracker_rng"])
    return json.loads((ckpt / TRAINER_STATE).read_text())
