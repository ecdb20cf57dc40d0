"""Per-token log-probs and entropies of packed micro-batches, through Megatron's pipeline schedule.

The policy's log-prob of a response token must be computed exactly as the rollout engine computed
it: from logits divided by the sampling temperature, with Megatron's padded vocabulary rows masked
out (their logits are not part of the model's distribution). Only the positions that predict
response tokens are scored, so the vocabulary-sized work is ``[response tokens, V/tp]``, not
``[L, V/tp]``. With ``from_hidden`` (``lcr train``'s default unless sequence parallelism is on) the
output layer is bypassed: the last stage returns the final hidden states and the fused kernels
multiply the response rows by the output weight tile by tile, so no logits tensor exists at all.

``run_packed_schedule`` drives ``get_forward_backward_func`` over ``PackedBatch`` micro-batches with
any loss function of ``(outputs, batch)``, ``outputs`` holding ``[n, R]`` tensors: ``logp``, and
``entropy`` / ``pair_kl`` when the spec asks for them; forward-only runs use it to compute
old/reference log-probs, training runs to back-propagate the loss.

``pair_kl`` (DePO's exact KD term): for each row that is not a ``POLICY`` view (the long context)
the per-token KL(policy view || this view) over the whole (tensor-parallel) vocabulary, the policy
view being the row of the same rollout in the same micro-batch (``plan_micro_batches``'s ``units``
keep them together), its side detached. Nothing vocabulary-sized outlives the micro-batch: storing
the policy view's distributions would cost ``R x V`` floats per rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from megatron_lcr.data.packing import cu_seqlens
from megatron_lcr.kernels import (IGNORE_INDEX, KernelConfig, kl_divergence, kl_divergence_from_logits, logprob_entropy,
                                  logprob_entropy_from_logits, output_layer_returns_hidden, output_weight)
from megatron_lcr.kernels.topk import token_logits, token_logits_from_logits
from megatron_lcr.parallel.context import (all_gather_cp_for_loss, zigzag_indices_packed, zigzag_merge_packed,
                                           zigzag_split_packed)
from megatron_lcr.rl.sequences import Role, TokenSequence
from megatron_lcr.train.micro_batches import PackedBatch, PackLayout, plan_micro_batches

# ({"logp": [n, R], "entropy"?: [n, R], "pair_kl"?: [n, R]}, batch) -> (loss scalar, report dict of tensors)
LossFn = Callable[[dict[str, torch.Tensor], PackedBatch], tuple[torch.Tensor, dict]]


@dataclass(frozen=True, kw_only=True)
class ScoringSpec:
    """How output logits become per-token values."""

    vocab_size: int
    """The tokenizer's vocabulary (rows at and beyond it are Megatron's padding)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (logits are divided by it)."""
    entropy: bool = False
    """Also compute per-token entropies (costs a second pass over the logits)."""
    thd: bool = False
    """Packed THD attention (Transformer Engine) instead of a block-diagonal mask."""
    kernels: KernelConfig | None = None
    """Log-prob / entropy implementation (None: automatic)."""
    pair_kl: bool = False
    """Also ``pair_kl``: exact KL(policy view || this view) of each non-``POLICY`` row."""
    from_hidden: bool = False
    """The last stage returns the final hidden states and the fused kernels apply the output weight
    tile by tile: no ``[L, V/tp]`` logits tensor exists (``kernels.megatron``)."""
    hidden_rows: bool = False
    """Also ``hidden``: the final hidden states at the response positions (a Megatron teacher's, for
    the exact KL; needs ``from_hidden``)."""
    teacher_kl: str | None = None
    """Also ``teacher_kl``: the exact per-position KL, 'reverse' or 'forward', between the policy and a
    teacher whose hidden states each micro-batch carries (``PackedBatch.teacher_hidden``)."""
    teacher_weight: torch.Tensor | None = None
    """``[V/tp, H_teacher]`` the teacher's output weight (with ``teacher_kl``; same vocabulary shards)."""
    distill_temperature: float | None = None
    """Temperature of the distillation terms when it differs from ``temperature``: ``distill_logp`` (a
    second pass over the vocabulary), ``teacher_kl`` and ``topk_logp`` are taken at it; None: at ``temperature``."""
    teacher_topk: bool = False
    """Also ``topk_logp``: the policy's log-probs of the token ids each micro-batch carries as
    ``PackedBatch.teacher_topk_ids`` (an engine teacher's top-k), ``[n, R, k]``."""

    @property
    def kl_temperature(self) -> float:
        return self.temperature if self.distill_temperature is None else self.distill_temperature


@dataclass(frozen=True)
class Head:
    """The last stage's output: logits ``[1, L, V/tp]``, or hidden ``[1, L, H]`` + weight ``[V/tp, H]``."""

    output: torch.Tensor
    weight: torch.Tensor | None = None

    @property
    def local_vocab(self) -> int:
        return self.output.shape[-1] if self.weight is None else self.weight.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``[len(index), V/tp or H]``: the output at row positions ``index``."""
        return self.output[0].index_select(0, index)

    def logp_entropy(self, rows: torch.Tensor, labels: torch.Tensor, **kwargs):
        if self.weight is None:
            return logprob_entropy_from_logits(rows, labels, **kwargs)
        return logprob_entropy(rows, self.weight, labels, **kwargs)

    def forward_kl(self, student: torch.Tensor, teacher: torch.Tensor, **kwargs) -> torch.Tensor:
        """KL(teacher || student) per row; the teacher side (rows and weight) detached."""
        if self.weight is None:
            return kl_divergence_from_logits(student, teacher.detach(), kind="forward", **kwargs)
        return kl_divergence(student, self.weight, teacher.detach(), self.weight.detach(), kind="forward", **kwargs)


def pair_rows(batch: PackedBatch) -> tuple[list[int], list[int]]:
    """``(student rows, teacher rows)``: each non-``POLICY`` row and the ``POLICY`` row of its rollout."""
    policy, rollout = (batch.role == int(Role.POLICY)).tolist(), batch.rollout.tolist()
    teacher_of = {r: k for k, (p, r) in enumerate(zip(policy, rollout)) if p}
    students = [k for k, p in enumerate(policy) if not p]
    lost = [int(rollout[k]) for k in students if rollout[k] not in teacher_of]
    if lost:
        raise ValueError(f"rollouts {lost}: a view has no POLICY row of its rollout in its micro-batch")
    return students, [teacher_of[rollout[k]] for k in students]


def response_outputs(head: Head, batch: PackedBatch, spec: ScoringSpec) -> dict[str, torch.Tensor]:
    """This TP rank's ``head`` -> fp32 ``[n, R]`` ``logp`` (+ ``entropy``, ``pair_kl``).

    Under context parallelism ``head`` holds this CP rank's ``L/cp`` positions (``cp_response_outputs``).
    """
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        return cp_response_outputs(head, batch, spec, group=ps.get_context_parallel_group())
    device = head.output.device
    index = batch.response_index.to(device).reshape(-1)
    picked = head.rows(index)  # [n*R, V/tp or H]
    mask = batch.response_mask.to(device)
    labels = batch.labels[0].to(device).index_select(0, index)
    labels = labels.masked_fill(mask.reshape(-1) == 0, IGNORE_INDEX)  # padding slots: no work, no gradient
    shard = _vocab_shard(head.local_vocab, spec)
    logp, entropy = head.logp_entropy(picked, labels, temperature=spec.temperature, **shard)
    shape = batch.response_index.shape
    out = {"logp": logp.view(shape) * mask}
    if spec.entropy:
        out["entropy"] = entropy.view(shape) * mask
    if spec.pair_kl:
        out["pair_kl"] = _pair_kl(head, picked.view(*shape, -1), mask, batch, spec, shard)
    distill = logp
    if spec.distill_temperature is not None:
        distill, _ = head.logp_entropy(picked, labels, temperature=spec.distill_temperature, **shard)
        out["distill_logp"] = distill.view(shape) * mask
    if spec.teacher_topk and batch.teacher_topk_ids is not None:
        topk = _topk_logp(head, picked, labels, distill, batch.teacher_topk_ids.to(device), spec, shard)
        out["topk_logp"] = topk * mask[..., None]
    if spec.hidden_rows:
        out["hidden"] = picked.view(*shape, -1)
    if spec.teacher_kl and batch.teacher_hidden is not None:
        out["teacher_kl"] = _teacher_kl(head, picked, mask, batch.teacher_hidden, spec, shard)
    return out


def _vocab_shard(local: int, spec: ScoringSpec) -> dict:
    """The fused ops' vocabulary arguments for this TP rank's ``local`` vocabulary rows."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    return {"vocab_start": ps.get_tensor_model_parallel_rank() * local, "valid_vocab_end": spec.vocab_size,
            "tp_group": tp_group, "config": spec.kernels}


def cp_response_outputs(head: Head, batch: PackedBatch, spec: ScoringSpec, *, group) -> dict[str, torch.Tensor]:
    """``response_outputs`` from this CP rank's zigzag part of the row (``head`` at ``L/cp`` positions).

    Per-token values are computed on the local positions that predict a response token (the rest
    are skipped as ignored labels), gathered over ``group`` with ``all_gather_cp_for_loss`` (every CP
    rank then computes the same loss; each back-propagates its own tokens) and laid out as ``[n, R]``.
    ``pair_kl`` needs two rows' full distributions at once, which sit on different CP ranks: refused.
    """
    if spec.pair_kl or spec.teacher_kl or spec.hidden_rows or spec.distill_temperature is not None or spec.teacher_topk:
        raise ValueError("an exact KL over the vocabulary (depo.kd_estimator='full', a Megatron teacher's KL), an "
                         "engine teacher's top-k KL or a second distillation temperature is not available with "
                         "context parallelism (cp > 1)")
    cp, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    device = head.output.device
    offsets = cu_seqlens(batch.lengths)
    here = zigzag_indices_packed(offsets, cp, rank).to(device)
    mask = batch.response_mask.to(device)
    index = batch.response_index.to(device)
    predicts = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool, device=device)
    predicts[index[mask > 0]] = True
    labels = batch.labels[0].to(device).masked_fill(~predicts, IGNORE_INDEX).index_select(0, here)
    logp, entropy = head.logp_entropy(head.output[0], labels, temperature=spec.temperature,
                                      **_vocab_shard(head.local_vocab, spec))

    def whole_row(local: torch.Tensor) -> torch.Tensor:
        row = zigzag_merge_packed(all_gather_cp_for_loss(local, group), offsets, cp, dim=0)
        return row.index_select(0, index.reshape(-1)).view(index.shape) * mask

    out = {"logp": whole_row(logp)}
    if spec.entropy:
        out["entropy"] = whole_row(entropy)
    return out


def _pair_kl(head: Head, picked: torch.Tensor, mask: torch.Tensor, batch: PackedBatch, spec: ScoringSpec,
             shard: dict) -> torch.Tensor:
    """``[n, R]`` KL(teacher || student) on student rows (0 elsewhere); a pair shares its response.

    ``picked``: ``[n, R, V/tp or H]`` the head's rows at the response positions.
    """
    students, teachers = pair_rows(batch)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if not students:
        return out
    s_rows = torch.tensor(students, device=picked.device)
    t_rows = torch.tensor(teachers, device=picked.device)
    width = picked.shape[-1]
    kl = head.forward_kl(picked[s_rows].reshape(-1, width), picked[t_rows].reshape(-1, width),
                         temperature=spec.temperature, mask=mask[s_rows].reshape(-1) > 0, **shard)
    return out.index_put((s_rows,), kl.view(len(students), -1) * mask[s_rows])


def _topk_logp(head: Head, picked: torch.Tensor, labels: torch.Tensor, label_logp: torch.Tensor, ids: torch.Tensor,
               spec: ScoringSpec, shard: dict) -> torch.Tensor:
    """``[n, R, k]`` the policy's log-probs of ``ids`` ``[n, R, k]`` at the distillation temperature: their
    logits minus the position's log-sum-exp, which is the label's logit minus its log-prob ``label_logp``
    (the fused op's, so the log-sum-exp's gradient comes from it: no ``[tokens, V]`` tensor either way)."""
    n, width, k = ids.shape
    wanted = torch.cat([ids.reshape(n * width, k), labels.clamp_min(0)[:, None]], dim=1)
    where = {"temperature": spec.kl_temperature, "vocab_start": shard["vocab_start"],
             "valid_vocab_end": shard["valid_vocab_end"], "tp_group": shard["tp_group"]}
    logits = (token_logits_from_logits(picked, wanted, **where) if head.weight is None
              else token_logits(picked, head.weight, wanted, **where))
    log_z = logits[:, -1] - label_logp
    return (logits[:, :-1] - log_z[:, None]).view(n, width, k)


def _teacher_kl(head: Head, picked: torch.Tensor, mask: torch.Tensor, teacher_hidden: torch.Tensor,
                spec: ScoringSpec, shard: dict) -> torch.Tensor:
    """``[n, R]`` exact KL (``spec.teacher_kl``) between the policy's rows ``picked`` ``[n*R, H]`` and the
    teacher's hidden states ``[n, R, H_t]`` times its output weight; the teacher's side is detached."""
    if head.weight is None:
        raise ValueError("a Megatron teacher's exact KL needs the hidden-state path (trainer.logprobs_from: hidden/auto "
                         "without sequence parallelism)")
    teacher = teacher_hidden.to(device=picked.device, dtype=picked.dtype).reshape(-1, teacher_hidden.shape[-1])
    kl = kl_divergence(picked, head.weight, teacher.detach(), spec.teacher_weight.detach(), kind=spec.teacher_kl,
                       temperature=spec.kl_temperature, mask=mask.reshape(-1) > 0, **shard)
    return kl.view(mask.shape) * mask


def _forward_step(data_iterator, model, *, spec: ScoringSpec, loss_fn: LossFn):
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    batch: PackedBatch = next(data_iterator)
    device = next(model.parameters()).device
    mask, packed = batch.attention_inputs(device, thd=spec.thd)
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    input_ids, position_ids = batch.input_ids, batch.position_ids
    cp = ps.get_context_parallel_world_size()
    if cp > 1:  # this rank's zigzag part of every packed sequence; cu_seqlens stay those of the whole row
        offsets, rank = cu_seqlens(batch.lengths), ps.get_context_parallel_rank()
        input_ids = zigzag_split_packed(input_ids, offsets, cp, rank)
        position_ids = zigzag_split_packed(position_ids, offsets, cp, rank)
    last_stage = get_attr_wrapped_model(model, "post_process")
    with output_layer_returns_hidden(model) if spec.from_hidden and last_stage else contextlib.nullcontext():
        output = model(input_ids.to(device), position_ids.to(device), mask, **kwargs)
    if not last_stage:
        return output, None

    def loss_func(output):
        head = Head(output, output_weight(model)) if spec.from_hidden else Head(output)
        loss, report = loss_fn(response_outputs(head, batch, spec), batch)
        # Megatron divides a 3-tuple loss by its token count (1 here) and by the number of
        # micro-batches; loss_fn already normalised by global counts, see train.rl.update.gradient_scale.
        return loss, torch.ones((), dtype=torch.int), report

    return output, loss_func


def run_packed_schedule(chunks, micro_batches: list[PackedBatch], spec: ScoringSpec, loss_fn: LossFn, *,
                        forward_only: bool) -> list[dict]:
    """Megatron's schedule over packed micro-batches; the last stage's reports, in micro-batch order."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterator = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, spec=spec, loss_fn=loss_fn),
        data_iterator=iterator,
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].input_ids.shape[1],
        micro_batch_size=1,
        forward_only=forward_only,
    )


def _collect(outputs: dict[str, torch.Tensor], batch: PackedBatch):
    report = {name: value.detach().float().cpu() for name, value in outputs.items()}
    return outputs["logp"].new_zeros(()), report


@torch.no_grad()
def score_sequences(chunks, micro_batches: list[PackedBatch], spec: ScoringSpec) -> dict[int, dict[str, list[float]]]:
    """Forward-only per-token values: ``{sequence id: {"logp": [...], "entropy": [...]}}``.

    Returned on the last pipeline stage (the other stages get ``{}``; broadcast if they need it).
    """
    for chunk in chunks:
        chunk.eval()
    reports = run_packed_schedule(chunks, micro_batches, spec, _collect, forward_only=True)
    out: dict[int, dict[str, list[float]]] = {}
    for batch, report in zip(micro_batches, reports):
        lengths = batch.response_mask.sum(1).long().tolist()
        for k, seq_id in enumerate(batch.sequence_ids):
            out[seq_id] = {name: values[k, :lengths[k]].tolist() for name, values in report.items()}
    return out


def _gather_scores(local: dict[int, dict[str, list[float]]]) -> dict[int, dict[str, list[float]]]:
    """Merge per-rank score dicts (last pipeline stages hold them, one share per DP rank) on every rank."""
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local)
    merged: dict[int, dict[str, list[float]]] = {}
    for part in everyone:
        merged.update(part)
    return merged


def score(chunks, sequences: list[TokenSequence], spec: ScoringSpec, *, token_budget: int,
          fixed_length: bool, layout: PackLayout = PackLayout()) -> list[list[float]]:
    """Forward-only per-token log-probs of each of ``sequences``, on every rank."""
    from megatron.core import parallel_state as ps

    batches = plan_micro_batches(sequences, token_budget=token_budget, dp_size=ps.get_data_parallel_world_size(),
                                 dp_rank=ps.get_data_parallel_rank(), pad_id=0, fixed_length=fixed_length,
                                 layout=layout)
    local = score_sequences(chunks, batches, spec) if batches else {}
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True)
    scores = _gather_scores(local if keep else {})
    return [scores[j]["logp"] for j in range(len(sequences))]
