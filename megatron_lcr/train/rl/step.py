"""One RL optimizer step on Megatron: rollouts -> sequences -> old log-probs -> loss -> guarded update.

Sequences of a step (``TokenSequence``, packed into micro-batches by token budget):

* ``px``: prompt with the rollout's own context + response; the policy-gradient loss (L_PX).
* ``aux`` (DePO): the long-context prompt + the same response; KD (rollouts with reward >= tau) or
  DePO-IW (all rollouts). Its teacher / behaviour log-probs are the short sequence's old log-probs:
  the policy at the start of the step on the short context, which is the sampling policy (the
  trainer holds exactly the engines' weights) and, with one update per rollout batch as in the
  paper, the current policy detached. The exact KD (``kd_estimator: full``) needs the teacher's
  whole distribution instead: the short sequence then always comes along (as ``teacher`` when it
  is not in L_PX) and shares a micro-batch with its long one (``training_units``).

Losses are normalised by global counts (``rl.losses.Normaliser``) and scaled by micro-batches x
data-parallel size x context-parallel size, undoing Megatron's division by the number of
micro-batches and DDP's gradient averaging over DP x CP (every CP rank computes the whole loss and
back-propagates its own tokens), so the update is that of the global-batch loss whatever the split
(tested for packing and DP).

A step whose loss or gradients are not finite on any rank is skipped on all ranks: gradients are
dropped, the optimizer and LR schedule do not move, and the step is reported as skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lcr.distill.depo import DePOConfig, DePOInputs, depo_loss
from megatron_lcr.parallel.env import collective_device
from megatron_lcr.rl.losses import Normaliser, metric_reduction, policy_loss
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout, TokenSequence, plan_micro_batches
from megatron_lcr.train.rl.config import RLRunConfig
from megatron_lcr.train.rl.rollouts import Rollout
from megatron_lcr.train.token_logprobs import ScoringSpec, run_packed_schedule, score_sequences


def build_sequences(rollouts: list[Rollout], depo: DePOConfig, long_prompt, *, mask_truncated: bool) -> list[TokenSequence]:
    """The step's training sequences; ``long_prompt(sample) -> ids`` gives DePO's long-context prompt."""
    sequences = []
    for k, r in enumerate(rollouts):
        if not r.response:
            continue  # nothing to score (an engine that returned no token)
        px = r.in_policy_loss and not (mask_truncated and r.finish_reason == "length")
        aux = depo.enabled and (depo.importance != "none" or r.reward >= depo.tau)
        if not (px or aux):
            continue
        common = {"advantage": r.advantage, "reward": r.reward, "rollout": float(k)}
        teacher = aux and depo.mode == "kd-full"
        sequences.append(TokenSequence(r.prompt, r.response, token_values={"engine_logp": r.engine_logp},
                                       values={**common, "px": float(px), "aux": 0.0, "teacher": float(teacher)}))
        if aux:
            sequences.append(TokenSequence(long_prompt(r.sample), r.response, values={**common, "px": 0.0, "aux": 1.0, "teacher": 0.0}))
    return sequences


def gradient_scale(num_micro_batches: int) -> float:
    """Undoes Megatron's loss division by the micro-batch count and DDP's averaging over DP x CP."""
    from megatron.core import parallel_state as ps

    return float(num_micro_batches * ps.get_data_parallel_world_size() * ps.get_context_parallel_world_size())


def training_units(sequences: list[TokenSequence]) -> list[list[int]]:
    """Indices that must share a micro-batch: a ``teacher`` short sequence with its long one."""
    units: list[list[int]] = []
    for i, seq in enumerate(sequences):
        if seq.values["aux"] and i > 0 and sequences[i - 1].values.get("teacher"):
            units[-1].append(i)  # build_sequences puts the long sequence right after its short one
        else:
            units.append([i])
    return units


def _gather_scores(local: dict[int, dict[str, list[float]]]) -> dict[int, dict[str, list[float]]]:
    """Merge per-rank score dicts (last pipeline stages hold them, one share per DP rank) on every rank."""
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local)
    merged: dict[int, dict[str, list[float]]] = {}
    for part in everyone:
        merged.update(part)
    return merged


def score(chunks, sequences: list[TokenSequence], ids: list[int], spec: ScoringSpec, *, token_budget: int,
          fixed_length: bool, layout: PackLayout = PackLayout()) -> dict[int, dict[str, list[float]]]:
    """Forward-only per-token log-probs of ``sequences[i] for i in ids`` on every rank: ``{i: {"logp": [...]}}``."""
    from megatron.core import parallel_state as ps

    subset = [sequences[i] for i in ids]
    batches = plan_micro_batches(subset, token_budget=token_budget, dp_size=ps.get_data_parallel_world_size(),
                                 dp_rank=ps.get_data_parallel_rank(), pad_id=0, fixed_length=fixed_length,
                                 layout=layout)
    local = score_sequences(chunks, batches, spec) if batches else {}
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True)
    scores = _gather_scores(local if keep else {})
    return {ids[j]: value for j, value in scores.items()}


@dataclass(frozen=True)
class StepNorms:
    """Global normalisers of the step's two loss terms."""

    px: Normaliser
    aux: Normaliser
    num_rollouts: int


def step_norms(sequences: list[TokenSequence], max_response_len: int, num_rollouts: int) -> StepNorms:
    def norm(role: str) -> Normaliser:
        chosen = [s for s in sequences if s.values[role]]
        return Normaliser(num_tokens=sum(len(s.response) for s in chosen), num_sequences=len(chosen),
                          max_response_len=max_response_len)

    return StepNorms(px=norm("px"), aux=norm("aux"), num_rollouts=num_rollouts)


def make_loss_fn(cfg: RLRunConfig, norms: StepNorms, scale: float):
    """The micro-batch loss: ``L_PX`` (+ ``lam * L_KD|IW``), times ``scale`` for Megatron's reductions."""

    def loss_fn(outputs: dict[str, torch.Tensor], batch: PackedBatch):
        logp = outputs["logp"]
        device = logp.device
        mask = batch.response_mask.to(device)
        values = {k: v.to(device) for k, v in batch.values.items()}
        tokens = {k: v.to(device) for k, v in batch.token_values.items()}
        for name in ("old_logp", "teacher_logp"):  # absent when no sequence of this micro-batch has that role
            tokens.setdefault(name, torch.zeros_like(mask))
        px = policy_loss(logp, tokens["old_logp"], values["advantage"], mask * values["px"][:, None], cfg.rl.loss,
                         norms.px, ref_logp=tokens.get("ref_logp"), entropy=outputs.get("entropy"))
        inputs = DePOInputs(long_logp=logp, mask=mask * values["aux"][:, None], rewards=values["reward"],
                            short_logp=tokens["teacher_logp"], advantages=values["advantage"],
                            full_kl=outputs.get("kd_kl"), num_rollouts=norms.num_rollouts)
        loss, metrics = depo_loss(px, inputs, cfg.depo, norms.aux, aggregation=cfg.rl.loss.aggregation)
        return loss * scale, metrics

    return loss_fn


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


def guarded_update(chunks, optimizer, scheduler, micro_batches: list[PackedBatch], spec: ScoringSpec, loss_fn) -> dict:
    """Forward/backward over the micro-batches, then the optimizer step unless anything is non-finite."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_packed_schedule(chunks, micro_batches, spec, loss_fn, forward_only=False)
    metrics = reduce_reports(reports)
    # fp16: gradients of the scaled loss may overflow; the optimizer's loss scaler then skips the step and
    # lowers the scale (an expected event, reported as 'overflow', not a bad step).
    scaled = bool(config.fp16)
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
