"""megatron_lcr.distill.depo: DePO's short-to-long KD and DePO-IW, as functions and as objectives."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_lcr.distill.depo import (
    DePO,
    DePOConfig,
    DePOIW,
    depo_iw_loss,
    depo_kd_loss,
    forward_kl_sampled,
    kd_keep,
    kd_mask,
)
from megatron_lcr.rl.losses import Normaliser, PolicyLossConfig, policy_loss
from megatron_lcr.rl.objective import PolicyGradient
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch

B, S, V = 5, 6, 11


def batch(seed):
    """Random rollouts: lengths 1..S, teacher (short-context) logits and sampled tokens, rewards."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 1, 5, 4])
    mask = (torch.arange(S)[None, :] < lengths[:, None]).float()
    teacher_logits = torch.randn(B, S, V, generator=g)
    student_logits = (teacher_logits + 0.5 * torch.randn(B, S, V, generator=g)).requires_grad_()
    tokens = torch.randint(0, V, (B, S), generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0])
    return mask, teacher_logits, student_logits, tokens, rewards


def gather_logp(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def test_kd_keep_and_mask():
    keep = kd_keep(torch.tensor([1.0, 0.5, 1.0, 0.0, 1.5]), 1.0)
    assert keep.tolist() == [True, False, True, False, True]
    mask = torch.ones(5, 2)
    assert kd_mask(mask, keep).tolist() == [[k, k] for k in keep.tolist()]


def test_forward_kl_sampled_hand_values_and_detached_teacher():
    teacher = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    student = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    kl = forward_kl_sampled(student, teacher)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0]]))  # teacher - student
    kl.sum().backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, torch.tensor([[-1.0, -1.0]]))


def test_sampled_kd_gradient_equals_sft_gradient_on_kept_rollouts():
    mask, teacher_logits, student_logits, tokens, rewards = batch(0)
    teacher_logits = teacher_logits.requires_grad_()  # must receive no gradient
    keep = kd_keep(rewards, 1.0)
    per_token = forward_kl_sampled(gather_logp(student_logits, tokens), gather_logp(teacher_logits, tokens))
    norm = Normaliser.local(kd_mask(mask, keep))
    loss, _ = depo_kd_loss(per_token, mask, keep, norm)
    (kd_grad,) = torch.autograd.grad(loss, student_logits)
    assert teacher_logits.grad is None

    # SFT: mean cross-entropy of the sampled tokens of the kept rollouts, computed independently.
    rows = kd_mask(mask, keep)
    logits = student_logits.detach().requires_grad_()
    sft = F.cross_entropy(logits[rows], tokens[rows], reduction="mean")
    (sft_grad,) = torch.autograd.grad(sft, logits)
    torch.testing.assert_close(kd_grad, sft_grad)
    assert kd_grad[~keep].abs().sum() == 0 and kd_grad[keep].abs().sum() > 0


def test_kd_loss_micro_batches_sum_to_the_whole_batch():
    mask, teacher_logits, student_logits, tokens, rewards = batch(1)
    keep = kd_keep(rewards, 1.0)
    per_token = forward_kl_sampled(gather_logp(student_logits, tokens), gather_logp(teacher_logits, tokens))
    norm = Normaliser.local(kd_mask(mask, keep))
    whole, whole_m = depo_kd_loss(per_token, mask, keep, norm, num_rollouts=B)
    a, a_m = depo_kd_loss(per_token[:2], mask[:2], keep[:2], norm, num_rollouts=B)
    b, b_m = depo_kd_loss(per_token[2:], mask[2:], keep[2:], norm, num_rollouts=B)
    torch.testing.assert_close(a + b, whole)
    torch.testing.assert_close(a_m["kept_frac"] + b_m["kept_frac"], whole_m["kept_frac"])
    assert whole_m["kept_frac"].item() == pytest.approx(3 / 5)
    # Kept rollouts with no token in the term (the short-context rows of a packed micro-batch) do not count.
    _, none_m = depo_kd_loss(per_token, torch.zeros_like(mask), keep, norm, num_rollouts=B)
    assert none_m["kept_frac"].item() == 0.0


def kl_reference(student_logits, teacher_logits, temperature):
    """float64 sum_v p_t (log p_t - log p_s) with p = softmax(logits / T), written out."""
    def log_probs(z):
        z = z.double() / temperature
        z = z - z.max(dim=-1, keepdim=True).values
        return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))

    log_t, log_s = log_probs(teacher_logits), log_probs(student_logits)
    return (torch.exp(log_t) * (log_t - log_s)).sum(dim=-1)


def test_iw_loss_hand_values_and_step0():
    # Token ratios pi_long / pi_old_short (1.5, 0.5, 0.5, 1.5), A (+1, +1, -1, -1), eps 0.2:
    # per-token losses -1.2, -0.5, 0.8, 1.5 -> token-mean 0.15.
    short = torch.full((1, 4), -1.0)
    long = (short + torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))).requires_grad_()
    adv, mask = torch.tensor([[1.0, 1.0, -1.0, -1.0]]), torch.ones(1, 4)
    cfg = DePOConfig(importance="token")
    loss, metrics = depo_iw_loss(long, short, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    # Long context == short context: ratio 1, loss = -mean advantage, for both levels.
    for level in ("token", "sequence"):
        cfg = DePOConfig(importance=level)
        adv_b = torch.tensor([0.5])
        same = short.clone().requires_grad_()
        loss, _ = depo_iw_loss(same, short, adv_b, mask, cfg, Normaliser.local(mask))
        assert loss.item() == pytest.approx(-0.5)


def rollouts(rewards, *, in_policy_loss=None, finish=None):
    sample = SimpleNamespace(id="q")
    return [Rollout(sample=sample, context="short", prompt=[1, 2, 3], response=[4 + k, 5], engine_logp=[-1.0, -2.0],
                    finish_reason=(finish or {}).get(k, "stop"), reward=r, advantage=0.1 * k,
                    in_policy_loss=(in_policy_loss or {}).get(k, True))
            for k, r in enumerate(rewards)]


def depo(kind=DePO, **fields):
    return kind(PolicyGradient(PolicyLossConfig(name="ppo"), max_response_len=8, mask_truncated=True),
                DePOConfig(**fields))


def test_depo_views_of_the_rollouts():
    # Rollout 0 kept (reward 1); 1 not; 2 kept but left out of L_PX by dynamic sampling; 3 truncated.
    rs = rollouts([1.0, 0.0, 1.0, 1.0], in_policy_loss={2: False}, finish={3: "length"})
    seqs = depo().sequences(rs, lambda sample: [9, 9, 9, 1, 2, 3])
    got = [(s.role, s.rollout, s.in_loss, s.in_update) for s in seqs]
    assert got == [(Role.POLICY, 0, True, True), (Role.LONG_CONTEXT, 0, True, True),
                   (Role.POLICY, 1, True, True),
                   (Role.POLICY, 2, False, False), (Role.LONG_CONTEXT, 2, True, True),
                   (Role.POLICY, 3, False, False), (Role.LONG_CONTEXT, 3, True, True)]
    assert seqs[1].prompt == [9, 9, 9, 1, 2, 3] and seqs[1].response == rs[0].response
    assert seqs[0].engine_logp == [-1.0, -2.0] and seqs[1].engine_logp is None
    # The exact KD needs the short view in the forward next to its long one; DePO-IW views every rollout.
    exact = depo(kd_estimator="full")
    assert exact.needs.pair_kl and [s.in_update for s in exact.sequences(rs, lambda s: [9])][3] is True
    iw = depo(DePOIW).sequences(rs, lambda s: [9])
    assert [(s.role, s.rollout) for s in iw if s.role == Role.LONG_CONTEXT] == [(Role.LONG_CONTEXT, k) for k in range(4)]
    assert not depo(DePOIW).needs.pair_kl


def token_batch(seed, pair_kl=None):
    """Rows 0-2: POLICY views (row 2 not in L_PX); rows 3-4: LONG_CONTEXT views, rewards 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    return TokenBatch(logp=(-torch.rand(5, 4, generator=g)).requires_grad_(), mask=mask,
                      role=torch.tensor([0, 0, 0, 1, 1]), rollout=torch.tensor([0.0, 1, 2, 0, 1]),
                      reward=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), advantage=torch.tensor([0.5, -0.5, 1.0, 0.5, -0.5]),
                      in_loss=torch.tensor([1.0, 1, 0, 1, 1]), old_logp=-torch.rand(5, 4, generator=g), pair_kl=pair_kl)


def test_depo_loss_is_px_plus_lambda_kd_on_the_kept_long_views():
    batch = token_batch(0)
    px_mask = batch.mask * torch.tensor([1.0, 1, 0, 0, 0])[:, None]
    long_mask = batch.mask * torch.tensor([0.0, 0, 0, 1, 1])[:, None]
    norms = SimpleNamespace(px=Normaliser.local(px_mask), long=Normaliser.local(long_mask * batch.reward[:, None]),
                            num_rollouts=3)
    loss, metrics = depo(lam=0.5).loss(batch, norms)
    px, _ = policy_loss(batch.logp, batch.old_logp, batch.advantage, px_mask, PolicyLossConfig(name="ppo"), norms.px)
    kd = (batch.old_logp - batch.logp)[3, :3].sum() / 3  # only row 3 has reward >= tau: 3 tokens
    torch.testing.assert_close(loss, px + 0.5 * kd)
    assert metrics["depo/kept_frac"].item() == pytest.approx(1 / 3) and metrics["loss"] == loss.detach()
    # The exact estimator takes the trainer's per-token KL of the long rows instead.
    pair_kl = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    exact, _ = depo(lam=0.5, kd_estimator="full").loss(token_batch(0, pair_kl), norms)
    torch.testing.assert_close(exact, px + 0.5 * pair_kl[3, :3].sum() / 3)
    # lam = 0: the objective is plain RL's.
    torch.testing.assert_close(depo(lam=0.0).loss(batch, norms)[0], px)


def test_depo_iw_loss_is_px_plus_lambda_importance_weighted_rl_on_every_long_view():
    batch = token_batch(2)
    px_mask = batch.mask * torch.tensor([1.0, 1, 0, 0, 0])[:, None]
    long_mask = batch.mask * torch.tensor([0.0, 0, 0, 1, 1])[:, None]
    norms = SimpleNamespace(px=Normaliser.local(px_mask), long=Normaliser.local(long_mask), num_rollouts=3)
    loss, metrics = depo(DePOIW, lam=2.0, importance="sequence", eps_high=0.28).loss(batch, norms)
    px, _ = policy_loss(batch.logp, batch.old_logp, batch.advantage, px_mask, PolicyLossConfig(name="ppo"), norms.px)
    iw, _ = policy_loss(batch.logp, batch.old_logp, batch.advantage, long_mask,
                        PolicyLossConfig(name="gspo", eps_high=0.28), norms.long)
    torch.testing.assert_close(loss, px + 2.0 * iw)
    assert "depo/iw_clip_frac" in metrics and "depo/iw_ratio_max" in metrics

@pytest.mark.parametrize(
    "fields, message",
    [
        ({"importance": "none"}, "unknown depo.importance 'none'; valid: 'token', 'sequence'"),
        ({"kd_estimator": "exact"}, "unknown depo.kd_estimator 'exact'; valid: 'sampled', 'full'"),
        ({"lam": -0.5}, "depo.lam must be >= 0, got -0.5"),
        ({"eps_low": -0.1}, r"eps_low must be in \[0, 1\).*-0.1"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        DePOConfig(**fields)


def test_kd_kl_is_nonnegative_in_expectation_sanity():
    # The sampled estimate averaged over many teacher samples approaches the exact KL (> 0).
    g = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(V, generator=g), torch.randn(V, generator=g)
    samples = torch.multinomial(torch.softmax(teacher_logits, -1), 200_000, replacement=True, generator=g)
    student_logp = torch.log_softmax(student_logits, -1)[samples]
    est = forward_kl_sampled(student_logp, torch.log_softmax(teacher_logits, -1)[samples])
    exact = kl_reference(student_logits, teacher_logits, 1.0).item()
    stderr = est.std().item() / math.sqrt(samples.numel())
    assert exact > 0 and est.mean().item() == pytest.approx(exact, abs=5 * stderr)
