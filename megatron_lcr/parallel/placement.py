"""Placement of trainer ranks and rollout engines on GPUs, checked before anything starts.

Trainer rank ``r`` runs on GPU ``LOCAL_RANK`` of its node (``parallel/env.py``), so on node 0 the
trainer uses GPUs ``0 .. local_world_size - 1``. Rollout servers launched by rank 0 run on node 0
too, on ``rollout.server.gpu_ids``; servers given by URL run elsewhere (their own nodes).

Supported layouts, per weight-sync mode:

``distributed``  trainer and engine GPUs disjoint (slime's disaggregated layout): rank 0 and every
                 engine rank form one NCCL group, and NCCL refuses two ranks of a communicator on one
                 GPU (ncclInvalidUsage), so the first sync would fail.
``tensor``       CUDA IPC handles made by trainer rank 0 on its GPU: only an engine on that very GPU
                 can open them (launched servers see only their own GPUs). Feeding colocated engines
                 per GPU (each trainer rank handing its own GPU's engine rank the bucket, as slime's
                 colocated mode does) is not built; such layouts are refused.
``disk``         any placement (engines read files).
"""

from __future__ import annotations

from collections.abc import Sequence


def _ranges(gpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (how the errors name GPU sets)."""
    out, ordered = [], sorted(set(gpus))
    start = prev = ordered[0]
    for gpu in [*ordered[1:], None]:
        if gpu is not None and gpu == prev + 1:
            prev = gpu
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if gpu is not None:
            start = prev = gpu
    return ",".join(out)


def check_rollout_placement(*, trainer_gpus: Sequence[int], rollout_gpus: Sequence[int], sync_mode: str) -> None:
    """Refuse a layout the weight sync cannot serve (see the module docstring).

    ``trainer_gpus``: node 0's GPUs with trainer ranks (rank 0 on the first); ``rollout_gpus``: the GPUs
    of the servers rank 0 launches on node 0 (empty: servers on CPU or on other nodes).
    """
    if not rollout_gpus:
        return
    if sync_mode == "distributed":
        overlap = sorted(set(trainer_gpus) & set(rollout_gpus))
        if overlap:
            raise ValueError(
                f"rollout GPUs {_ranges(overlap)} are also trainer GPUs (node 0's trainer ranks use GPUs "
                f"{_ranges(trainer_gpus)}): sync.mode 'distributed' puts them in one NCCL group, which refuses two "
                "ranks on one GPU; give the servers GPUs of their own (rollout.server.gpu_ids and fewer trainer "
                "processes per node) or nodes of their own (rollout.urls), or use sync.mode 'disk'")
    elif sync_mode == "tensor":
        rank0 = trainer_gpus[0]
        if set(rollout_gpus) != {rank0}:
            raise ValueError(
                f"sync.mode 'tensor' hands over CUDA IPC handles from trainer rank 0 on GPU {rank0}, which engines on "
                f"GPUs {_ranges(rollout_gpus)} cannot open (per-GPU feeding of colocated engines is not built); use "
                "one tp_size-1 server on rank 0's GPU, sync.mode 'distributed' with GPUs of their own, or 'disk'")


def check_teacher_placement(*, trainer_gpus: Sequence[int], rollout_gpus: Sequence[int],
                            teacher_gpus: Sequence[int]) -> None:
    """Refuse teacher servers launched by rank 0 on node 0's GPUs that trainer ranks or rollout servers use
    (``teacher_gpus`` empty: on CPU or given by URL): each sizes its memory as if the GPU were its own."""
    for name, used in (("trainer", trainer_gpus), ("rollout server", rollout_gpus)):
        overlap = sorted(set(used) & set(teacher_gpus))
        if overlap:
            raise ValueError(f"teacher server GPUs {_ranges(overlap)} are also {name} GPUs: give the teacher GPUs of "
                             "its own (distill.teacher.engine.server.gpu_ids) or nodes of its own "
                             "(distill.teacher.engine.urls)")
