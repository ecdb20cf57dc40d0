"""distill/opd.py: OPD's reverse KL on the student's samples, against float64 references by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lcr.distill.opd import (opd_advantages, reverse_kl_pg_loss, reverse_kl_sampled, topk_reverse_kl)

V = 7


def distributions(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def exact_reverse_kl(student_logits, teacher_logits):
    log_s, log_t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def test_zero_value_and_gradient_when_the_teacher_is_the_student():
    logp = torch.log_softmax(torch.randn(3, 5, V, dtype=torch.float64), -1)[..., 0].clone().requires_grad_()
    teacher = logp.detach().clone()
    top = logp[..., None]  # a one-token "top-k" with its tail
    losses = (reverse_kl_pg_loss(logp, teacher), reverse_kl_sampled(logp, teacher, "k3"),
              topk_reverse_kl(top, teacher[..., None]))
    for value in losses:
        (grad,) = torch.autograd.grad(value.sum(), logp)
        assert value.abs().max() == 0 and grad.abs().max() == 0
    # k1's value is 0 too, but differentiated as a loss its gradient is 1 on every sampled token's
    # log-prob (descent pushes every sampled token down, whatever the teacher says): why the direct
    # loss is the score-function form above, not k1 itself.
    k1 = reverse_kl_sampled(logp, teacher, "k1")
    (grad,) = torch.autograd.grad(k1.sum(), logp)
    assert k1.abs().max() == 0 and torch.equal(grad, torch.ones_like(grad))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_estimate_converges_to_the_exact_reverse_kl(estimator):
    student, teacher = distributions(0)
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    samples = torch.multinomial(log_s.exp(), 400_000, replacement=True, generator=torch.Generator().manual_seed(1))
    est = reverse_kl_sampled(log_s[samples], log_t[samples], estimator)
    stderr = est.std().item() / math.sqrt(samples.numel())
    exact = exact_reverse_kl(student, teacher).item()
    assert exact > 0.1 and est.mean().item() == pytest.approx(exact, abs=5 * stderr)  # stderr ~ 2e-3 here


def test_direct_loss_has_the_reverse_kls_gradient_in_expectation():
    """sum_y s(y) grad[sg(log s(y) - log t(y)) log s(y)] = grad KL(s || t), exactly (no sampling)."""
    student, teacher = distributions(2)
    logits = student.clone().requires_grad_()
    log_s = torch.log_softmax(logits, -1)
    expected = (log_s.exp().detach() * reverse_kl_pg_loss(log_s, torch.log_softmax(teacher, -1))).sum()
    (got,) = torch.autograd.grad(expected, logits)
    (want,) = torch.autograd.grad(exact_reverse_kl(logits, teacher), logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dense_advantages_subtract_coef_times_the_log_ratio():
    adv = torch.tensor([0.5, -1.0])
    s = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    t = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    got = opd_advantages(adv, s, t, coef=0.2)
    assert torch.allclose(got, torch.tensor([[0.5 - 0.2 * 0.5, 0.5 + 0.2 * 1.0], [-1.0, -1.0 + 0.2 * 1.0]]))
    assert not got.requires_grad
    with pytest.raises(ValueError, match="coef must be >= 0"):
        opd_advantages(adv, s, t, coef=-1.0)


def test_topk_with_tail_is_exact_on_the_whole_vocabulary_and_a_lower_bound_otherwise():
    student, teacher = distributions(3)
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    exact = exact_reverse_kl(student, teacher)
    torch.testing.assert_close(topk_reverse_kl(log_s, log_t), exact, rtol=1e-9, atol=1e-9)
    top = torch.topk(log_t, 3).indices
    partial = topk_reverse_kl(log_s[top], log_t[top])
    assert 0 <= partial <= exact


def test_the_tail_term_stops_a_student_from_collapsing_outside_the_teachers_top_k():
    # Teacher: 0.5 and 0.3 on its top-2, 0.2 spread over the rest. Student B keeps 0.9 outside the top-2.
    teacher = torch.tensor([0.5, 0.3], dtype=torch.float64).log()
    matching = teacher.clone()
    collapsed = torch.tensor([0.05, 0.05], dtype=torch.float64).log()
    without = [topk_reverse_kl(s, teacher, tail=False).item() for s in (matching, collapsed)]
    assert without[1] < without[0] == 0  # restricted to the top-k set, leaving it looks *better*
    with_tail = [topk_reverse_kl(s, teacher).item() for s in (matching, collapsed)]
    tail_term = 0.9 * (math.log(0.9) - math.log(0.2))
    assert with_tail[0] == 0 and with_tail[1] == pytest.approx(without[1] + tail_term, rel=1e-9) and with_tail[1] > 1.0


def test_unknown_estimator_is_one_line():
    with pytest.raises(ValueError, match="^unknown reverse-KL estimator 'k2'; valid: 'k1', 'k3'$"):
        reverse_kl_sampled(torch.zeros(1), torch.zeros(1), "k2")
