"""Per-token log-probs and entropies over a (tensor-parallel) vocabulary without materialising logits.

``logp_i = z_{i,y_i} - logsumexp_j z_ij`` and ``H_i = -sum_j p_ij log p_ij`` with
``z = hidden @ weight.T / temperature`` (the temperature divides the logits before the softmax, as
the rollout engine samples), computed by online softmax over vocabulary tiles (Milakov & Gimelshein
2018), saving only ``logZ`` and ``H`` per token for backward and recomputing the logits there: PPO's
clipped loss is not linear in ``logp``, so gradients precomputed in forward (Liger-Kernel's fused
linear cross-entropy) would be wrong for it. The backward uses, per logit,

    d logp_i / d z_ik = 1[k = y_i] - p_ik,      d H_i / d z_ik = -p_ik (log p_ik + H_i).

Masked rows (``labels == ignore_index``) give ``logp = 0``, ``entropy = 0`` and zero gradient; they
are dropped before any vocabulary work, so masked prompt tokens cost nothing.

Tensor parallelism (Megatron's vocab-parallel output layer): each rank holds weight rows
``[vocab_start, vocab_start + V_local)``; rows at or beyond ``valid_vocab_end`` are padding and get
probability 0. The ranks exchange 4 floats per token in one all-gather. Labels must be identical on
all TP ranks. Gradient convention: ``d_weight`` is this rank's shard, complete. ``d_hidden`` is the
sum over ranks of each rank's part: with ``reduce_grad_hidden=True`` (default) the op all-reduces it
itself, which is right when ``hidden`` is the TP-replicated input of the output layer taken *before*
Megatron's ``ColumnParallelLinear`` (whose input-gradient all-reduce is then bypassed). Pass False
when the caller already routes ``hidden`` through ``copy_to_tensor_model_parallel_region`` or, with
sequence parallelism, ``gather_from_sequence_parallel_region`` (whose backward reduce-scatters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lcr.kernels.config import KernelConfig, resolve_impl
from megatron_lcr.kernels.vocab_parallel import (
    IGNORE_INDEX,
    Head,
    VocabShard,
    check_labels,
    gather_across_ranks,
    local_labels,
    logprob_from_stats,
    make_shard,
    merge_logprob_partials,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def implementation(impl: str):
    """The module with ``logprob_partials``, ``logprob_backward``, ``kl_partials``, ... for ``impl``."""
    if impl == "triton":
        from megatron_lcr.kernels import triton_impl  # imported late: TRITON_INTERPRET is read at import

        return triton_impl
    from megatron_lcr.kernels import torch_impl

    return torch_impl


def reduce_hidden_grad(d_hidden: torch.Tensor | None, shard: VocabShard, reduce: bool, dtype: torch.dtype):
    """fp32 partial ``d_hidden`` -> summed over TP ranks (when ``reduce``) in the hidden's dtype."""
    if d_hidden is None:
        return None
    if reduce and shard.group is not None:
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=shard.group)
    return d_hidden.to(dtype)


class _LogprobEntropy(torch.autograd.Function):
    """``(hidden, weight) | logits`` of all-valid rows -> ``(logp [T], entropy [T])`` fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, logits, labels, shard, inv_temp, config, impl, reduce_grad_hidden):
        ctx.set_materialize_grads(False)
        head = Head(hidden=hidden, weight=weight, logits=logits)
        parts = implementation(impl).logprob_partials(
            head, labels, inv_temp=inv_temp, n_valid=shard.num_valid, config=config
        )
        stats = merge_logprob_partials(parts)
        if shard.group is not None:
            stats = merge_logprob_partials(gather_across_ranks(stats, shard))
        logp, entropy, log_z = logprob_from_stats(stats)
        ctx.save_for_backward(hidden, weight, logits, labels, log_z.contiguous(), entropy.contiguous())
        ctx.meta = (shard, inv_temp, config, impl, reduce_grad_hidden)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, logits, labels, log_z, entropy = ctx.saved_tensors
        shard, inv_temp, config, impl, reduce_grad_hidden = ctx.meta
        need_hidden = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        need_weight = ctx.needs_input_grad[1]
        if (g_logp is None and g_entropy is None) or not (need_hidden or need_weight):
            return (None,) * 9
        d_hidden, d_weight, d_logits = implementation(impl).logprob_backward(
            Head(hidden=hidden, weight=weight, logits=logits), labels, log_z, entropy,
            None if g_logp is None else g_logp.float().contiguous(),
            None if g_entropy is None else g_entropy.float().contiguous(),
            inv_temp=inv_temp, n_valid=shard.num_valid,
            need_hidden=need_hidden, need_weight=need_weight, config=config,
        )  # fmt: skip
        if hidden is not None:
            d_hidden = reduce_hidden_grad(d_hidden, shard, reduce_grad_hidden, hidden.dtype)
        return d_hidden, d_weight, d_logits, None, None, None, None, None, None


def check_hidden_head(hidden: torch.Tensor, weight: torch.Tensor, name: str = "") -> None:
    """``hidden [T, H]`` and ``weight [V_local, H]``: 2-D, one float dtype, one device, same H."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}hidden [T, H] and weight [V_local, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}hidden and weight must share a dtype in {FLOAT_DTYPES}, got {hidden.dtype} and {weight.dtype}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{name}hidden is on {hidden.device} but weight on {weight.device}")


def check_logits(logits: torch.Tensor, name: str = "") -> None:
    if logits.dim() != 2 or logits.dtype not in FLOAT_DTYPES:
        got = f"{tuple(logits.shape)} {logits.dtype}"
        raise ValueError(f"{name}logits must be [T, V_local] with a dtype in {FLOAT_DTYPES}, got {got}")


def check_temperature(temperature: float) -> float:
    """``1 / temperature``; the temperature must be a positive finite number."""
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def compacted(head: Head, rows: torch.Tensor | None) -> Head:
    """The head restricted to ``rows`` (differentiable row gathers); unchanged when ``rows`` is None."""
    if rows is None:
        return head
    if head.from_logits:
        return Head(logits=head.logits.index_select(0, rows))
    return Head(hidden=head.hidden.index_select(0, rows), weight=head.weight)


def scattered(values: torch.Tensor, rows: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Per-token values of the kept rows -> ``[num_tokens]`` with zeros at dropped rows (differentiable)."""
    if rows is None:
        return values
    return values.new_zeros(num_tokens).index_copy(0, rows, values)


def _logprob_entropy(head, labels, *, temperature, shard, ignore_index, reduce_grad_hidden, config):
    inv_temp = check_temperature(temperature)
    if labels.shape[0] != head.num_tokens:
        raise ValueError(f"labels has {labels.shape[0]} tokens but the inputs have {head.num_tokens}")
    check_labels(labels, shard, ignore_index)
    config = config or KernelConfig()
    device = labels.device
    impl = resolve_impl(config, device)
    keep = labels != ignore_index
    rows = None if bool(keep.all()) else torch.nonzero(keep)[:, 0]
    kept = compacted(head, rows)
    cols = local_labels(labels if rows is None else labels.index_select(0, rows), shard)
    logp, entropy = _LogprobEntropy.apply(
        kept.hidden, kept.weight, kept.logits, cols, shard, inv_temp, config, impl, reduce_grad_hidden
    )  # fmt: skip
    return scattered(logp, rows, head.num_tokens), scattered(entropy, rows, head.num_tokens)


def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    valid_vocab_end: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduce_grad_hidden: bool = True,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logp [T], entropy [T])`` fp32 of ``softmax(hidden @ weight.T / temperature)``.

    hidden: ``[T, H]`` fp32/bf16/fp16, replicated on the TP ranks. weight: ``[V_local, H]``, this
    rank's rows ``[vocab_start, vocab_start + V_local)`` of the output layer. labels: ``[T]`` global
    token ids or ``ignore_index``. valid_vocab_end: the real vocabulary size (None: no padding; required
    with TP). tp_group: the group the vocabulary is split over, or None. reduce_grad_hidden: all-reduce
    ``d_hidden`` over ``tp_group`` in backward (see the module docstring). Gradients flow to hidden and
    weight from both outputs.
    """
    check_hidden_head(hidden, weight)
    shard = make_shard(weight.shape[0], vocab_start, valid_vocab_end, tp_group)
    return _logprob_entropy(
        Head(hidden=hidden, weight=weight), labels, temperature=temperature, shard=shard,
        ignore_index=ignore_index, reduce_grad_hidden=reduce_grad_hidden, config=config,
    )  # fmt: skip


def logprob_entropy_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    valid_vocab_end: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprob_entropy`` when the logits exist: ``logits [T, V_local]`` is this rank's columns.

    Same semantics (temperature, padding at ``valid_vocab_end``, masked rows, one all-gather across TP);
    the gradient of ``logits`` is this rank's columns and needs no reduction.
    """
    check_logits(logits)
    shard = make_shard(logits.shape[1], vocab_start, valid_vocab_end, tp_group)
    return _logprob_entropy(
        Head(logits=logits), labels, temperature=temperature, shard=shard,
        ignore_index=ignore_index, reduce_grad_hidden=False, config=config,
    )  # fmt: skip
