"""Policy-gradient losses: the registry :data:`POLICY_LOSSES` (PPO's clipped surrogate with token or
sequence importance ratios, CISPO's clipped importance weights), KL estimators, and loss aggregation
over a global batch.

``PolicyLossConfig.name`` (config key ``rl.loss.name``) selects the per-token loss: ``"ppo"`` (token
ratios, clipped: GRPO / DAPO), ``"gspo"`` (GSPO-token sequence ratios, clipped) or ``"cispo"``.
``rl.algorithm`` fills it when it is unset (see ``ALGORITHM_PRESETS`` in
:mod:`megatron_lcr.train.rl.config`).

Algorithms and where they come from:

- PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"): per token
  ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.
- GRPO (Shao et al. 2024, DeepSeekMath): token ratios ``r_t = pi(y_t) / pi_old(y_t)`` with group
  advantages (see :mod:`megatron_lcr.rl.advantages`) and a k3 KL penalty to a reference policy.
- DAPO (Yu et al. 2025): clip-higher (``eps_high > eps_low``, e.g. 0.28 vs 0.2) and the token-level
  loss (``aggregation="token-mean"``).
- GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the sequence ratio
  ``s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|) = exp(mean_t log r_t)``, clipped per sequence. We
  implement the paper's **GSPO-token** form ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: its value is
  ``s_i`` on every token, and the gradient of a token's term flows only through that token's log-prob,
  scaled by ``s_i``. With per-sequence advantages and ``aggregation="seq-mean-token-mean"`` this is
  GSPO's objective in value and gradient (the paper's Eq. for GSPO-token says so); with per-token
  advantages it is GSPO-token. Other aggregations weight sequences by length, a deliberate choice of
  the caller.
- CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
  Attention"): REINFORCE with clipped, stop-gradient importance-sampling weights and token ratios
  ``r_{i,t}``, ``J = sum_{i,t} sg(clip(r_{i,t}, 1 - eps_low, 1 + eps_high)) A_{i,t} log pi(o_{i,t})
  / sum_i |o_i|``; per token ``loss = -sg(clip(r_t)) A_t logp_t`` and gradient
  ``-clip(r_t) A_t`` w.r.t. ``logp_t`` for *every* token: clipping bounds the weight, it never
  drops a token (PPO zeroes the gradient of a token whose ratio left the clip range in the direction
  of its advantage). The paper's normaliser is the token count (``aggregation="token-mean"``); it
  imposes no lower bound (a large ``eps_low``; here ``eps_low < 1`` keeps ``1 - eps_low > 0``, so
  0.99 comes close) and tunes ``eps_high``. The loss *value* is ``-w A logp``, not PPO's ``-r A``,
  so its ``pg_loss`` is not comparable with PPO's.
- Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
  Learning"): for ``A < 0`` the PPO loss ``|A| max(r, clip(r))`` grows without bound in ``r``; dual
  clip caps it at ``c |A|`` (``c > 1``), i.e. per token ``min(ppo_loss, -c A)`` when ``A < 0``.
- KL estimators k1/k2/k3 (Schulman 2020, "Approximating KL Divergence"), of ``KL(pi || ref)`` from
  samples of ``pi``.
- Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``seq-mean-token-sum-norm``
  divides the token sum by a constant (the maximum response length), not by each sequence's length.

Deviations and conventions:

- Every aggregation divides a micro-batch's partial sum by a *global* :class:`Normaliser`, so the sum
  of the losses (and gradients) of all micro-batches on all data-parallel ranks equals the loss of the
  whole global batch. A global count of 0 is treated as 1 (the partial sums are then 0 too).
- ``num_sequences`` counts sequences with at least one counted token, so masking a whole sequence out
  (e.g. a truncated response) is the same as removing it from the batch.
- Log-ratios are clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp``: ``exp(20)`` is far
  outside any clip range, and without the clamp an overflowing ``exp`` gives ``inf * 0 = NaN`` in the
  backward of the clipped branch. Tokens beyond the clamp get no gradient through the ratio
  (PPO, GSPO; CISPO's weight carries no gradient anyway).
- Math runs in at least fp32: bf16/fp16 inputs are upcast; float64 stays float64 (for references).
- Padded positions (``mask == 0``) may hold any finite or non-finite value: they are replaced by 0
  before use, so they affect neither the loss nor the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from megatron_lcr.registry import lookup

# exp(20) ~ 4.9e8: far outside any PPO clip range, and safely finite in fp32 (overflow at ~88).
LOG_RATIO_CLAMP = 20.0


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least fp32 (bf16/fp16 -> fp32; fp32/fp64 unchanged)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_bool_mask(mask: Tensor) -> Tensor:
    """A 0/1 (float or bool) mask as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


# --------------------------------------------------------------------------- normaliser


@dataclass(frozen=True, kw_only=True)
class Normaliser:
    """Global denominators of a loss: counts over the whole global batch, not one micro-batch."""

    num_tokens: int
    """Counted (mask == 1) response tokens in the global batch (tokens)."""
    num_sequences: int
    """Sequences with at least one counted token in the global batch (sequences)."""
    max_response_len: int
    """Dr.GRPO's constant divisor: the configured maximum response length (tokens)."""

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or self.num_sequences < 0:
            raise ValueError(
                f"num_tokens ({self.num_tokens}) and num_sequences ({self.num_sequences}) "
                f"must be >= 0"
            )
        if self.max_response_len < 1:
            raise ValueError(f"max_response_len must be >= 1, got {self.max_response_len}")

    @staticmethod
    def counts(mask: Tensor) -> Tensor:
        """``[num_tokens, num_sequences]`` of ``mask: [B, S]`` as float64 ``[2]``: sum these over
        micro-batches and all-reduce them over data-parallel ranks, then call :meth:`from_counts`."""
        m = as_bool_mask(mask)
        return torch.stack([m.sum(), m.any(dim=-1).sum()]).to(torch.float64)

    @classmethod
    def from_counts(cls, counts: Tensor | Sequence[float], max_response_len: int) -> Normaliser:
        """The normaliser of summed :meth:`counts` (``[2]``: tokens, sequences)."""
        tokens, sequences = (int(round(float(c))) for c in counts)
        return cls(num_tokens=tokens, num_sequences=sequences, max_response_len=max_response_len)

    @classmethod
    def local(cls, mask: Tensor, max_response_len: int | None = None) -> Normaliser:
        """The normaliser of one batch ``mask: [B, S]`` on its own; ``max_response_len`` defaults to
        the padded width ``S`` (pass the configured maximum for Dr.GRPO)."""
        return cls.from_counts(cls.counts(mask), max_response_len or mask.shape[-1])


# --------------------------------------------------------------------------- aggregation


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` with positions outside ``mask`` set to 0 (gradient-safe, unlike ``values * mask``
    when a padded value is inf/NaN)."""
    return torch.where(as_bool_mask(mask), upcast(values), 0.0)


def _token_mean(values: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    return _masked(values, mask).sum() / max(norm.num_tokens, 1)


def _seq_mean_token_mean(values: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    # Empty rows: 0 / 1 = 0, and they are not counted in num_sequences.
    lengths = as_bool_mask(mask).sum(dim=-1).clamp_min(1)
    return (_masked(values, mask).sum(dim=-1) / lengths).sum() / max(norm.num_sequences, 1)


def _seq_mean_token_sum(values: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    return _masked(values, mask).sum() / max(norm.num_sequences, 1)


def _seq_mean_token_sum_norm(values: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    return _masked(values, mask).sum() / (max(norm.num_sequences, 1) * norm.max_response_len)


AggregationFn = Callable[[Tensor, Tensor, Normaliser], Tensor]
AGGREGATIONS: dict[str, AggregationFn] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: Normaliser) -> Tensor:
    """Reduce per-token ``values: [B, S]`` over ``mask: [B, S]`` to a 0-dim tensor.

    token-mean: ``sum(x) / num_tokens``; seq-mean-token-mean: ``sum_b (sum_t x / len_b) /
    num_sequences``; seq-mean-token-sum: ``sum(x) / num_sequences``; seq-mean-token-sum-norm:
    ``sum(x) / (num_sequences * max_response_len)``. Sums run over masked positions only.
    """
    return lookup(AGGREGATIONS, mode, "aggregation")(values, mask, norm)


# --------------------------------------------------------------------------- KL estimators


def _log_r(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return upcast(ref_logp) - upcast(logp)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = -log r, r = ref / pi: unbiased, high variance, can be negative. ``[B, S] -> [B, S]``."""
    return -_log_r(logp, ref_logp)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2: biased, low variance, >= 0. ``[B, S] -> [B, S]``."""
    return 0.5 * _log_r(logp, ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = r - 1 - log r: unbiased, low variance, >= 0 (``e^x >= 1 + x``). ``[B, S] -> [B, S]``.

    log r is clamped to ``+-LOG_RATIO_CLAMP``: a token the reference finds far likelier than the
    policy would overflow ``exp`` to inf (and NaN gradients). The clamp keeps ``k3 >= 0``.
    """
    log_r = _log_r(logp, ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_r) - 1.0 - log_r


KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# --------------------------------------------------------------------------- importance ratios


def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """PPO/GRPO: ``log r_t = logp_t - old_logp_t`` (clamped). All ``[B, S]``; 0 outside ``mask``."""
    diff = _masked(logp, mask) - _masked(old_logp, mask).detach()
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO-token: ``log s_{i,t} = sg[log s_i] + logp_t - sg[logp_t]``, all ``[B, S]``.

    ``log s_i = mean_{t in mask} (logp_t - old_logp_t)``, i.e. ``s_i`` is the geometric mean of the
    sequence's token ratios. The value on every token of row ``i`` is ``log s_i``; the gradient of
    token t's term flows through ``logp_t`` alone. Rows with no counted token get ratio 1.
    """
    logp = _masked(logp, mask)
    lengths = as_bool_mask(mask).sum(dim=-1, keepdim=True).clamp_min(1)
    seq = (logp - _masked(old_logp, mask)).sum(dim=-1, keepdim=True) / lengths
    seq = seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    return seq + logp - logp.detach()


# --------------------------------------------------------------------------- clipped surrogate


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss (to minimise) and where each clip is active.

    ``ratio, advantages: [B, S]`` -> ``loss: [B, S]`` and bool ``[B, S]`` flags ``clip_low``
    (A < 0, r < 1 - eps_low), ``clip_high`` (A > 0, r > 1 + eps_high), ``dual_clip`` (A < 0, r > c):
    the tokens whose gradient the clipping zeroes.

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; with dual clip ``c``, for ``A < 0``:
    ``loss = min(that, -c A)`` (the objective ``max(min(rA, clip(r)A), cA)`` negated).
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    flags = {
        "clip_low": negative & (ratio < 1.0 - eps_low),
        "clip_high": (advantages > 0) & (ratio > 1.0 + eps_high),
    }
    if dual_clip is not None:
        loss = torch.where(negative, torch.minimum(loss, -dual_clip * advantages), loss)
        flags["dual_clip"] = negative & (ratio > dual_clip)
    return loss, flags


PerTokenLoss = tuple[Tensor, Tensor, dict[str, Tensor]]


def _clipped_loss(log_ratio: Tensor, advantages: Tensor, cfg: PolicyLossConfig) -> PerTokenLoss:
    ratio = torch.exp(log_ratio)
    loss, flags = clipped_surrogate(
        ratio, advantages, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip
    )
    return loss, ratio, flags


def ppo_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: PolicyLossConfig
) -> PerTokenLoss:
    """PPO/GRPO/DAPO with token ratios: all inputs ``[B, S]`` -> ``(loss, ratio, clip flags)``,
    each ``[B, S]`` (flags as in :func:`clipped_surrogate`)."""
    return _clipped_loss(token_log_ratio(logp, old_logp, mask), advantages, cfg)


def gspo_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: PolicyLossConfig
) -> PerTokenLoss:
    """GSPO(-token) with sequence ratios: all inputs ``[B, S]`` -> ``(loss, ratio, clip flags)``,
    each ``[B, S]``; the ratio is the row's length-normalised sequence ratio on every token."""
    return _clipped_loss(sequence_log_ratio(logp, old_logp, mask), advantages, cfg)


def cispo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: PolicyLossConfig
) -> PerTokenLoss:
    """CISPO (MiniMax-M1): all inputs ``[B, S]`` -> ``(loss, ratio, clip flags)``, each ``[B, S]``.

    ``loss = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp`` with token ratios ``r`` (clamped
    log-ratio), so ``d loss / d logp = -clip(r) A`` on every token. Flags ``clip_low`` (r < 1 -
    eps_low) and ``clip_high`` (r > 1 + eps_high): the tokens whose weight the clip bounded, of
    either advantage sign; their gradient is scaled, not zeroed.
    """
    ratio = torch.exp(token_log_ratio(logp, old_logp, mask)).detach()
    weight = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    flags = {"clip_low": ratio < 1.0 - cfg.eps_low, "clip_high": ratio > 1.0 + cfg.eps_high}
    return -weight * advantages * _masked(logp, mask), ratio, flags


# Keyed by PolicyLossConfig.name; values (logp, old_logp, advantages, mask, cfg) -> PerTokenLoss.
POLICY_LOSSES: dict[str, Callable[..., PerTokenLoss]] = {
    "ppo": ppo_token_loss,
    "gspo": gspo_token_loss,
    "cispo": cispo_loss,
}


# --------------------------------------------------------------------------- config and loss


def check_clip_range(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    """Validate PPO clip parameters (shared by every config that clips a ratio)."""
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1) so that 1 - eps_low > 0, got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    if dual_clip is not None and dual_clip <= 1.0 + eps_high:
        # Otherwise the cap would bite inside the trust region, on ratios PPO leaves unclipped.
        raise ValueError(
            f"dual_clip ({dual_clip}) must exceed 1 + eps_high ({1.0 + eps_high}), the upper clip bound"
        )


@dataclass(kw_only=True)
class PolicyLossConfig:
    """The policy-gradient loss: which loss, clipping, aggregation, KL and entropy terms."""

    name: str | None = None
    """A key of POLICY_LOSSES: 'ppo' (token ratios: GRPO/DAPO), 'gspo' (sequence ratios; its paper
    clips at ~3e-4/4e-4) or 'cispo' (clipped IS weights); None: rl.algorithm's preset sets it."""
    eps_low: float = 0.2
    """Lower clip range: ratios below 1 - eps_low are clipped (dimensionless)."""
    eps_high: float = 0.2
    """Upper clip range: ratios above 1 + eps_high are clipped (dimensionless; DAPO: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens (multiple of |A|); None: off."""
    aggregation: str = "token-mean"
    """How per-token losses reduce to a scalar: a key of AGGREGATIONS."""
    kl_coef: float = 0.0
    """Weight of the KL(pi || ref) penalty (per unit of aggregated KL, nats); 0: no reference needed."""
    kl_estimator: str = "k3"
    """Per-token KL estimator: 'k1', 'k2' or 'k3' (Schulman 2020)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (per unit of aggregated entropy, nats); subtracted from the loss."""

    def __post_init__(self) -> None:
        if self.name is not None:
            lookup(POLICY_LOSSES, self.name, "policy loss")
        if self.name == "cispo" and self.dual_clip is not None:
            raise ValueError(f"dual_clip={self.dual_clip} has no effect with name='cispo' (its weights "
                             "are capped at 1 + eps_high); leave dual_clip unset")
        lookup(AGGREGATIONS, self.aggregation, "aggregation")
        lookup(KL_ESTIMATORS, self.kl_estimator, "kl_estimator")
        check_clip_range(self.eps_low, self.eps_high, self.dual_clip)
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.entropy_coef < 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")


def metric_reduction(key: str) -> str:
    """How to combine a metric over micro-batches and data-parallel ranks: 'max' for keys ending in
    '_max', else 'sum' (those are partial sums already divided by the global normaliser)."""
    return "max" if key.endswith("_max") else "sum"


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    norm: Normaliser,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy-gradient loss ``cfg.name`` of one micro-batch, plus optional KL penalty and entropy bonus.

    Shapes: ``logp`` (with grad), ``old_logp``, ``ref_logp``, ``entropy`` (with grad), ``mask``:
    ``[B, S]``; ``advantages``: ``[B]`` (one per sequence) or ``[B, S]``.
    ``loss = agg(pg) + kl_coef * agg(k(logp, ref_logp)) - entropy_coef * agg(entropy)``, each
    ``agg`` being ``cfg.aggregation`` over the global ``norm``.

    Metrics are detached 0-dim tensors (no host sync); reduce with :func:`metric_reduction`.
    ``pg_loss``/``kl_loss``/``entropy_loss`` use ``cfg.aggregation``; ``clip_frac*``,
    ``ratio_mean``, ``kl``, ``entropy`` are token means over ``norm.num_tokens``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    # Zero padded positions once, so junk there reaches neither the loss nor the gradient.
    logp, old_logp = _masked(logp, mask), _masked(old_logp, mask).detach()
    advantages = _masked(advantages, mask).detach()
    if cfg.name is None:
        raise ValueError("PolicyLossConfig.name is unset (rl.loss.name; rl.algorithm's preset fills it)")
    per_token, ratio, flags = lookup(POLICY_LOSSES, cfg.name, "policy loss")(
        logp, old_logp, advantages, mask, cfg
    )
    pg_loss = aggregate(per_token, mask, cfg.aggregation, norm)
    loss = pg_loss

    def token_mean(x: Tensor) -> Tensor:
        return _token_mean(x.detach(), mask, norm)

    metrics = {"pg_loss": pg_loss.detach(), "ratio_mean": token_mean(ratio)}
    metrics["ratio_max"] = _masked(ratio.detach(), mask).max() if ratio.numel() else ratio.new_zeros(())
    metrics["clip_frac"] = sum(token_mean(f.to(ratio.dtype)) for f in flags.values())
    metrics.update({f"{k}_frac": token_mean(f.to(ratio.dtype)) for k, f in flags.items()})
    if ref_logp is not None:
        estimator = lookup(KL_ESTIMATORS, cfg.kl_estimator, "kl_estimator")
        kl = estimator(logp, _masked(ref_logp, mask).detach())
        metrics["kl"] = token_mean(kl)
        if cfg.kl_coef > 0.0:
            kl_loss = aggregate(kl, mask, cfg.aggregation, norm)
            loss = loss + cfg.kl_coef * kl_loss
            metrics["kl_loss"] = kl_loss.detach()
    elif cfg.kl_coef > 0.0:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp, got None")
    if entropy is not None:
        entropy = _masked(entropy, mask)
        metrics["entropy"] = token_mean(entropy)
        if cfg.entropy_coef > 0.0:
            entropy_loss = aggregate(entropy, mask, cfg.aggregation, norm)
            loss = loss - cfg.entropy_coef * entropy_loss
            metrics["entropy_loss"] = entropy_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
