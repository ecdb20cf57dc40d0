"""megatron_lcr.distill.depo: DePO's short-to-long KD and DePO-IW."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lcr.distill.depo import (
    DePOConfig,
    DePOInputs,
    depo_aux_loss,
    depo_aux_mask,
    depo_iw_loss,
    depo_kd_loss,
    depo_loss,
    forward_kl_full,
    forward_kl_sampled,
    importance_weights,
    kd_keep,
    kd_mask,
)
from megatron_lcr.rl.losses import Normaliser, PolicyLossConfig, policy_loss

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


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_forward_kl_full_matches_float64_reference_and_gradient(temperature):
    _, teacher_logits, student_logits, _, _ = batch(2)
    got = forward_kl_full(student_logits, teacher_logits, temperature=temperature)
    want = kl_reference(student_logits.detach(), teacher_logits, temperature)
    assert got.shape == (B, S)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # d KL / d z_s = (softmax(z_s / T) - softmax(z_t / T)) / T, per position.
    (grad,) = torch.autograd.grad(got.sum(), student_logits)
    want_grad = (
        torch.softmax(student_logits.detach().double() / temperature, -1)
        - torch.softmax(teacher_logits.double() / temperature, -1)
    ) / temperature
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_forward_kl_full_applies_temperature_to_both_sides():
    _, teacher_logits, student_logits, _, _ = batch(3)
    s, t = student_logits.detach(), teacher_logits
    both = forward_kl_full(s, t, temperature=0.5)
    torch.testing.assert_close(both, forward_kl_full(s / 0.5, t / 0.5))
    assert not torch.allclose(both, forward_kl_full(s / 0.5, t), atol=1e-3)
    assert not torch.allclose(both, forward_kl_full(s, t / 0.5), atol=1e-3)


def test_forward_kl_full_zero_with_zero_gradient_for_identical_distributions():
    _, teacher_logits, _, _, _ = batch(4)
    student = teacher_logits.clone().requires_grad_()
    kl = forward_kl_full(student, teacher_logits, temperature=0.7)
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros(B, S), rtol=0, atol=1e-6)
    torch.testing.assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-6)


def test_forward_kl_full_ignores_vocab_rows_the_teacher_excludes():
    # Padded vocab rows: -inf teacher and student logits contribute 0, not NaN.
    teacher = torch.tensor([[0.0, 1.0, float("-inf")]])
    student = torch.tensor([[0.5, 0.0, float("-inf")]], requires_grad=True)
    kl = forward_kl_full(student, teacher)
    torch.testing.assert_close(kl.double(), kl_reference(student.detach()[:, :2], teacher[:, :2], 1.0))
    kl.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 2] == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_are_one_when_contexts_match(level):
    mask, teacher_logits, _, tokens, _ = batch(5)
    short = gather_logp(teacher_logits, tokens)
    long = short.clone().requires_grad_()
    w = importance_weights(long, short, mask, level)
    assert torch.equal(w, torch.ones(B, S))
    w.sum().backward()
    assert long.grad[mask.bool()].abs().min() > 0  # the weights still carry gradient


def test_importance_weights_levels():
    mask, teacher_logits, student_logits, tokens, _ = batch(6)
    short, long = gather_logp(teacher_logits, tokens), gather_logp(student_logits.detach(), tokens)
    token = importance_weights(long, short, mask, "token")
    torch.testing.assert_close(token[mask.bool()], torch.exp(long - short)[mask.bool()])
    seq = importance_weights(long, short, mask, "sequence")
    for b in range(B):
        counted = mask[b].bool()
        geo = torch.exp((long - short)[b, counted].double().mean())
        torch.testing.assert_close(seq[b, counted].double(), geo.expand(int(counted.sum())))
    with pytest.raises(ValueError, match="unknown importance level 'none'; valid: 'token', 'sequence'"):
        importance_weights(long, short, mask, "none")


def test_iw_loss_hand_values_and_step0():
    # Token ratios pi_long / pi_old_short (1.5, 0.5, 0.5, 1.5), A (+1, +1, -1, -1), eps 0.2:
    # per-token losses -1.2, -0.5, 0.8, 1.5 -> token-mean 0.15.
    short = torch.full((1, 4), -1.0)
    long = (short + torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))).requires_grad_()
    adv, mask = torch.tensor([[1.0, 1.0, -1.0, -1.0]]), torch.ones(1, 4)
    cfg = DePOConfig(enabled=True, importance="token")
    loss, metrics = depo_iw_loss(long, short, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    # Long context == short context: ratio 1, loss = -mean advantage, for both levels.
    for level in ("token", "sequence"):
        cfg = DePOConfig(enabled=True, importance=level)
        adv_b = torch.tensor([0.5])
        same = short.clone().requires_grad_()
        loss, _ = depo_iw_loss(same, short, adv_b, mask, cfg, Normaliser.local(mask))
        assert loss.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="needs importance='token' or 'sequence'"):
        depo_iw_loss(long, short, adv, mask, DePOConfig(), Normaliser.local(mask))


def test_aux_loss_kd_modes_scale_by_lambda_and_use_kept_rows():
    mask, teacher_logits, student_logits, tokens, rewards = batch(7)
    long_logp = gather_logp(student_logits, tokens)
    short_logp = gather_logp(teacher_logits, tokens)
    cfg = DePOConfig(enabled=True, lam=0.5)
    aux_mask = depo_aux_mask(mask, rewards, cfg)
    assert torch.equal(aux_mask, kd_mask(mask, kd_keep(rewards, 1.0)))
    norm = Normaliser.local(aux_mask)
    inputs = DePOInputs(
        long_logp=long_logp,
        mask=mask,
        rewards=rewards,
        short_logp=short_logp,
        long_logits=student_logits,
        short_logits=teacher_logits,
        temperature=0.7,
    )
    loss, metrics = depo_aux_loss(inputs, cfg, norm)
    rows = aux_mask
    want = 0.5 * (short_logp - long_logp)[rows].mean()
    torch.testing.assert_close(loss, want)
    assert set(metrics) == {"depo/kd_loss", "depo/kept_frac", "depo/aux_loss"}
    torch.testing.assert_close(metrics["depo/kd_loss"], want.detach() / 0.5)

    full_cfg = DePOConfig(enabled=True, lam=0.5, kd_estimator="full")
    loss, _ = depo_aux_loss(inputs, full_cfg, norm)
    want = 0.5 * kl_reference(student_logits.detach(), teacher_logits, 0.7)[rows].mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_aux_loss_iw_uses_all_rollouts_and_policy_loss():
    mask, teacher_logits, student_logits, tokens, rewards = batch(8)
    long_logp, short_logp = gather_logp(student_logits, tokens), gather_logp(teacher_logits, tokens)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(0))
    cfg = DePOConfig(enabled=True, lam=2.0, importance="sequence", eps_high=0.28)
    assert torch.equal(depo_aux_mask(mask, rewards, cfg), mask.bool())
    norm = Normaliser.local(mask)
    inputs = DePOInputs(
        long_logp=long_logp, mask=mask, rewards=rewards, short_logp=short_logp, advantages=adv
    )
    loss, metrics = depo_aux_loss(inputs, cfg, norm)
    want, _ = policy_loss(
        long_logp, short_logp, adv, mask, PolicyLossConfig(ratio="sequence", eps_high=0.28), norm
    )
    torch.testing.assert_close(loss, 2.0 * want)
    assert "depo/iw_clip_frac" in metrics and "depo/iw_ratio_max" in metrics


def test_depo_loss_adds_lambda_times_kd_to_px_and_is_identity_when_disabled():
    mask, teacher_logits, student_logits, tokens, rewards = batch(9)
    long_logp, short_logp = gather_logp(student_logits, tokens), gather_logp(teacher_logits, tokens)
    px_loss = torch.tensor(0.25)
    px = (px_loss, {"pg_loss": px_loss, "loss": px_loss})
    inputs = DePOInputs(long_logp=long_logp, mask=mask, rewards=rewards, short_logp=short_logp)
    cfg = DePOConfig(enabled=True, lam=0.75)
    norm = Normaliser.local(depo_aux_mask(mask, rewards, cfg))
    loss, metrics = depo_loss(px, inputs, cfg, norm)
    kd, _ = depo_kd_loss(forward_kl_sampled(long_logp, short_logp), mask, kd_keep(rewards, 1.0), norm)
    torch.testing.assert_close(loss, 0.25 + 0.75 * kd)
    assert metrics["loss"].item() == pytest.approx(loss.item())
    assert metrics["pg_loss"].item() == 0.25
    off_loss, off_metrics = depo_loss(px, inputs, DePOConfig(enabled=False), norm)
    assert off_loss is px_loss and off_metrics is px[1]


def test_missing_inputs_name_the_field():
    mask = torch.ones(1, 2)
    inputs = DePOInputs(long_logp=torch.zeros(1, 2), mask=mask, rewards=torch.ones(1))
    norm = Normaliser.local(mask)
    with pytest.raises(ValueError, match="DePO mode 'kd-sampled' needs DePOInputs.short_logp"):
        depo_aux_loss(inputs, DePOConfig(enabled=True), norm)
    with pytest.raises(ValueError, match="DePO mode 'kd-full' needs DePOInputs.long_logits"):
        depo_aux_loss(inputs, DePOConfig(enabled=True, kd_estimator="full"), norm)
    with_short = DePOInputs(
        long_logp=torch.zeros(1, 2), mask=mask, rewards=torch.ones(1), short_logp=torch.zeros(1, 2)
    )
    with pytest.raises(ValueError, match="DePO mode 'iw' needs DePOInputs.advantages"):
        depo_aux_loss(with_short, DePOConfig(enabled=True, importance="token"), norm)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"importance": "tok"}, "unknown importance 'tok'; valid: 'none', 'token', 'sequence'"),
        ({"kd_estimator": "exact"}, "unknown kd_estimator 'exact'; valid: 'sampled', 'full'"),
        (
            {"importance": "token", "kd_estimator": "full"},
            "kd_estimator='full' has no effect with importance='token'",
        ),
        ({"lam": -0.5}, "lam must be >= 0, got -0.5"),
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
    exact = forward_kl_full(student_logits, teacher_logits).item()
    stderr = est.std().item() / math.sqrt(samples.numel())
    assert exact > 0 and est.mean().item() == pytest.approx(exact, abs=5 * stderr)
