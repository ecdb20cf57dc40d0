"""Logits of a few chosen token ids per row over a (tensor-parallel) vocabulary, without ``[T, V]`` logits.

``token_logits(hidden, weight, ids)[i, j] = hidden_i . weight[ids_ij] / temperature``: what an engine
teacher's top-k distillation needs from the student (its logits at the teacher's top-k ids; the
log-probs follow with the row's log-sum-exp, which the fused log-prob op already has). The work is
``T x k x H``, done in row chunks whose gathered weight rows are freed at once: backward recomputes
them instead of autograd keeping ``[T, k, H]`` alive.

Tensor parallelism: each rank holds weight rows ``[vocab_start, vocab_start + V_local)``; an id
outside them contributes 0 on that rank and the partial logits are summed over the group (``k`` floats
per row). Gradients follow the fused log-prob op's convention (``kernels.logprob``): ``d_weight`` is
this rank's rows, complete; ``d_hidden`` is all-reduced over the group inside the op when
``reduce_grad_hidden`` (the hidden states taken before Megatron's output layer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lcr.kernels.logprob import check_hidden_head, check_logits, check_temperature, reduce_hidden_grad
from megatron_lcr.kernels.vocab_parallel import make_shard

ROW_CHUNK = 1024
"""Rows per chunk: bounds the gathered weight rows held at once to ``ROW_CHUNK x k x H``."""


def _local(ids: torch.Tensor, start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row of each id in this shard (0 if elsewhere), float mask of ids in this shard)``."""
    rows = ids - start
    here = (rows >= 0) & (rows < local)
    return rows.clamp(0, local - 1), here


class _TokenLogits(torch.autograd.Function):
    """``hidden [T, H], weight [V_local, H], ids [T, k]`` -> this rank's partial logits ``[T, k]`` fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, start, inv_temp, shard, reduce_grad_hidden):
        rows, here = _local(ids, start, weight.shape[0])
        out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        for lo in range(0, ids.shape[0], ROW_CHUNK):
            w = weight[rows[lo:lo + ROW_CHUNK]].float()  # [c, k, H]
            out[lo:lo + ROW_CHUNK] = torch.einsum("ch,ckh->ck", hidden[lo:lo + ROW_CHUNK].float(), w)
        ctx.save_for_backward(hidden, weight, rows, here)
        ctx.meta = (inv_temp, shard, reduce_grad_hidden)
        return out * here * inv_temp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, rows, here = ctx.saved_tensors
        inv_temp, shard, reduce_grad_hidden = ctx.meta
        g = grad.float() * here * inv_temp  # [T, k]; ids of other shards get no gradient here
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for lo in range(0, rows.shape[0], ROW_CHUNK):
            g_c, rows_c = g[lo:lo + ROW_CHUNK], rows[lo:lo + ROW_CHUNK]
            if d_hidden is not None:
                d_hidden[lo:lo + ROW_CHUNK] = torch.einsum("ck,ckh->ch", g_c, weight[rows_c].float())
            if d_weight is not None:
                outer = g_c[:, :, None] * hidden[lo:lo + ROW_CHUNK].float()[:, None, :]  # [c, k, H]
                d_weight.index_add_(0, rows_c.reshape(-1), outer.reshape(-1, hidden.shape[1]))
        d_hidden = reduce_hidden_grad(d_hidden, shard, reduce_grad_hidden, hidden.dtype)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group; backward: identity (each rank's part gets the gradient)."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _checked_ids(ids: torch.Tensor, rows: int, valid_vocab_end: int | None) -> None:
    if ids.dim() != 2 or ids.shape[0] != rows or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [T, k] with T = {rows}, got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or (valid_vocab_end is not None and int(ids.max()) >= valid_vocab_end)):
        raise ValueError(f"ids must lie in [0, {valid_vocab_end}), got [{int(ids.min())}, {int(ids.max())}]")


def token_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                 vocab_start: int = 0, valid_vocab_end: int | None = None, tp_group: dist.ProcessGroup | None = None,
                 reduce_grad_hidden: bool = True) -> torch.Tensor:
    """``[T, k]`` fp32 logits ``hidden @ weight[ids].T / temperature`` over the whole vocabulary (summed over
    ``tp_group``); ``weight`` is this rank's ``[V_local, H]`` rows starting at global id ``vocab_start``."""
    check_hidden_head(hidden, weight)
    _checked_ids(ids, hidden.shape[0], valid_vocab_end)
    shard = make_shard(weight.shape[0], vocab_start, valid_vocab_end, tp_group)
    partial = _TokenLogits.apply(hidden, weight, ids, vocab_start, check_temperature(temperature), shard,
                                 reduce_grad_hidden)
    return partial if shard.group is None else _SumOverRanks.apply(partial, shard.group)


def token_logits_from_logits(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                             vocab_start: int = 0, valid_vocab_end: int | None = None,
                             tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``[T, k]`` fp32 ``logits[ids] / temperature`` when this rank holds logit columns ``[T, V_local]``."""
    check_logits(logits)
    _checked_ids(ids, logits.shape[0], valid_vocab_end)
    shard = make_shard(logits.shape[1], vocab_start, valid_vocab_end, tp_group)
    rows, here = _local(ids, vocab_start, logits.shape[1])
    partial = logits.gather(1, rows).float() * here * check_temperature(temperature)
    return partial if shard.group is None else _SumOverRanks.apply(partial, shard.group)
