"""Per-token KL divergences between two distributions over the full (tensor-parallel) vocabulary.

``p = softmax(z_s / temperature)`` is the student, ``q = softmax(z_t / temperature)`` the teacher
(the temperature divides both sides' logits). Kinds:

- ``"forward"``: ``KL(q || p) = sum_j q_j (log q_j - log p_j)``, mode covering; DePO's distillation
  term ``KL(pi(.|x, c_short) || pi(.|x, c_long))`` with the short-context pass as teacher.
- ``"reverse"``: ``KL(p || q)``, mode seeking; on-policy distillation (OPD, dGRPO) on the student's
  own rollouts.
- ``"jsd"``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024),
  ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p``, ``0 < beta < 1``
  (beta = 0.5 is the symmetric JSD; TRL's ``generalized_jsd_loss`` uses the same mixture; its
  beta = 0 / 1 special cases are "forward" / "reverse" here).

Forward and reverse need one pass over the vocabulary: per token the two log-sum-exps and
``a = E_x[z_x - z_y]`` scaled by one side's max, so ``KL = a / S_x - (log Z_x - log Z_y)``, with
``log Z_x - log Z_y = (M_x - M_y) + (log S_x - log S_y)`` (no difference of two large numbers). The
JSD's ``log m`` needs both normalisers first, so it takes a second pass (and, across TP, an all-reduce
of 2 floats per token after the all-gather of 4). When the two distributions are identical every
term is an exact 0 (``z_t - z_s = 0``, ``log(m/p) = log(1 + beta (e^0 - 1)) = 0``), so the KL and
all its gradients are exactly 0.

Gradients flow to every input that requires them (student and teacher; detach the teacher for the
usual stop-gradient). Masked rows (``mask == False``) give KL 0 and zero gradient. The TP and
``d_hidden`` conventions are those of ``logprob.py``. Student and teacher share ``V_local`` and the
dtype; their hidden sizes may differ (a larger teacher).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lcr.kernels.config import KernelConfig, resolve_impl
from megatron_lcr.kernels.logprob import (
    check_hidden_head,
    check_logits,
    check_temperature,
    compacted,
    implementation,
    reduce_hidden_grad,
    scattered,
)
from megatron_lcr.kernels.vocab_parallel import (
    Head,
    gather_across_ranks,
    make_shard,
    merge_kl_partials,
    sum_across_ranks,
)

KL_KINDS = ("forward", "reverse", "jsd")


def kl_from_stats(stats: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged ``[T, 5]`` ``(M_s, S_s, M_t, S_t, a)`` -> ``(kl, logZ_s, logZ_t)``; kl is 0 for "jsd"."""
    m_s, s_s, m_t, s_t, a = stats.unbind(dim=1)
    log_s_s, log_s_t = s_s.log(), s_t.log()
    log_z_s, log_z_t = m_s + log_s_s, m_t + log_s_t
    if kind == "forward":
        kl = a / s_t - ((m_t - m_s) + (log_s_t - log_s_s))
    elif kind == "reverse":
        kl = a / s_s - ((m_s - m_t) + (log_s_s - log_s_t))
    else:
        kl = torch.zeros_like(a)
    return kl, log_z_s.contiguous(), log_z_t.contiguous()


class _KLDivergence(torch.autograd.Function):
    """Student and teacher heads of all-valid rows -> ``kl [T]`` fp32."""

    @staticmethod
    def forward(ctx, h_s, w_s, z_s, h_t, w_t, z_t, shard, kind, beta, inv_temp, config, impl, reduce_grad_hidden):
        ops = implementation(impl)
        student, teacher = Head(hidden=h_s, weight=w_s, logits=z_s), Head(hidden=h_t, weight=w_t, logits=z_t)
        common = {"inv_temp": inv_temp, "n_valid": shard.num_valid, "config": config}
        parts = ops.kl_partials(student, teacher, kind=kind, **common)
        stats = merge_kl_partials(parts, scaled_by_teacher=kind == "forward")
        if shard.group is not None:
            stats = merge_kl_partials(gather_across_ranks(stats, shard), scaled_by_teacher=kind == "forward")
        kl, log_z_s, log_z_t = kl_from_stats(stats, kind)
        if kind == "jsd":
            sums = sum_across_ranks(ops.jsd_sums(student, teacher, log_z_s, log_z_t, beta=beta, **common), shard)
            kl = beta * sums[:, 1] + (1.0 - beta) * sums[:, 0]
            saved = sums
        else:
            saved = torch.stack([kl, torch.zeros_like(kl)], dim=1)
        ctx.save_for_backward(h_s, w_s, z_s, h_t, w_t, z_t, log_z_s, log_z_t, saved)
        ctx.meta = (shard, kind, beta, inv_temp, config, impl, reduce_grad_hidden)
        return kl

    @staticmethod
    def backward(ctx, g):
        h_s, w_s, z_s, h_t, w_t, z_t, log_z_s, log_z_t, saved = ctx.saved_tensors
        shard, kind, beta, inv_temp, config, impl, reduce_grad_hidden = ctx.meta
        need = ctx.needs_input_grad
        needs = (need[0] or need[2], need[1], need[3] or need[5], need[4])
        if not any(needs):
            return (None,) * 13
        (d_hs, d_ws, d_zs), (d_ht, d_wt, d_zt) = implementation(impl).kl_backward(
            Head(hidden=h_s, weight=w_s, logits=z_s), Head(hidden=h_t, weight=w_t, logits=z_t),
            log_z_s, log_z_t, saved, g.float().contiguous(),
            kind=kind, beta=beta, inv_temp=inv_temp, n_valid=shard.num_valid, needs=needs, config=config,
        )  # fmt: skip
        if h_s is not None:
            d_hs = reduce_hidden_grad(d_hs, shard, reduce_grad_hidden, h_s.dtype)
            d_ht = reduce_hidden_grad(d_ht, shard, reduce_grad_hidden, h_t.dtype)
        return (d_hs, d_ws, d_zs, d_ht, d_wt, d_zt) + (None,) * 7


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta} (beta 0 / 1 are kind='forward' / 'reverse')")


def _rows(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Indices of the kept rows, or None when every row is kept."""
    if mask is None:
        return None
    if mask.shape != (num_tokens,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({num_tokens},), got {tuple(mask.shape)} {mask.dtype}")
    return None if bool(mask.all()) else torch.nonzero(mask)[:, 0]


def _kl(student: Head, teacher: Head, *, kind, beta, temperature, mask, shard, reduce_grad_hidden, config):
    _check_kind(kind, beta)
    inv_temp = check_temperature(temperature)
    if student.num_tokens != teacher.num_tokens or student.local_vocab != teacher.local_vocab:
        raise ValueError(
            f"student ({student.num_tokens} tokens x {student.local_vocab} vocab) and teacher "
            f"({teacher.num_tokens} x {teacher.local_vocab}) must have the same tokens and local vocabulary"
        )
    config = config or KernelConfig()
    device = (student.logits if student.from_logits else student.hidden).device
    impl = resolve_impl(config, device)
    rows = _rows(mask, student.num_tokens)
    s, t = compacted(student, rows), compacted(teacher, rows)
    kl = _KLDivergence.apply(
        s.hidden, s.weight, s.logits, t.hidden, t.weight, t.logits,
        shard, kind, float(beta), inv_temp, config, impl, reduce_grad_hidden,
    )  # fmt: skip
    return scattered(kl, rows, student.num_tokens)


def kl_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_start: int = 0,
    valid_vocab_end: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    reduce_grad_hidden: bool = True,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Per-token ``kl [T]`` fp32 between student and teacher heads, logits never materialised.

    student_hidden ``[T, H_s]`` with student_weight ``[V_local, H_s]``; teacher_hidden ``[T, H_t]`` with
    teacher_weight ``[V_local, H_t]``. kind: "forward" ``KL(teacher || student)``, "reverse"
    ``KL(student || teacher)`` or "jsd" (with ``beta``). mask: ``[T]`` bool, False rows give 0.
    Vocabulary sharding and ``reduce_grad_hidden`` as in ``logprob_entropy``.
    """
    check_hidden_head(student_hidden, student_weight, "student ")
    check_hidden_head(teacher_hidden, teacher_weight, "teacher ")
    if student_hidden.dtype != teacher_hidden.dtype:
        raise ValueError(f"student dtype {student_hidden.dtype} differs from teacher dtype {teacher_hidden.dtype}")
    shard = make_shard(student_weight.shape[0], vocab_start, valid_vocab_end, tp_group)
    return _kl(
        Head(hidden=student_hidden, weight=student_weight), Head(hidden=teacher_hidden, weight=teacher_weight),
        kind=kind, beta=beta, temperature=temperature, mask=mask, shard=shard,
        reduce_grad_hidden=reduce_grad_hidden, config=config,
    )  # fmt: skip


def kl_divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_start: int = 0,
    valid_vocab_end: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``kl_divergence`` from this rank's logit columns ``[T, V_local]`` of each side."""
    check_logits(student_logits, "student ")
    check_logits(teacher_logits, "teacher ")
    if student_logits.dtype != teacher_logits.dtype:
        raise ValueError(f"student dtype {student_logits.dtype} differs from teacher dtype {teacher_logits.dtype}")
    shard = make_shard(student_logits.shape[1], vocab_start, valid_vocab_end, tp_group)
    return _kl(
        Head(logits=student_logits), Head(logits=teacher_logits),
        kind=kind, beta=beta, temperature=temperature, mask=mask, shard=shard,
        reduce_grad_hidden=False, config=config,
    )  # fmt: skip
