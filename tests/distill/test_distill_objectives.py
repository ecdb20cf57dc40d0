"""distill/objectives.py: OPD, dGRPO and the forward-KL warmup on hand-built micro-batches, against
float64 references computed here (not through the objectives' own helpers)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_lcr.distill.config import FKLConfig, OPDConfig, TeacherConfig
from megatron_lcr.distill.objectives import DGRPO, DistillNorms, ForwardKLWarmup, OnPolicyDistillation
from megatron_lcr.rl.losses import Normaliser, PolicyLossConfig
from megatron_lcr.rl.objective import Needs, PolicyGradient
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch

# Rows: 0, 1 POLICY in the PG loss; 2 POLICY left out of it (in_loss 0); 3 a LONG_CONTEXT view (never OPD's).
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64)
ROLE = torch.tensor([0, 0, 0, 1])
IN_LOSS = torch.tensor([1.0, 1, 0, 1], dtype=torch.float64)
ADV = torch.tensor([0.5, -1.0, 2.0, 0.7], dtype=torch.float64)
POLICY_ROWS = MASK * (ROLE == 0).double()[:, None]  # OPD's tokens: every POLICY row, in_loss or not
PG_ROWS = POLICY_ROWS * IN_LOSS[:, None]  # the PG term's tokens
LAM = 0.3


def norm(mask: torch.Tensor) -> Normaliser:
    # Global counts larger than this micro-batch's (other micro-batches hold the rest of the update).
    return Normaliser(num_tokens=int(mask.sum()) + 5, num_sequences=int(mask.any(-1).sum()) + 2, max_response_len=8)


def distill_norms() -> DistillNorms:
    return DistillNorms(pg=norm(PG_ROWS), all=norm(POLICY_ROWS))


def make_batch(seed: int = 0, *, same_teacher: bool = False, old_is_logp: bool = False, teacher_kl: bool = False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 * MASK).requires_grad_()
    teacher = logp.detach().clone() if same_teacher else -torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 * MASK
    old = logp.detach().clone() if old_is_logp else (logp.detach() + 0.3 * torch.randn(4, 4, generator=g,
                                                                                        dtype=torch.float64)) * MASK
    kl = (torch.rand(4, 4, generator=g, dtype=torch.float64) * MASK).requires_grad_() if teacher_kl else None
    return TokenBatch(logp=logp, mask=MASK, role=ROLE, rollout=torch.arange(4.0), reward=torch.ones(4), advantage=ADV,
                      in_loss=IN_LOSS, old_logp=old, teacher_logp=teacher, teacher_kl=kl)


def policy(aggregation: str = "token-mean", **loss) -> PolicyGradient:
    return PolicyGradient(PolicyLossConfig(name="ppo", aggregation=aggregation, **loss), max_response_len=8)


def grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g


def ppo_by_hand(logp, old, adv_tokens, mask, num_tokens, eps=0.2):
    """Token-mean of ``-min(r A, clip(r, 1-eps, 1+eps) A)`` over ``mask``, float64, element by element."""
    total = 0.0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r, a = float(torch.exp(logp[b, t] - old[b, t])), float(adv_tokens[b, t])
                total += -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
    return total / num_tokens


# --------------------------------------------------------------------------- OPD as a loss


def test_opd_k1_loss_is_the_score_function_term_over_every_policy_row():
    batch, norms = make_batch(), distill_norms()
    opd = OnPolicyDistillation(policy(), OPDConfig(lam=LAM, mode="loss", estimator="k1"))
    loss, metrics = opd.loss(batch, norms)
    logp, teacher = batch.logp.detach(), batch.teacher_logp
    n = norms.all.num_tokens
    want = LAM * ((logp - teacher) * logp * POLICY_ROWS).sum() / n
    assert loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad(loss, batch.logp), LAM * (logp - teacher) * POLICY_ROWS / n, rtol=1e-12, atol=1e-15)
    assert metrics["opd/kl"].item() == pytest.approx((((logp - teacher) * POLICY_ROWS).sum() / n).item(), rel=1e-12)
    assert metrics["loss"].item() == pytest.approx(want.item(), rel=1e-12)


def test_opd_loss_and_gradient_vanish_when_the_teacher_is_the_student():
    batch = make_batch(1, same_teacher=True)
    loss, _ = OnPolicyDistillation(policy(), OPDConfig(lam=LAM)).loss(batch, distill_norms())
    assert loss.item() == 0.0 and grad(loss, batch.logp).abs().max().item() == 0.0


def test_opd_full_is_the_token_mean_of_teacher_kl_and_its_gradient_flows_only_there():
    batch, norms = make_batch(2, teacher_kl=True), distill_norms()
    opd = OnPolicyDistillation(policy(), OPDConfig(lam=LAM, estimator="full"))
    # The exact KL takes the teacher's hidden states, not its log-probs; the loss has no importance ratio.
    assert opd.needs == Needs(old=False, teacher=False, teacher_kl="reverse")
    loss, metrics = opd.loss(batch, norms)
    n = norms.all.num_tokens
    want = LAM * (batch.teacher_kl.detach() * POLICY_ROWS).sum() / n
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.teacher_kl), LAM * POLICY_ROWS / n, rtol=1e-12, atol=0)
    assert grad(loss, batch.logp).abs().max().item() == 0.0
    assert metrics["opd/kl"].item() == pytest.approx(want.item() / LAM, rel=1e-12)


def test_opd_alone_needs_a_teacher_and_what_the_policy_loss_needs():
    assert OnPolicyDistillation(policy(), OPDConfig()).needs == Needs(old=False, teacher=True)
    # As a reward it runs through the clipped loss (old log-probs); dGRPO always has the policy loss's ratio.
    assert OnPolicyDistillation(policy(), OPDConfig(mode="reward")).needs == Needs(teacher=True)
    assert DGRPO(policy(), OPDConfig()).needs == Needs(teacher=True)
    needs = OnPolicyDistillation(policy(kl_coef=0.1, entropy_coef=0.01), OPDConfig()).needs
    assert needs == Needs(old=False, ref=True, entropy=True, teacher=True)


def topk_batch(seed: int, k: int = 3, *, same_teacher: bool = False) -> TokenBatch:
    """A batch whose ``topk_logp`` / ``teacher_topk_logp`` are k of k + 2 outcomes of random distributions."""
    g = torch.Generator().manual_seed(seed)

    def top(shape):
        return torch.log_softmax(torch.randn(*shape, k + 2, generator=g, dtype=torch.float64) * 2, dim=-1)[..., :k]

    student = top((4, 4)).requires_grad_()
    teacher = student.detach().clone() if same_teacher else top((4, 4))
    return replace(make_batch(seed), topk_logp=student, teacher_topk_logp=teacher)


def topk_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position the KL over the top-k outcomes plus the tail bucket, and its derivative with respect
    to each student log-prob: ``s_i * ((log s_i - log t_i) - (log s_tail - log t_tail))``."""
    kl, d = torch.zeros(student.shape[:2], dtype=torch.float64), torch.zeros_like(student)
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            s, q = student[b, t].exp(), teacher[b, t].exp()
            s_tail, q_tail = 1 - s.sum(), 1 - q.sum()
            kl[b, t] = (s * (s.log() - q.log())).sum() + s_tail * (s_tail.log() - q_tail.log())
            d[b, t] = s * ((s.log() - q.log()) - (s_tail.log() - q_tail.log()))
    return kl, d


def test_opd_topk_is_the_token_mean_of_the_set_kl_with_its_exact_gradient():
    batch, norms = topk_batch(3), distill_norms()
    opd = OnPolicyDistillation(policy(), OPDConfig(lam=LAM, estimator="topk", top_k=3))
    assert opd.needs == Needs(old=False, teacher=False, teacher_topk=3)
    loss, metrics = opd.loss(batch, norms)
    kl, d = topk_kl_by_hand(batch.topk_logp.detach(), batch.teacher_topk_logp)
    n = norms.all.num_tokens
    assert loss.item() == pytest.approx(LAM * (kl * POLICY_ROWS).sum().item() / n, rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.topk_logp), LAM * d * POLICY_ROWS[..., None] / n, rtol=1e-10, atol=1e-15)
    assert grad(loss, batch.logp).abs().max().item() == 0.0  # nothing through the sampled token
    mass = (batch.teacher_topk_logp.exp().sum(-1) * POLICY_ROWS).sum() / n
    assert metrics["opd/teacher_topk_mass"].item() == pytest.approx(mass.item(), rel=1e-12)


def test_fkl_topk_is_the_token_mean_of_the_forward_set_kl_with_its_exact_gradient():
    batch, norms = topk_batch(5), norm(PG_ROWS)
    fkl = ForwardKLWarmup(policy(), FKLConfig(estimator="topk", top_k=3))
    assert fkl.needs == Needs(old=False, teacher_rollouts=True, teacher_topk=3)
    loss, metrics = fkl.loss(batch, norms)
    mask = batch.token_mask(Role.POLICY)
    s, t = batch.topk_logp.detach().exp(), batch.teacher_topk_logp.exp()
    s_tail, t_tail = 1 - s.sum(-1), 1 - t.sum(-1)
    kl = (t * (t.log() - s.log())).sum(-1) + t_tail * (t_tail.log() - s_tail.log())  # KL(teacher || student)
    # d/d log s_i: -t_i + s_i * t_tail / s_tail (the tail's log depends on every s_i)
    d = -t + s * (t_tail / s_tail)[..., None]
    n = norms.num_tokens
    assert loss.item() == pytest.approx((kl * mask).sum().item() / n, rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.topk_logp), d * mask[..., None] / n, rtol=1e-10, atol=1e-15)
    assert metrics["fkl/kl"].item() == pytest.approx(loss.item(), rel=1e-12)
    assert metrics["fkl/teacher_topk_mass"].item() == pytest.approx((t.sum(-1) * mask).sum().item() / n, rel=1e-12)


def test_opd_topk_loss_and_gradient_vanish_when_the_teacher_is_the_student():
    batch = topk_batch(4, same_teacher=True)
    loss, _ = OnPolicyDistillation(policy(), OPDConfig(lam=LAM, estimator="topk", top_k=3)).loss(batch, distill_norms())
    assert abs(loss.item()) < 1e-15 and grad(loss, batch.topk_logp).abs().max().item() < 1e-15


# --------------------------------------------------------------------------- OPD as a reward


def k_by_hand(logp, teacher, estimator):
    log_r = teacher - logp
    return -log_r if estimator == "k1" else torch.exp(log_r) - 1 - log_r


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_opd_reward_at_ratio_one_is_minus_the_mean_dense_advantage(estimator):
    batch, norms = make_batch(3, old_is_logp=True), distill_norms()
    loss, _ = OnPolicyDistillation(policy(), OPDConfig(lam=LAM, mode="reward", estimator=estimator)).loss(batch, norms)
    logp = batch.logp.detach()
    # OPD alone: only the dense reward -lam * k on every policy row, no task advantage.
    adv = -LAM * k_by_hand(logp, batch.teacher_logp, estimator)
    n = norms.all.num_tokens
    want = -(adv * POLICY_ROWS).sum() / n
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.logp), -adv * POLICY_ROWS / n, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("kind", [OnPolicyDistillation, DGRPO])
def test_opd_reward_is_the_clipped_loss_with_dense_advantages(estimator, kind):
    batch, norms = make_batch(4), distill_norms()
    loss, _ = kind(policy(), OPDConfig(lam=LAM, mode="reward", estimator=estimator)).loss(batch, norms)
    logp = batch.logp.detach()
    adv = -LAM * k_by_hand(logp, batch.teacher_logp, estimator)
    ratios = torch.exp(logp - batch.old_logp)[POLICY_ROWS.bool()]
    assert ((ratios < 0.8) | (ratios > 1.2)).any()  # some tokens are clipped
    want = ppo_by_hand(logp, batch.old_logp, adv, POLICY_ROWS, norms.all.num_tokens)
    if kind is DGRPO:  # plus the task's clipped loss on the rows in the PG term, over their own count
        want += ppo_by_hand(logp, batch.old_logp, ADV[:, None].expand_as(logp), PG_ROWS,
                            norms.pg.num_tokens)
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_dgrpo_reward_mode_at_lam_zero_is_exactly_the_policy_loss():
    batch, norms = make_batch(6), distill_norms()
    loss, _ = DGRPO(policy(), OPDConfig(lam=0.0, mode="reward")).loss(batch, norms)
    pg_loss, _ = policy().loss(batch, norms.pg)
    assert loss.item() == pytest.approx(pg_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.logp), grad(pg_loss, batch.logp), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- dGRPO


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_dgrpo_is_the_policy_loss_plus_lam_times_opd_on_every_policy_row(aggregation):
    batch, norms = make_batch(5), distill_norms()
    pg = policy(aggregation)
    loss, metrics = DGRPO(pg, OPDConfig(lam=LAM)).loss(batch, norms)
    pg_loss, _ = pg.loss(batch, norms.pg)
    logp, teacher = batch.logp.detach(), batch.teacher_logp
    term = (logp - teacher) * logp * POLICY_ROWS
    if aggregation == "token-mean":
        opd = term.sum() / norms.all.num_tokens
    else:
        opd = (term.sum(-1) / POLICY_ROWS.sum(-1).clamp_min(1)).sum() / norms.all.num_sequences
    assert loss.item() == pytest.approx((pg_loss + LAM * opd).item(), rel=1e-12)
    assert metrics["opd/loss"].item() == pytest.approx(LAM * opd.item(), rel=1e-12)
    # The PG term is PPO on rows 0 and 1 only (by hand): row 2 (in_loss 0) and row 3 (long view) are out.
    if aggregation == "token-mean":
        adv = ADV[:, None].expand(4, 4)
        assert pg_loss.item() == pytest.approx(ppo_by_hand(logp, batch.old_logp, adv, PG_ROWS, norms.pg.num_tokens),
                                               rel=1e-12)
    # Row 2's gradient is the OPD term's alone; row 3 gets none.
    g = grad(loss, batch.logp)
    if aggregation == "token-mean":
        torch.testing.assert_close(g[2], LAM * (logp[2] - teacher[2]) * MASK[2] / norms.all.num_tokens,
                                   rtol=1e-12, atol=1e-15)
    assert g[3].abs().max().item() == 0.0


def test_dgrpo_with_lam_zero_is_exactly_the_policy_loss():
    batch, norms = make_batch(6), distill_norms()
    pg = policy()
    loss, _ = DGRPO(pg, OPDConfig(lam=0.0)).loss(batch, norms)
    want, _ = pg.loss(batch, norms.pg)
    assert loss.item() == want.item()
    torch.testing.assert_close(grad(loss, batch.logp), grad(want, batch.logp), rtol=0, atol=0)


# --------------------------------------------------------------------------- forward-KL warmup


def test_fkl_sampled_is_teacher_minus_student_with_sfts_gradient():
    batch = make_batch(7)
    fkl = ForwardKLWarmup(policy(), FKLConfig())
    assert fkl.needs == Needs(old=False, teacher_rollouts=True)
    n = norm(PG_ROWS)
    loss, metrics = fkl.loss(batch, n)
    want = ((batch.teacher_logp - batch.logp.detach()) * PG_ROWS).sum() / n.num_tokens
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.logp), -PG_ROWS / n.num_tokens, rtol=1e-12, atol=0)
    assert metrics["fkl/sampled_kl"].item() == pytest.approx(want.item(), rel=1e-12)


def test_fkl_full_is_the_token_mean_of_teacher_kl():
    batch = make_batch(8, teacher_kl=True)
    fkl = ForwardKLWarmup(policy(), FKLConfig(estimator="full"))
    assert fkl.needs == Needs(old=False, teacher_rollouts=True, teacher_kl="forward")
    n = norm(PG_ROWS)
    loss, _ = fkl.loss(batch, n)
    assert loss.item() == pytest.approx(((batch.teacher_kl.detach() * PG_ROWS).sum() / n.num_tokens).item(), rel=1e-12)
    torch.testing.assert_close(grad(loss, batch.teacher_kl), PG_ROWS / n.num_tokens, rtol=1e-12, atol=0)
    assert grad(loss, batch.logp).abs().max().item() == 0.0


# --------------------------------------------------------------------------- sequences and normalisers


def rollout(k: int, **fields) -> Rollout:
    base = dict(sample=None, context="short", prompt=[1, 2], response=[3 + k, 4, 5][: 1 + k % 3],
                engine_logp=[-0.5, -1.5, -0.25][: 1 + k % 3], finish_reason="stop", reward=float(k), advantage=0.25 * k)
    return Rollout(**{**base, **fields})


ROLLOUTS = [rollout(0), rollout(1, response=[], engine_logp=[]), rollout(2, in_policy_loss=False),
            rollout(3, finish_reason="length"), rollout(4)]


def test_opd_keeps_every_rollout_with_a_response_outside_the_pg_term():
    opd = OnPolicyDistillation(PolicyGradient(PolicyLossConfig(name="ppo"), 8, mask_truncated=True), OPDConfig())
    seqs = opd.sequences(ROLLOUTS, None)
    assert [(s.rollout, s.role, s.in_loss, s.in_update) for s in seqs] == [
        (0, Role.POLICY, False, True), (2, Role.POLICY, False, True), (3, Role.POLICY, False, True),
        (4, Role.POLICY, False, True)]
    assert [s.engine_logp for s in seqs] == [ROLLOUTS[k].engine_logp for k in (0, 2, 3, 4)]
    norms = opd.normalisers(seqs, len(ROLLOUTS))
    assert norms.pg == Normaliser(num_tokens=0, num_sequences=0, max_response_len=8)
    assert norms.all == Normaliser(num_tokens=1 + 3 + 1 + 2, num_sequences=4, max_response_len=8)


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_dgrpo_puts_in_the_pg_term_what_dynamic_sampling_and_truncation_keep(mask_truncated):
    dgrpo = DGRPO(PolicyGradient(PolicyLossConfig(name="ppo"), 8, mask_truncated=mask_truncated), OPDConfig())
    seqs = dgrpo.sequences(ROLLOUTS, None)
    assert [(s.rollout, s.in_loss) for s in seqs] == [(0, True), (2, False), (3, not mask_truncated), (4, True)]
    norms = dgrpo.normalisers(seqs, len(ROLLOUTS))
    pg_tokens = 1 + 2 + (0 if mask_truncated else 1)
    assert norms.pg == Normaliser(num_tokens=pg_tokens, num_sequences=3 - mask_truncated, max_response_len=8)
    assert norms.all == Normaliser(num_tokens=7, num_sequences=4, max_response_len=8)


def test_fkl_views_carry_the_teachers_sampled_log_probs_not_the_engines():
    fkl = ForwardKLWarmup(PolicyGradient(PolicyLossConfig(name="ppo"), 8, mask_truncated=True), FKLConfig())
    seqs = fkl.sequences(ROLLOUTS, None)
    assert [(s.rollout, s.in_loss, s.in_update) for s in seqs] == [(0, True, True), (2, True, True), (3, True, True),
                                                                    (4, True, True)]
    for s in seqs:
        assert s.engine_logp is None and s.teacher_logp == ROLLOUTS[s.rollout].engine_logp
        assert s.response == ROLLOUTS[s.rollout].response and s.prompt == [1, 2]
    assert fkl.normalisers(seqs, 5) == Normaliser(num_tokens=7, num_sequences=4, max_response_len=8)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("make, match", [
    (lambda: OPDConfig(lam=-0.1), "distill.opd.lam must be >= 0, got -0.1"),
    (lambda: OPDConfig(mode="dense"), "distill.opd.mode must be one of loss, reward, got 'dense'"),
    (lambda: OPDConfig(estimator="k2"), "distill.opd.estimator must be one of k1, k3, full, topk, got 'k2'"),
    (lambda: OPDConfig(estimator="topk", top_k=0), "distill.opd.top_k must be >= 1, got 0"),
    (lambda: OPDConfig(mode="loss", estimator="k3"), "distill.opd.estimator='k3' needs mode='reward'"),
    (lambda: FKLConfig(estimator="k1"), "distill.fkl.estimator must be one of sampled, full, topk, got 'k1'"),
    (lambda: FKLConfig(estimator="topk", top_k=0), "distill.fkl.top_k must be >= 1, got 0"),
    (lambda: TeacherConfig(temperature=0.0), "distill.teacher.temperature must be > 0, got 0"),
])
def test_config_errors_are_one_line(make, match):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(match) and "\n" not in str(err.value)
    OPDConfig(mode="reward", estimator="k3")  # k3 is fine as a reward
