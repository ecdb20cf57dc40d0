"""The guarded optimizer update of an RL step: forward/backward over packed micro-batches, then the
optimizer step, unless anything is non-finite.

Losses are normalised by global counts (``rl.losses.Normaliser``) and scaled by micro-batches x
data-parallel size x context-parallel size (:func:`gradient_scale`), undoing Megatron's division by
the number of micro-batches and DDP's gradient averaging over DP x CP (every CP rank computes the
whole loss and back-propagates its own tokens), so the update is that of the global-batch loss
whatever the split (tested for packing and DP).

A step whose loss or gradients are not finite on any rank is skipped on all ranks: gradients are
dropped, the optimizer and LR schedule do not move, and the step is reported as skipped.
"""

from __future__ import annotations

import math

import torch

from megatron_lcr.parallel.env import collective_device
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.rl.losses import metric_reduction
from megatron_lcr.train.micro_batches import PackedBatch
from megatron_lcr.train.optimizer import begin_update
from megatron_lcr.train.token_logprobs import ScoringSpec, run_packed_schedule


def gradient_scale(num_micro_batches: int) -> float:
    """Undoes Megatron's loss division by the micro-batch count and DDP's averaging over DP x CP."""
    from megatron.core import parallel_state as ps

    return float(num_micro_batches * ps.get_data_parallel_world_size() * ps.get_context_parallel_world_size())


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Micro-batch metrics -> step metrics (sum or max over micro-batches and DP ranks), on every rank."""
    from megatron.core import parallel_state as ps

    names = sorted({k for r in reports for k in r})
    sums = [k for k in names if metric_reduction(k) == "sum"]
    maxes = [k for k in names if metric_reduction(k) == "max"]
    device = collective_device()
    totals = torch.tensor([sum(float(r.get(k, 0.0)) for r in reports) for k in sums], dtype=torch.float64,
                          device=device)
    peaks = torch.tensor([max(float(r.get(k, -math.inf)) for r in reports) for k in maxes], dtype=torch.float64,
                         device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        group = ps.get_data_parallel_group()
        torch.distributed.all_reduce(totals, group=group)
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX, group=group)
    box = [dict(zip(sums + maxes, totals.tolist() + peaks.tolist()))]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_world_size() - 1)
    return box[0]


def _grads_finite(chunks) -> bool:
    """True on every rank iff every gradient on every rank is finite."""
    ok = all(bool(torch.isfinite(buffer.grad_data).all()) for chunk in chunks for buffer in chunk.buffers)
    flag = torch.tensor([1.0 if ok else 0.0], device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def check_weights_finite(chunks, step: int) -> None:
    """Raise on every rank if any rank's weights hold NaN/inf after the update of ``step``. The guard
    in :func:`guarded_update` sees only the loss and the gradients; corrupt optimizer state (Adam moments
    never restored, say) turns finite gradients into non-finite weights, which must not reach the engines
    (they would fail every request with an opaque sampling error)."""
    bad = [name for chunk in chunks for name, param in chunk.named_parameters() if not torch.isfinite(param).all()]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, bad)
    found = [(rank, names) for rank, names in enumerate(every) if names]
    if found:
        rank, names = found[0]
        raise FloatingPointError(f"step {step}: the optimizer step made weights non-finite on {len(found)} rank(s) "
                                 f"(rank {rank}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                                 "not syncing them to the rollout engines")


def guarded_update(chunks, optimizer, scheduler, micro_batches: list[PackedBatch], spec: ScoringSpec, loss_fn,
                   timer: StepTimer | None = None) -> dict:
    """Forward/backward over the micro-batches, then the optimizer step unless anything is non-finite
    (timed as the phases ``forward_backward`` and ``optimizer``)."""
    config = chunks[0].config
    timer = timer or StepTimer()
    with timer.phase("forward_backward"):
        begin_update(chunks, optimizer)
        reports = run_packed_schedule(chunks, micro_batches, spec, loss_fn, forward_only=False)
        metrics = reduce_reports(reports)
    # fp16: gradients of the scaled loss may overflow; the optimizer's loss scaler then skips the step and
    # lowers the scale (an expected event, reported as 'overflow', not a bad step).
    scaled = bool(config.fp16)
    with timer.phase("optimizer"):
        if not (math.isfinite(metrics.get("loss", 0.0)) and (scaled or _grads_finite(chunks))):
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            return {**metrics, "skipped": 1.0, "grad_norm": float("nan"), "lr": optimizer.param_groups[0]["lr"]}
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
    metrics.update({"skipped": 0.0 if updated else 1.0, "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")})
    if scaled:
        metrics.update({"overflow": 0.0 if updated else 1.0, "loss_scale": float(optimizer.get_loss_scale())})
    return metrics
