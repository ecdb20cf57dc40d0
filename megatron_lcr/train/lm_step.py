"""One supervised language-modelling optimizer step on Megatron (next-token cross-entropy).

The step runs Megatron's pipeline schedule over the micro-batches of this data-parallel rank,
reduces gradients over data-parallel ranks (``finalize_model_grads``), and steps the optimizer.
Loss normalisation: each micro-batch contributes its token-mean loss, averaged over micro-batches
and data-parallel ranks, so equal-sized micro-batches give the global-batch token mean whatever the
DP x micro-batch split (the invariance the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_lcr.models.forward import causal_mask
from megatron_lcr.parallel.env import collective_device
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.train.optimizer import begin_update


@dataclass
class MicroBatch:
    """Token ids of one micro-batch and which positions carry loss."""

    input_ids: torch.Tensor
    """``[B, S]`` int64 inputs."""
    labels: torch.Tensor
    """``[B, S]`` int64 next tokens (``input_ids`` shifted left by one)."""
    loss_mask: torch.Tensor
    """``[B, S]`` float, 1 where the label is trained on."""


def micro_batches_from_sequences(tokens: torch.Tensor, micro_batch_size: int) -> list[MicroBatch]:
    """``tokens [N, S+1]`` -> micro-batches of ``[micro_batch_size, S]`` inputs and labels."""
    if tokens.shape[0] % micro_batch_size:
        raise ValueError(f"{tokens.shape[0]} sequences do not split into micro-batches of {micro_batch_size}")
    out = []
    for chunk in tokens.split(micro_batch_size):
        inputs, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        out.append(MicroBatch(inputs, labels, torch.ones_like(labels, dtype=torch.float32)))
    return out


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron loss_func: ``(sum, tokens, report)``; the schedule divides by tokens and micro-batches."""
    mask = loss_mask.to(per_token_loss.device).float()
    total = (per_token_loss.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm_loss": torch.stack([total.detach(), mask.sum().detach()])}


def vocab_masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy ``[B, S]`` from this TP rank's logits ``[B, S, V_padded/tp]``.

    Megatron pads the vocabulary so that TP ranks hold equal slices; the padding columns (logit ~0)
    must not enter the softmax, or every log-prob is off by ~log(1 + pad/V) from the HF model's.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float().masked_fill(padding, float("-inf")), labels)


def lm_forward_step(data_iterator, model, *, vocab_size: int):
    """Megatron forward_step_func; bind ``vocab_size`` (the tokenizer's, unpadded) with functools.partial."""
    from megatron.core.utils import get_attr_wrapped_model

    batch: MicroBatch = next(data_iterator)
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    output = model(input_ids, positions, causal_mask(input_ids.shape[1], device))
    if get_attr_wrapped_model(model, "post_process"):  # logits [B, S, V/tp]; else hidden states for the next stage
        output = vocab_masked_cross_entropy(output, batch.labels.to(device), vocab_size)
    return output, partial(_loss_func, batch.loss_mask)


def reduce_lm_loss(reports: list[dict]) -> float | None:
    """Token-mean loss over this step's micro-batches and all data-parallel ranks.

    Only the last pipeline stage has reports; it returns the loss, other stages return None.
    """
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    totals = torch.stack([r["lm_loss"] for r in reports]).sum(0).float().to(collective_device())
    torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def _run_schedule(chunks, micro_batches: list[MicroBatch], *, vocab_size: int, forward_only: bool) -> list[dict]:
    """Megatron's pipeline schedule over the micro-batches; the loss reports of the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterator = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(lm_forward_step, vocab_size=vocab_size),
        data_iterator=iterator,
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].input_ids.shape[1],
        micro_batch_size=micro_batches[0].input_ids.shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def evaluate_loss(chunks, micro_batches: list[MicroBatch], *, vocab_size: int) -> float | None:
    """Held-out token-mean loss (forward only, through the pipeline schedule); last stage only."""
    for chunk in chunks:
        chunk.eval()
    return reduce_lm_loss(_run_schedule(chunks, micro_batches, vocab_size=vocab_size, forward_only=True))


def lm_train_step(chunks, optimizer, scheduler, micro_batches: list[MicroBatch], *, vocab_size: int,
                  timer: StepTimer | None = None) -> dict:
    """One optimizer step; returns ``{"loss", "grad_norm", "lr", "skipped"}`` (loss on the last stage).
    Timed as the phases ``forward_backward`` and ``optimizer``."""
    timer = timer or StepTimer()
    with timer.phase("forward_backward"):
        begin_update(chunks, optimizer)
        reports = _run_schedule(chunks, micro_batches, vocab_size=vocab_size, forward_only=False)
        loss = reduce_lm_loss(reports)
    with timer.phase("optimizer"):
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
    return {
        "loss": loss,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not updated,
    }
