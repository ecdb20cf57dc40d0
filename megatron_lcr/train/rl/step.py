"""One RL step on Megatron: rollouts -> the objective's sequences -> old (+ref) log-probs -> updates.

:func:`train_step` knows no objective by name. It asks the objective for the step's sequences
(:class:`~megatron_lcr.rl.sequences.TokenSequence` views of the rollouts' responses), scores the
``POLICY`` views with the policy as it was when the rollouts were sampled (the trainer holds exactly
the engines' weights) and, if asked, with the reference policy; every view of a response then
carries those log-probs as ``old_logp``. The rollouts are split into ``mini_batches`` parts; each
part is one guarded optimizer update (:mod:`.update`), repeated for ``epochs`` passes. The old
log-probs stay the rollout policy's throughout, so from the second update on the importance ratio
moves off 1 and clipping is live. With one mini-batch and one epoch the step is a single update
over all sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from megatron_lcr.profiling.flops import TransformerDims, step_flops_metrics
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.rl.objective import LongPrompt, Objective
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch, TokenSequence
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout, plan_micro_batches
from megatron_lcr.train.rl.update import gradient_scale, guarded_update
from megatron_lcr.train.token_logprobs import ScoringSpec, score


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a step needs besides the policy, the rollouts and the objective."""

    optimizer: Any
    scheduler: Any
    spec: ScoringSpec
    """How logits become per-token values (temperature, kernels, entropy)."""
    token_budget: int
    """Tokens per packed micro-batch."""
    layout: PackLayout = PackLayout()
    """What the parallel layout requires of a packed row."""
    fixed_length: bool = False
    """Pad every row to ``token_budget`` (pipeline parallelism: one activation shape)."""
    ref: Any = None
    """The reference policy (its ``chunks``), when the objective needs reference log-probs."""
    long_prompt: LongPrompt | None = None
    """A sample's long-context prompt (objectives with long-context views)."""
    teacher: Any = None
    """The teacher (``distill.teacher.Teacher``; a ``HiddenStateTeacher`` for the exact KL), when the
    objective needs one."""
    mini_batches: int = 1
    """Optimizer updates per pass over the rollouts."""
    epochs: int = 1
    """Passes over the rollouts."""


def train_step(policy, rollouts: list[Rollout], objective: Objective, ctx: StepContext,
               timer: StepTimer | None = None) -> dict[str, float]:
    """Score, then update ``policy`` on one step's ``rollouts``; returns the step's metrics."""
    timer = timer or StepTimer()
    sequences = objective.sequences(rollouts, ctx.long_prompt)
    metrics = {}
    if objective.needs.old or objective.needs.ref:
        metrics = score_old_logprobs(policy, sequences, ctx, ref=objective.needs.ref, timer=timer)
    if objective.needs.teacher or objective.needs.teacher_topk:
        with timer.phase("teacher"):
            score_teacher(sequences, ctx.teacher, top_k=objective.needs.teacher_topk)
    metrics.update(update_on(policy, sequences, objective, ctx, num_rollouts=len(rollouts), timer=timer))
    metrics.update(step_flops(policy, sequences, objective, ctx))
    return metrics


def step_flops(policy, sequences: list[TokenSequence], objective: Objective, ctx: StepContext) -> dict[str, float]:
    """The step's model FLOPs on the trainer (``profiling.flops``): forward + backward over the update's
    sequences in every epoch, forward over the ``POLICY`` views for the old (and reference) log-probs.
    A teacher's forward passes are not counted: it is another model, often on other GPUs."""
    trained = [len(s) for s in sequences if s.in_update] * ctx.epochs
    scorers = (1 + bool(objective.needs.ref)) if objective.needs.old or objective.needs.ref else 0
    scored = [len(s) for s in sequences if s.role == Role.POLICY] * scorers
    return step_flops_metrics(TransformerDims.from_arch(policy.arch), trained=trained, scored=scored,
                              ranks=torch.distributed.get_world_size())


def score_old_logprobs(policy, sequences: list[TokenSequence], ctx: StepContext, *, ref: bool,
                       timer: StepTimer | None = None) -> dict[str, float]:
    """Fill every view's ``old_logp`` (and the ``POLICY`` views' ``ref_logp``); returns how far the
    trainer's log-probs are from the engine's. Timed as ``old_logprob`` and ``ref_logprob``."""
    timer = timer or StepTimer()
    views = [s for s in sequences if s.role == Role.POLICY]
    kwargs = dict(token_budget=ctx.token_budget, fixed_length=ctx.fixed_length, layout=ctx.layout)
    with timer.phase("old_logprob"):
        old = score(policy.chunks, views, ctx.spec, **kwargs)
    refs = [None] * len(views)
    if ref:
        with timer.phase("ref_logprob"):
            refs = score(ctx.ref.chunks, views, ctx.spec, **kwargs)
    by_rollout, diffs = {}, []
    for seq, logp, ref_logp in zip(views, old, refs):
        seq.old_logp, seq.ref_logp = logp, ref_logp
        by_rollout[seq.rollout] = logp
        diffs += [abs(a - b) for a, b in zip(logp, seq.engine_logp or [])]
    for seq in sequences:
        if seq.role != Role.POLICY:
            seq.old_logp = by_rollout[seq.rollout]
    return {"rollout/logp_diff_max": max(diffs, default=0.0),
            "rollout/logp_diff_mean": sum(diffs) / max(len(diffs), 1)}


def score_teacher(sequences: list[TokenSequence], teacher, *, top_k: int = 0) -> None:
    """Fill every view's ``teacher_logp`` (and with ``top_k`` its ``teacher_topk_ids`` / ``_logp``): the teacher
    scores the ``POLICY`` views (the sequences the policy sampled); other views of a response carry those."""
    # The warmup's views carry the teacher's sampled-token log-probs already; with top_k they are rescored.
    pending = (lambda s: s.teacher_topk_ids is None) if top_k else (lambda s: s.teacher_logp is None)
    views = [s for s in sequences if s.role == Role.POLICY and pending(s)]
    scores = (teacher.score_topk(views, top_k) if top_k else [(logp, None, None) for logp in teacher.score(views)]
              ) if views else []
    by_rollout = {}
    for seq, (logp, ids, top_logp) in zip(views, scores):
        seq.teacher_logp, seq.teacher_topk_ids, seq.teacher_topk_logp = by_rollout[seq.rollout] = logp, ids, top_logp
    for seq in sequences:
        if pending(seq):
            seq.teacher_logp, seq.teacher_topk_ids, seq.teacher_topk_logp = by_rollout[seq.rollout]


def training_units(sequences: list[TokenSequence], paired: bool) -> list[list[int]]:
    """Indices that must share a micro-batch: with ``paired``, each view with its rollout's ``POLICY`` view
    (objectives put a view right after it)."""
    units: list[list[int]] = []
    for i, seq in enumerate(sequences):
        if paired and seq.role != Role.POLICY and i > 0 and sequences[i - 1].rollout == seq.rollout:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def rollout_parts(num_rollouts: int, parts: int) -> list[range]:
    """``parts`` contiguous, near-equal ranges of rollout indices (equal when ``parts`` divides)."""
    bounds = [num_rollouts * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def objective_loss_fn(objective: Objective, norms: Any, scale: float) -> Callable:
    """The micro-batch loss for Megatron's schedule: the objective's loss on the batch's tensors, times
    ``scale`` (:func:`~.update.gradient_scale`)."""

    def loss_fn(outputs: dict[str, torch.Tensor], batch: PackedBatch):
        mask = batch.response_mask.to(outputs["logp"].device)

        def moved(value: torch.Tensor | None, needed: bool = True) -> torch.Tensor | None:
            """On the loss's device; zeros where no row of this micro-batch has the value (a micro-batch of
            non-POLICY views has no reference log-probs) but the objective reads it."""
            if value is None:
                return torch.zeros_like(mask) if needed else None
            return value.to(mask.device)

        tokens = TokenBatch(logp=outputs["logp"], mask=mask, role=moved(batch.role), rollout=moved(batch.rollout),
                            reward=moved(batch.reward), advantage=moved(batch.advantage), in_loss=moved(batch.in_loss),
                            old_logp=moved(batch.old_logp, objective.needs.old), ref_logp=moved(batch.ref_logp, objective.needs.ref),
                            teacher_logp=moved(batch.teacher_logp, objective.needs.teacher),
                            entropy=outputs.get("entropy"), pair_kl=outputs.get("pair_kl"),
                            teacher_kl=outputs.get("teacher_kl"), distill_logp=outputs.get("distill_logp", outputs["logp"]),
                            teacher_topk_logp=moved(batch.teacher_topk_logp, False), topk_logp=outputs.get("topk_logp"))
        loss, metrics = objective.loss(tokens, norms)
        return loss * scale, metrics

    return loss_fn


def update_on(policy, sequences: list[TokenSequence], objective: Objective, ctx: StepContext, *,
              num_rollouts: int, timer: StepTimer | None = None) -> dict[str, float]:
    """``ctx.epochs`` passes of ``ctx.mini_batches`` guarded updates over the sequences in an update."""
    from megatron.core import parallel_state as ps

    timer = timer or StepTimer()
    trained = [s for s in sequences if s.in_update]
    kl_kind = objective.needs.teacher_kl
    spec = replace(ctx.spec, pair_kl=objective.needs.pair_kl, teacher_kl=kl_kind,
                   teacher_weight=ctx.teacher.output_weight if kl_kind else None,
                   teacher_topk=objective.needs.teacher_topk > 0)
    reports = []
    for _ in range(ctx.epochs):
        for part in rollout_parts(num_rollouts, ctx.mini_batches):
            chosen = [s for s in trained if s.rollout in part]
            batches = plan_micro_batches(chosen, token_budget=ctx.token_budget,
                                         dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
                                         pad_id=0, fixed_length=ctx.fixed_length,
                                         units=training_units(chosen, objective.needs.pair_kl), layout=ctx.layout)
            if kl_kind:  # the teacher's hidden states for exactly these rows, this update only
                with timer.phase("teacher"):
                    batches = ctx.teacher.attach_hidden(batches)
            loss_fn = objective_loss_fn(objective, objective.normalisers(chosen, len(part)),
                                        scale=gradient_scale(len(batches)))
            report = guarded_update(policy.chunks, ctx.optimizer, ctx.scheduler, batches, spec, loss_fn, timer)
            reports.append({**report, "train/sequences": float(len(chosen)),
                            "train/micro_batches": float(len(batches))})
    return combine_updates(reports)


def combine_updates(reports: list[dict[str, float]]) -> dict[str, float]:
    """One update's metrics as they are; several: the mean per metric (max for ``*_max``; the last
    ``lr`` / ``loss_scale``; sums of sequences and micro-batches), skipped only if every update was."""
    if len(reports) == 1:
        return reports[0]
    out: dict[str, float] = {}
    for key in {k for r in reports for k in r}:
        values = [r[key] for r in reports if key in r]
        if key.endswith("_max"):
            out[key] = max(values)
        elif key in ("lr", "loss_scale"):
            out[key] = values[-1]
        elif key.startswith("train/"):
            out[key] = sum(values)
        else:
            finite = [v for v in values if math.isfinite(v)]
            out[key] = sum(finite) / len(finite) if finite else math.nan
    skipped = sum(r["skipped"] for r in reports)
    out.update({"skipped": float(skipped == len(reports)), "train/skipped_updates": float(skipped),
                "train/updates": float(len(reports))})
    return out
