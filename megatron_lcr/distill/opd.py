"""On-policy distillation (OPD): the per-token reverse KL ``KL(pi_student || pi_teacher)`` on the
student's own samples, as pure functions (issue 15 wires them into objectives).

The student samples ``y_t ~ pi_s(. | y_<t)``; the teacher scores the same tokens. With
``log_r_t = log pi_t(y_t) - log pi_s(y_t)`` two per-token estimators of the reverse KL at that prefix
(Schulman 2020, "Approximating KL Divergence", with the roles of the two models swapped):

- k1 = ``-log_r``: unbiased, can be negative;
- k3 = ``exp(log_r) - 1 - log_r``: unbiased, >= 0, lower variance.

Two ways to train on it:

- as a **dense reward**: per token ``A_t - coef * k1_t`` replaces the sequence's advantage in the
  policy-gradient loss (:func:`opd_advantages`, detached: the teacher's opinion is a reward);
- as a **direct loss** (:func:`reverse_kl_pg_loss`): ``sg(k1_t) * log pi_s(y_t)``. Its gradient
  ``k1_t * grad log pi_s(y_t)`` is, in expectation over the student's samples, the gradient of the
  per-prefix reverse KL (the score-function identity ``E_s[grad log s] = 0`` removes the term the
  estimate's own dependence on theta would add). Differentiating k1 itself would give
  ``-grad log s`` on every sampled token, which is not the KL's gradient.

When only an engine teacher's top-k log-probs are available, :func:`topk_reverse_kl` (and, for the
forward-KL warmup, :func:`topk_forward_kl`) computes the
reverse KL between the two distributions coarsened to the teacher's top-k tokens plus one *tail*
bucket (everything else). Without the tail term the sum runs over the top-k set only, and a student
that puts its mass outside that set lowers the "KL" while moving away from the teacher (the known
collapse); with it, the value is a lower bound of the full KL (data processing) that is exact when
the set covers the vocabulary, and the tail mass the student keeps outside the teacher's set is
penalised at the teacher's tail probability.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_lcr.registry import lookup
from megatron_lcr.rl.losses import LOG_RATIO_CLAMP, upcast


def _log_r(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return (upcast(teacher_logp) - upcast(student_logp)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def reverse_kl_k1(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``log pi_s(y) - log pi_t(y)`` per sampled token (``[B, S] -> [B, S]``)."""
    return -_log_r(student_logp, teacher_logp)


def reverse_kl_k3(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``r - 1 - log r`` with ``r = pi_t(y) / pi_s(y)`` per sampled token; >= 0 (``[B, S] -> [B, S]``)."""
    log_r = _log_r(student_logp, teacher_logp)
    return torch.exp(log_r) - 1.0 - log_r


REVERSE_KL_ESTIMATORS = {"k1": reverse_kl_k1, "k3": reverse_kl_k3}


def reverse_kl_sampled(student_logp: Tensor, teacher_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi_s || pi_t)`` on tokens the student sampled, by ``estimator``."""
    return lookup(REVERSE_KL_ESTIMATORS, estimator, "reverse-KL estimator")(student_logp, teacher_logp)


def opd_advantages(advantages: Tensor, student_logp: Tensor, teacher_logp: Tensor, coef: float) -> Tensor:
    """Dense per-token advantages ``A - coef * (log pi_s - log pi_t)``, detached: ``advantages`` ``[B]``
    or ``[B, S]``, log-probs ``[B, S]`` -> ``[B, S]``."""
    if coef < 0.0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return (upcast(advantages) - coef * reverse_kl_k1(student_logp, teacher_logp)).detach()


def reverse_kl_pg_loss(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-token direct OPD loss ``sg(log pi_s - log pi_t) * log pi_s`` (``[B, S] -> [B, S]``): its value
    is not the KL, its expected gradient over the student's samples is the KL's."""
    return reverse_kl_k1(student_logp, teacher_logp).detach() * upcast(student_logp)


def topk_kl(p_logp_topk: Tensor, q_logp_topk: Tensor, *, tail: bool = True) -> Tensor:
    """``KL(p || q)`` over a set of k tokens plus, with ``tail``, one bucket for the rest: ``[..., k]`` log-probs
    of the same ids under both -> ``[...]``. The tail bucket's probabilities are ``1 - sum(set)`` on each side
    (clamped to a tiny positive value: a side whose set already holds all its mass makes the other's tail
    mass expensive)."""
    log_p, log_q = upcast(p_logp_topk), upcast(q_logp_topk)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if not tail:
        return kl
    tiny = torch.finfo(log_p.dtype).tiny
    p_tail = (1.0 - log_p.exp().sum(dim=-1)).clamp_min(tiny)
    q_tail = (1.0 - log_q.exp().sum(dim=-1)).clamp_min(tiny)
    return kl + p_tail * (p_tail.log() - q_tail.log())


def topk_reverse_kl(student_logp_topk: Tensor, teacher_logp_topk: Tensor, *, tail: bool = True) -> Tensor:
    """``KL(pi_s || pi_t)`` over the teacher's top-k tokens plus, with ``tail``, one bucket for the rest
    (``[..., k]`` log-probs of the teacher's top-k ids, the student's with grad -> ``[...]``)."""
    return topk_kl(student_logp_topk, teacher_logp_topk.detach(), tail=tail)


def topk_forward_kl(student_logp_topk: Tensor, teacher_logp_topk: Tensor, *, tail: bool = True) -> Tensor:
    """``KL(pi_t || pi_s)`` over the teacher's top-k tokens plus, with ``tail``, one bucket for the rest: the
    forward-KL warmup's loss from an engine teacher's top-k (``[..., k]`` -> ``[...]``)."""
    return topk_kl(teacher_logp_topk.detach(), student_logp_topk, tail=tail)
