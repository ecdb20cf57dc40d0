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

When only an engine teacher's top-k log-probs are available, :func:`topk_reverse_kl` computes the
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


def topk_reverse_kl(student_logp_topk: Tensor, teacher_logp_topk: Tensor, *, tail: bool = True) -> Tensor:
    """``KL(pi_s || pi_t)`` over the teacher's top-k tokens plus, with ``tail``, one bucket for the rest.

    ``student_logp_topk`` (with grad), ``teacher_logp_topk``: ``[..., k]``, the two models' log-probs of
    the teacher's top-k token ids at each position -> ``[...]``. The tail bucket's probabilities are
    ``1 - sum(top-k)`` on each side (clamped to a tiny positive value; a teacher whose top-k already
    holds all its mass then makes any student tail mass expensive).
    """
    log_s, log_t = upcast(student_logp_topk), upcast(teacher_logp_topk).detach()
    kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)
    if not tail:
        return kl
    tiny = torch.finfo(log_s.dtype).tiny
    s_tail = (1.0 - log_s.exp().sum(dim=-1)).clamp_min(tiny)
    t_tail = (1.0 - log_t.exp().sum(dim=-1)).clamp_min(tiny)
    return kl + s_tail * (s_tail.log() - t_tail.log())
