"""Per-token log-probs and entropies of packed micro-batches, through Megatron's pipeline schedule.

The policy's log-prob of a response token must be computed exactly as the rollout engine computed
it: from logits divided by the sampling temperature, with Megatron's padded vocabulary rows masked
out (their logits are not part of the model's distribution). Only the positions that predict
response tokens are scored, so the vocabulary-sized work is ``[response tokens, V/tp]``, not
``[L, V/tp]``.

``run_packed_schedule`` drives ``get_forward_backward_func`` over ``PackedBatch`` micro-batches with
any loss function of ``(logp [n, R], entropy [n, R] | None, batch)``; forward-only runs use it to
compute old/reference/teacher log-probs, training runs to back-propagate the RL loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from megatron_lcr.kernels import IGNORE_INDEX, KernelConfig, logprob_entropy_from_logits
from megatron_lcr.train.micro_batches import PackedBatch

# (logp [n, R], entropy [n, R] | None, batch) -> (loss scalar, report dict of tensors)
LossFn = Callable[[torch.Tensor, torch.Tensor | None, PackedBatch], tuple[torch.Tensor, dict]]


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


def response_logp_entropy(logits: torch.Tensor, batch: PackedBatch, spec: ScoringSpec):
    """``logits [1, L, V/tp]`` of this TP rank -> ``(logp [n, R], entropy [n, R] | None)`` in fp32."""
    from megatron.core import parallel_state as ps

    index = batch.response_index.to(logits.device).reshape(-1)
    picked = logits[0].index_select(0, index)  # [n*R, V/tp]
    mask = batch.response_mask.to(logits.device)
    labels = batch.labels[0].to(logits.device).index_select(0, index)
    labels = labels.masked_fill(mask.reshape(-1) == 0, IGNORE_INDEX)  # padding slots: no work, no gradient
    local = picked.shape[-1]
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    logp, entropy = logprob_entropy_from_logits(
        picked, labels, temperature=spec.temperature, vocab_start=ps.get_tensor_model_parallel_rank() * local,
        valid_vocab_end=spec.vocab_size, tp_group=tp_group, config=spec.kernels,
    )
    shape = batch.response_index.shape
    return logp.view(shape) * mask, (entropy.view(shape) * mask if spec.entropy else None)


def _forward_step(data_iterator, model, *, spec: ScoringSpec, loss_fn: LossFn):
    from megatron.core.utils import get_attr_wrapped_model

    batch: PackedBatch = next(data_iterator)
    device = next(model.parameters()).device
    mask, packed = batch.attention_inputs(device, thd=spec.thd)
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    output = model(batch.input_ids.to(device), batch.position_ids.to(device), mask, **kwargs)
    if not get_attr_wrapped_model(model, "post_process"):
        return output, None

    def loss_func(logits):
        logp, entropy = response_logp_entropy(logits, batch, spec)
        loss, report = loss_fn(logp, entropy, batch)
        # Megatron divides a 3-tuple loss by its token count (1 here) and by the number of
        # micro-batches; loss_fn already normalised by global counts, see rl_step.scale_for_megatron.
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


def _collect(logp: torch.Tensor, entropy: torch.Tensor | None, batch: PackedBatch):
    report = {"logp": logp.detach().float().cpu()}
    if entropy is not None:
        report["entropy"] = entropy.detach().float().cpu()
    return logp.new_zeros(()), report


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
