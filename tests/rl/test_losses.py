"""megatron_lcr.rl.losses: aggregation, KL estimators, token/sequence ratios, the policy losses
(PPO, GSPO, CISPO)."""

import math

import pytest
import torch

from megatron_lcr.config import from_dict
from megatron_lcr.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Normaliser,
    PolicyLossConfig,
    aggregate,
    metric_reduction,
    policy_loss,
    sequence_log_ratio,
    token_log_ratio,
)

LN2 = math.log(2.0)


def token_case(ratios, advantages, old=-1.0):
    """One row whose token t has ratio ratios[t] and advantage advantages[t]; logp has grad."""
    old_logp = torch.full((1, len(ratios)), old)
    logp = (old_logp + torch.log(torch.tensor([ratios]))).requires_grad_()
    return logp, old_logp, torch.tensor([advantages]), torch.ones(1, len(ratios))


def random_batch(seed, b=6, s=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).float()
    old = -torch.rand(b, s, generator=g) * 3
    logp = (old + 0.3 * torch.randn(b, s, generator=g)).requires_grad_()
    ref = old + 0.3 * torch.randn(b, s, generator=g)
    entropy = (torch.rand(b, s, generator=g) * 2).requires_grad_()
    adv = torch.randn(b, generator=g)
    return logp, old, ref, entropy, adv, mask


# --------------------------------------------------------------------------- normaliser, aggregation


def test_normaliser_counts_tokens_and_nonempty_sequences():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    norm = Normaliser.local(mask, 4)
    assert (norm.num_tokens, norm.num_sequences, norm.max_response_len) == (3, 2, 4)
    assert Normaliser.local(mask).max_response_len == 3  # defaults to the padded width
    summed = Normaliser.counts(mask[:2]) + Normaliser.counts(mask[2:])
    assert Normaliser.from_counts(summed, 4) == norm


def test_normaliser_validation():
    with pytest.raises(ValueError, match=r"num_tokens \(-1\) and num_sequences \(2\) must be >= 0"):
        Normaliser(num_tokens=-1, num_sequences=2, max_response_len=4)
    with pytest.raises(ValueError, match="max_response_len must be >= 1, got 0"):
        Normaliser(num_tokens=1, num_sequences=1, max_response_len=0)


# Row 0 counts 1, 2 (sum 3, length 2); row 1 counts 4 (length 1); row 2 counts nothing and holds
# junk (NaN, 9) that must not leak. Tokens 3, sequences 2, max_response_len 4.
AGG_VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [float("nan"), 9.0, 9.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3
        ("seq-mean-token-mean", 2.75),  # (3/2 + 4/1) / 2
        ("seq-mean-token-sum", 3.5),  # 7 / 2
        ("seq-mean-token-sum-norm", 0.875),  # 7 / (2 * 4)
    ],
)
def test_aggregation_hand_values(mode, expected):
    norm = Normaliser.local(AGG_MASK, 4)
    assert aggregate(AGG_VALUES, AGG_MASK, mode, norm).item() == pytest.approx(expected, abs=1e-6)
    # A float mask and a bool mask mean the same.
    assert aggregate(AGG_VALUES, AGG_MASK.bool(), mode, norm).item() == pytest.approx(expected, abs=1e-6)


def test_aggregation_uses_the_global_normaliser_not_the_local_counts():
    norm = Normaliser(num_tokens=30, num_sequences=20, max_response_len=4)
    assert aggregate(AGG_VALUES, AGG_MASK, "token-mean", norm).item() == pytest.approx(7 / 30)
    assert aggregate(AGG_VALUES, AGG_MASK, "seq-mean-token-mean", norm).item() == pytest.approx(5.5 / 20)


def test_unknown_aggregation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown aggregation 'mean'") as info:
        aggregate(AGG_VALUES, AGG_MASK, "mean", Normaliser.local(AGG_MASK))
    for name in AGGREGATIONS:
        assert repr(name) in str(info.value)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    # Token 0: pi = 1/2, ref = 1/4 -> log r = -ln 2; token 1: pi = 1/4, ref = 1/2 -> log r = ln 2.
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k1 = KL_ESTIMATORS["k1"](logp, ref)
    k2 = KL_ESTIMATORS["k2"](logp, ref)
    k3 = KL_ESTIMATORS["k3"](logp, ref)
    torch.testing.assert_close(k1, torch.tensor([[LN2, -LN2]]))  # -log r
    torch.testing.assert_close(k2, torch.tensor([[LN2**2 / 2, LN2**2 / 2]]))  # 0.2402265 each
    torch.testing.assert_close(k3, torch.tensor([[0.5 - 1 + LN2, 2 - 1 - LN2]]))  # 0.193147, 0.306853


def test_k3_nonnegative_zero_at_match_and_finite_when_extreme():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 33, generator=g) * 5
    ref = torch.randn(64, 33, generator=g) * 5
    assert (KL_ESTIMATORS["k3"](logp, ref) >= 0).all()
    assert torch.equal(KL_ESTIMATORS["k3"](logp, logp.clone()), torch.zeros_like(logp))
    # log r = 200 would overflow exp in fp32; the clamp keeps value and gradient finite.
    lp = torch.tensor([[-200.0]], requires_grad=True)
    value = KL_ESTIMATORS["k3"](lp, torch.zeros(1, 1))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(lp.grad).all()


# --------------------------------------------------------------------------- ratios


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    logp, old, _, _, _, mask = random_batch(1)
    seq = torch.exp(sequence_log_ratio(logp, old, mask)).double()
    token = torch.exp(token_log_ratio(logp, old, mask)).double()
    for b in range(mask.shape[0]):
        counted = mask[b].bool()
        geo = torch.prod(token[b, counted]) ** (1.0 / counted.sum().item())
        torch.testing.assert_close(seq[b, counted], geo.expand(int(counted.sum())), rtol=1e-6, atol=0)


def test_gspo_token_gradient_equals_gspo_sequence_gradient():
    # GSPO: J = (1/B) sum_i s_i A_i with s_i = exp(mean_t (logp - old)), differentiated directly
    # (float64). GSPO-token with per-sequence advantages and seq-mean-token-mean must match it.
    logp, old, _, _, adv, mask = random_batch(2)
    cfg = PolicyLossConfig(name="gspo", eps_low=0.9, eps_high=10.0, aggregation="seq-mean-token-mean")
    loss, _ = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask))
    (grad,) = torch.autograd.grad(loss, logp)

    lp = logp.detach().double().requires_grad_()
    s = torch.exp(((lp - old.double()) * mask).sum(-1) / mask.sum(-1))
    ref_loss = -(s * adv.double()).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, lp)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_step0_loss_is_minus_mean_advantage(name):
    _, old, _, _, adv, mask = random_batch(3)
    logp = old.clone().requires_grad_()
    norm = Normaliser.local(mask)
    loss, metrics = policy_loss(logp, old, adv, mask, PolicyLossConfig(name=name), norm)
    expected = -(adv[:, None] * mask).sum() / mask.sum()  # token-mean of -A
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / mask.sum())  # d/dlogp = -A r / N
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_frac"].item() == 0.0


def test_token_clipped_loss_hand_values():
    # eps 0.2. Per token (r, A) -> loss = max(-rA, -clip(r)A):
    #   (1.5, +1) -> max(-1.5, -1.2) = -1.2  clipped high, no gradient
    #   (0.5, +1) -> max(-0.5, -0.8) = -0.5  gradient -A r = -0.5
    #   (0.5, -1) -> max(0.5, 0.8)   = 0.8   clipped low, no gradient
    #   (1.5, -1) -> max(1.5, 1.2)   = 1.5   unclipped (PPO does not bound it), gradient 1.5
    # token-mean: (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; gradients / 4.
    logp, old, adv, mask = token_case([1.5, 0.5, 0.5, 1.5], [1.0, 1.0, -1.0, -1.0])
    cfg = PolicyLossConfig(name="ppo")
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.0, 0.375]]))
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    assert metrics["clip_high_frac"].item() == pytest.approx(0.25)
    assert metrics["clip_low_frac"].item() == pytest.approx(0.25)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_dual_clip_hand_values():
    # c = 3, eps 0.2. For A < 0: loss = min(max(-rA, -clip(r)A), -cA).
    #   (4.0, -1) -> min(max(4, 1.2), 3) = 3       dual-clipped, no gradient
    #   (2.0, -1) -> min(max(2, 1.2), 3) = 2       gradient -A r = 2
    #   (4.0, +1) -> max(-4, -1.2) = -1.2          A > 0: dual clip does not apply
    #   (0.5, -2) -> min(max(1, 1.6), 6) = 1.6     clipped low
    # token-mean: (3 + 2 - 1.2 + 1.6) / 4 = 1.35
    logp, old, adv, mask = token_case([4.0, 2.0, 4.0, 0.5], [-1.0, -1.0, 1.0, -2.0])
    cfg = PolicyLossConfig(name="ppo", dual_clip=3.0)
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx(1.35, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]]))
    assert metrics["dual_clip_frac"].item() == pytest.approx(0.25)
    assert metrics["clip_frac"].item() == pytest.approx(0.75)
    # Without dual clip the first token costs 4: (4 + 2 - 1.2 + 1.6) / 4 = 1.6.
    plain, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(name="ppo"), Normaliser.local(mask))
    assert plain.item() == pytest.approx(1.6, abs=1e-6)


@pytest.mark.parametrize(
    "eps_low, eps_high, expected",
    [
        # (1.25,+1) (1.4,+1) (0.75,-1) (0.85,-1):
        (0.2, 0.28, (-1.25 - 1.28 + 0.8 + 0.85) / 4),  # DAPO clip-higher: 1.25 is inside [0.8, 1.28]
        (0.2, 0.2, (-1.2 - 1.2 + 0.8 + 0.85) / 4),  # symmetric
        (0.28, 0.2, (-1.2 - 1.2 + 0.75 + 0.85) / 4),  # 0.75 is inside [0.72, 1.2]
    ],
)
def test_clip_higher_asymmetry_hand_values(eps_low, eps_high, expected):
    logp, old, adv, mask = token_case([1.25, 1.4, 0.75, 0.85], [1.0, 1.0, -1.0, -1.0])
    cfg = PolicyLossConfig(name="ppo", eps_low=eps_low, eps_high=eps_high)
    loss, _ = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_sequence_ratio_clips_whole_sequences():
    # Row 0: token ratios 2 and 2 -> s = 2 > 1.2, A = +1: every token clipped, loss -1.2 per token.
    # Row 1: token ratios 4 and 1/4 -> s = 1, A = +1: unclipped, loss -1 per token, gradient -1.
    old = torch.full((2, 2), -2.0)
    logp = (old + torch.log(torch.tensor([[2.0, 2.0], [4.0, 0.25]]))).requires_grad_()
    mask = torch.ones(2, 2)
    adv = torch.tensor([1.0, 1.0])
    cfg = PolicyLossConfig(name="gspo")
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask))
    assert loss.item() == pytest.approx((-1.2 * 2 - 1.0 * 2) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-0.25, -0.25]]))
    assert metrics["clip_high_frac"].item() == pytest.approx(0.5)


def test_cispo_matches_float64_reference_and_keeps_every_token():
    # eps 0.2 / 0.28: weights clip to [0.8, 1.28]. Per token (r, A), row 1's last token padded:
    #   row 0: (1.5, +1) clipped high -- PPO zeroes it; (0.5, -1) clipped low -- PPO zeroes it;
    #          (1.1, +2) inside; (e^25, +1) beyond LOG_RATIO_CLAMP and clipped high -- PPO zeroes it.
    #   row 1: (0.5, +1) clipped low; (1.5, -1) clipped high; (0.95, -0.5) inside.
    ratios = torch.tensor([[1.5, 0.5, 1.1, math.exp(25.0)], [0.5, 1.5, 0.95, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0], [1.0, -1.0, -0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.0, -1.0, -30.0], [-2.0, -2.0, -2.0, -2.0]], dtype=torch.float64)
    logp = (old + torch.log(ratios)).requires_grad_()
    cfg = PolicyLossConfig(name="cispo", eps_low=0.2, eps_high=0.28)
    norm = Normaliser.local(mask)
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, norm)
    (grad,) = torch.autograd.grad(loss, logp)

    # Reference: -sum_t sg(clip(r_t)) A_t logp_t / num_tokens, float64, written out token by token.
    lp = logp.detach().clone().requires_grad_()
    terms = []
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                weight = min(max(ratios[b, t].item(), 0.8), 1.28)  # a number: no gradient
                terms.append(-weight * adv[b, t] * lp[b, t])
    ref_loss = torch.stack(terms).sum() / 7
    (ref_grad,) = torch.autograd.grad(ref_loss, lp)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([[1.28, 0.8, 1.1, 1.28], [0.8, 1.28, 0.95, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, -weights * adv * mask / 7, rtol=1e-12, atol=1e-12)
    assert (grad[mask.bool()] != 0).all()  # every counted token moves the policy
    assert metrics["clip_high_frac"].item() == pytest.approx(3 / 7)
    assert metrics["clip_low_frac"].item() == pytest.approx(2 / 7)

    # PPO on the same batch zeroes the tokens CISPO keeps, e.g. (1.5, +1): beyond the clip, A > 0.
    ppo_cfg = PolicyLossConfig(name="ppo", eps_low=0.2, eps_high=0.28)
    ppo, _ = policy_loss(logp, old, adv, mask, ppo_cfg, norm)
    (ppo_grad,) = torch.autograd.grad(ppo, logp)
    for b, t in [(0, 0), (0, 1), (0, 3)]:
        assert ppo_grad[b, t] == 0 and grad[b, t] != 0
    assert grad[0, 0].item() == pytest.approx(-1.28 / 7)


def test_kl_and_entropy_terms_hand_values():
    # One token, A = 0 (no policy-gradient term); pi = 1/2, ref = 1/4: k3 = ln 2 - 1/2 = 0.193147.
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25]]))
    entropy = torch.tensor([[2.0]], requires_grad=True)
    mask = torch.ones(1, 1)
    cfg = PolicyLossConfig(name="ppo", kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(
        logp, logp.detach(), torch.zeros(1), mask, cfg, Normaliser.local(mask), ref_logp=ref, entropy=entropy
    )
    k3 = LN2 - 0.5
    assert loss.item() == pytest.approx(0.1 * k3 - 0.01 * 2.0, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(k3, abs=1e-6)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    loss.backward()
    # d k3 / d logp = 1 - r = 1 - 1/2; d(-0.01 H)/dH = -0.01.
    assert logp.grad.item() == pytest.approx(0.1 * 0.5, abs=1e-6)
    assert entropy.grad.item() == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="kl_coef=0.1 > 0 needs ref_logp"):
        policy_loss(logp, logp.detach(), torch.zeros(1), mask, cfg, Normaliser.local(mask))


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_padding_junk_reaches_neither_loss_nor_gradient(name):
    logp, old, ref, entropy, adv, mask = random_batch(4)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, name=name)
    clean, _ = policy_loss(logp, old, adv, mask, cfg, Normaliser.local(mask), ref_logp=ref, entropy=entropy)
    (clean_grad,) = torch.autograd.grad(clean, logp)
    pad = ~mask.bool()

    def junk(x):
        return torch.where(pad, torch.tensor(float("nan")), x)

    dirty, _ = policy_loss(
        junk(logp), junk(old), adv, mask, cfg, Normaliser.local(mask),
        ref_logp=junk(ref), entropy=junk(entropy),
    )
    (dirty_grad,) = torch.autograd.grad(dirty, logp)
    torch.testing.assert_close(dirty, clean)
    torch.testing.assert_close(dirty_grad, clean_grad)
    assert (clean_grad[pad] == 0).all()


def test_bf16_inputs_are_computed_in_fp32():
    logp, old, _, _, adv, mask = random_batch(5)
    norm = Normaliser.local(mask)
    loss, _ = policy_loss(logp.bfloat16(), old.bfloat16(), adv, mask, PolicyLossConfig(name="ppo"), norm)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_micro_batches_sum_to_the_whole_batch(name, aggregation):
    logp, old, ref, entropy, adv, mask = random_batch(6)
    dual_clip = None if name == "cispo" else 3.0  # CISPO's weights are capped already
    cfg = PolicyLossConfig(
        name=name, aggregation=aggregation, dual_clip=dual_clip, kl_coef=0.05, entropy_coef=0.01,
        eps_high=0.28,
    )
    norm = Normaliser.local(mask, max_response_len=10)

    def run(rows):
        return policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], cfg, norm,
            ref_logp=ref[rows], entropy=entropy[rows],
        )

    whole, whole_metrics = run(slice(None))
    whole_grads = torch.autograd.grad(whole, (logp, entropy))
    (a, a_metrics), (b, b_metrics) = run(slice(0, 2)), run(slice(2, None))
    parts_grads = torch.autograd.grad(a + b, (logp, entropy))
    torch.testing.assert_close(a + b, whole)
    for got, want in zip(parts_grads, whole_grads):
        torch.testing.assert_close(got, want)
    assert set(a_metrics) == set(whole_metrics)
    for key, want in whole_metrics.items():
        if metric_reduction(key) == "max":
            got = torch.maximum(a_metrics[key], b_metrics[key])
        else:
            got = a_metrics[key] + b_metrics[key]
        torch.testing.assert_close(got, want, msg=key)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"eps_low": -0.1}, r"eps_low must be in \[0, 1\).*-0.1"),
        ({"eps_low": 1.0}, r"eps_low must be in \[0, 1\).*1.0"),
        ({"eps_high": -0.5}, "eps_high must be >= 0, got -0.5"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1.*1.0"),
        ({"dual_clip": 1.2, "eps_high": 0.28}, r"dual_clip \(1.2\) must exceed 1 \+ eps_high \(1.28\)"),
        ({"kl_coef": -1.0}, "kl_coef must be >= 0, got -1.0"),
        ({"name": "token"}, "unknown policy loss 'token'; valid: 'ppo', 'gspo', 'cispo'"),
        ({"name": "cispo", "dual_clip": 3.0}, "dual_clip=3.0 has no effect with name='cispo'"),
        ({"kl_estimator": "k4"}, "unknown kl_estimator 'k4'; valid: 'k1', 'k2', 'k3'"),
        (
            {"aggregation": "mean"},
            "unknown aggregation 'mean'; valid: 'token-mean', 'seq-mean-token-mean', "
            "'seq-mean-token-sum', 'seq-mean-token-sum-norm'",
        ),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**fields)


def test_config_from_yaml_mapping():
    cfg = from_dict(PolicyLossConfig, {"name": "gspo", "eps_high": 0.28, "dual_clip": 3})
    assert (cfg.name, cfg.eps_high, cfg.dual_clip) == ("gspo", 0.28, 3)
    assert PolicyLossConfig().name is None  # unset: rl.algorithm's preset fills it


def test_unset_loss_name_is_an_error_not_a_default():
    logp, old, adv, mask = token_case([1.0], [1.0])
    with pytest.raises(ValueError, match=r"PolicyLossConfig.name is unset \(rl.loss.name"):
        policy_loss(logp, old, adv, mask, PolicyLossConfig(), Normaliser.local(mask))
