"""DePO (Decomposed Policy Optimization): RL on short contexts plus short-to-long self-distillation.

As specified in DESIGN.md (the DePO paper's objective): the policy is trained with a base RL
algorithm (GRPO, DAPO or GSPO; :mod:`megatron_lcr.rl.losses`) only on the *short* context
``(x, c_short)`` (gold documents plus a few distractors), giving ``L_PX``. The same responses, scored
by the same policy on the *long* context ``(x, c_long)`` (a superset of ``c_short``), add

- **DePO**: knowledge distillation from short to long context, the forward KL
  ``KL(pi(.|x, c_short) || pi(.|x, c_long))`` on the short-context rollouts whose reward is
  ``>= tau`` (tau = 1: exact match). The short-context side is the teacher and is detached; the
  long-context side is the student. ``L = L_PX + lam * L_KD``.
- **DePO-IW**: instead of KD, off-policy RL on the long context over *all* rollouts, with
  importance weights ``pi(o|x, c_long) / pi_old(o|x, c_short)`` at token level or sequence level
  (GSPO's length-normalised geometric mean), clipped as PPO, with the rollouts' (short-context)
  group advantages. ``L = L_PX + lam * L_IW``.

Two per-token KL estimators (``kd_estimator``):

- ``sampled``: ``log pi_short(y_t) - log pi_long(y_t)`` on the tokens the short-context policy
  sampled. Summed over a response it is an unbiased estimate of the sequence-level forward KL; its
  gradient is exactly the SFT (cross-entropy) gradient on the kept rollouts.
- ``full``: the exact per-position KL over the vocabulary, ``sum_v p_s (log p_s - log p_l)``, at each
  sampled prefix; summed over a response it is a lower-variance unbiased estimate of the same KL.

Choices the paper leaves open, made here:

- The KD loss is normalised over the *kept* rollouts only (build its :class:`Normaliser` from
  :func:`kd_mask`), so ``lam`` does not silently scale with the fraction of rollouts kept.
- The teacher log-probs of the sampled estimator are the rollout (old) short-context log-probs: its
  gradient does not depend on them, only the logged KL value does (equal on-policy).
- The IW objective is exactly :func:`megatron_lcr.rl.losses.policy_loss` (no dual clip, no KL or
  entropy terms) with ``long_logp`` as the policy and ``old_short_logp`` as the behaviour policy.
- :func:`depo_aux_loss` returns ``lam * L_KD`` (or ``lam * L_IW``) alone, so a trainer that runs the
  short and long forwards in separate micro-batches can back-propagate the two terms separately
  (gradients add); :func:`depo_loss` adds it to ``L_PX`` when one micro-batch carries both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from megatron_lcr.rl.losses import (
    AGGREGATIONS,
    LOG_RATIOS,
    Normaliser,
    PolicyLossConfig,
    aggregate,
    as_bool_mask,
    check_clip_range,
    lookup,
    policy_loss,
    upcast,
)

IMPORTANCE_LEVELS = ("none", *LOG_RATIOS)


@dataclass(kw_only=True)
class DePOConfig:
    """DePO's auxiliary long-context term: KD (sampled or full KL) or importance-weighted RL."""

    enabled: bool = False
    """Add the long-context term to the short-context RL loss."""
    lam: float = 1.0
    """lambda: weight of the KD (or IW) term relative to L_PX (dimensionless; paper: 0.5-1)."""
    tau: float = 1.0
    """Reward threshold: KD uses the short-context rollouts with reward >= tau (reward units)."""
    importance: str = "none"
    """'none': DePO (KD); 'token' or 'sequence': DePO-IW with token or GSPO sequence ratios."""
    kd_estimator: str = "sampled"
    """KD per-token KL: 'sampled' (on the sampled tokens) or 'full' (exact over the vocabulary)."""
    eps_low: float = 0.2
    """DePO-IW: ratios below 1 - eps_low are clipped (dimensionless)."""
    eps_high: float = 0.2
    """DePO-IW: ratios above 1 + eps_high are clipped (dimensionless)."""

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_LEVELS:
            valid = ", ".join(repr(k) for k in IMPORTANCE_LEVELS)
            raise ValueError(f"unknown importance {self.importance!r}; valid: {valid}")
        lookup(KD_ESTIMATORS, self.kd_estimator, "kd_estimator")
        check_clip_range(self.eps_low, self.eps_high, None)
        if self.lam < 0.0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.importance != "none" and self.kd_estimator != "sampled":
            raise ValueError(
                f"kd_estimator={self.kd_estimator!r} has no effect with importance="
                f"{self.importance!r} (DePO-IW uses no KD); use importance='none' or the default"
            )

    @property
    def mode(self) -> str:
        """The key of :data:`DEPO_TERMS` this config selects."""
        return "iw" if self.importance != "none" else f"kd-{self.kd_estimator}"

    def iw_loss_config(self, aggregation: str = "token-mean") -> PolicyLossConfig:
        """The PPO loss config of the DePO-IW term."""
        return PolicyLossConfig(
            ratio=self.importance, eps_low=self.eps_low, eps_high=self.eps_high, aggregation=aggregation
        )


# --------------------------------------------------------------------------- KD


def kd_keep(rewards: Tensor, tau: float) -> Tensor:
    """``rewards: [B] -> bool [B]``: the rollouts KD learns from (reward >= tau)."""
    return rewards >= tau


def kd_mask(mask: Tensor, keep: Tensor) -> Tensor:
    """``mask: [B, S]`` restricted to kept rows (``keep: bool [B]``), as bool: build the KD
    :class:`Normaliser` from this."""
    return as_bool_mask(mask) & keep[:, None].to(torch.bool)


def forward_kl_sampled(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-token estimate of KL(teacher || student) on tokens sampled from the teacher.

    ``student_logp`` (policy on the long context, with grad), ``teacher_logp`` (policy on the short
    context; detached here): ``[B, S] -> [B, S]``, ``teacher_logp - student_logp``.
    """
    return upcast(teacher_logp).detach() - upcast(student_logp)


def forward_kl_full(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Exact per-position KL(teacher || student) over the vocabulary: ``[..., V] -> [...]``.

    ``sum_v p_t (log p_t - log p_s)`` with ``p = softmax(logits / temperature)`` on both sides; the
    teacher is detached. Vocabulary entries the teacher gives probability 0 (logit -inf, e.g. padded
    vocab rows) contribute 0.
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_t = torch.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    log_p_s = torch.log_softmax(upcast(student_logits) / temperature, dim=-1)
    p_t = log_p_t.exp()
    return torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(dim=-1)


# Per-token KL(teacher || student) estimators by name: "sampled" takes log-probs [B, S], "full"
# takes logits [B, S, V].
KD_ESTIMATORS: dict[str, Callable[..., Tensor]] = {"sampled": forward_kl_sampled, "full": forward_kl_full}


def depo_kd_loss(
    per_token_kl: Tensor,
    mask: Tensor,
    keep: Tensor,
    norm: Normaliser,
    *,
    aggregation: str = "token-mean",
    num_rollouts: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KD loss over kept rollouts: ``per_token_kl, mask: [B, S]``, ``keep: bool [B]`` -> 0-dim.

    ``norm`` counts the kept rollouts' tokens (``Normaliser.counts(kd_mask(mask, keep))`` summed
    over the global batch). Metrics (detached 0-dim, summable): ``kd_loss``, ``kept_frac`` (kept rows
    with any masked-in token / ``num_rollouts``, the global rollout count; None: this micro-batch's B).
    """
    kept = kd_mask(mask, keep)
    loss = aggregate(per_token_kl, kept, aggregation, norm)
    total = num_rollouts if num_rollouts is not None else keep.shape[0]
    kept_frac = kept.any(dim=-1).to(torch.float32).sum() / max(total, 1)
    return loss, {"kd_loss": loss.detach(), "kept_frac": kept_frac.detach()}


# --------------------------------------------------------------------------- IW


def importance_weights(long_logp: Tensor, old_short_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """DePO-IW weights ``pi(y|x, c_long) / pi_old(y|x, c_short)``, all ``[B, S]``.

    'token': per token ``exp(long_logp - old_short_logp)``; 'sequence': GSPO's length-normalised
    geometric mean over the row, on every token (GSPO-token gradient form). 1 outside ``mask``.
    """
    return torch.exp(lookup(LOG_RATIOS, level, "importance level")(long_logp, old_short_logp, mask))


def depo_iw_loss(
    long_logp: Tensor,
    old_short_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: DePOConfig,
    norm: Normaliser,
    *,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DePO-IW: clipped PPO loss over all rollouts with importance weights of ``cfg.importance``.

    ``long_logp`` (with grad), ``old_short_logp``, ``mask``: ``[B, S]``; ``advantages``: ``[B]`` or
    ``[B, S]`` (the short-context group advantages); ``norm`` counts all rollouts' tokens.
    Returns :func:`policy_loss`'s ``(loss, metrics)``.
    """
    if cfg.importance == "none":
        raise ValueError("depo_iw_loss needs importance='token' or 'sequence', got 'none'")
    return policy_loss(long_logp, old_short_logp, advantages, mask, cfg.iw_loss_config(aggregation), norm)


# --------------------------------------------------------------------------- combination


@dataclass(frozen=True, kw_only=True)
class DePOInputs:
    """The long-context side of one micro-batch of short-context rollouts (B rows, S positions)."""

    long_logp: Tensor
    """``[B, S]`` log pi(y_t | x, c_long, y_<t) under the current policy, with grad (nats)."""
    mask: Tensor
    """``[B, S]`` 1 on the response tokens that count."""
    rewards: Tensor
    """``[B]`` the rollouts' rewards (reward units)."""
    short_logp: Tensor | None = None
    """``[B, S]`` rollout-time log pi_old(y_t | x, c_short, y_<t) (nats); sampled KD and IW."""
    advantages: Tensor | None = None
    """``[B]`` or ``[B, S]`` the rollouts' short-context group advantages; IW."""
    long_logits: Tensor | None = None
    """``[B, S, V]`` current policy's logits on the long context, with grad; full KD."""
    short_logits: Tensor | None = None
    """``[B, S, V]`` policy's logits on the short context (teacher; detached here); full KD."""
    full_kl: Tensor | None = None
    """``[B, S]`` the exact per-token KL(teacher || student) already computed (by the trainer's
    vocab-parallel kernel, which never gathers the logits); full KD uses it instead of the logits."""
    temperature: float = 1.0
    """Softmax temperature of both sides of the full KD (the sampling temperature)."""
    num_rollouts: int | None = None
    """Rollouts in the global batch, for a summable kept fraction; None: B."""

    def require(self, name: str, mode: str) -> Tensor:
        """Field ``name``, which DePO mode ``mode`` needs."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"DePO mode {mode!r} needs DePOInputs.{name}, got None")
        return value


def _kd_sampled(
    inputs: DePOInputs, cfg: DePOConfig, norm: Normaliser, aggregation: str
) -> tuple[Tensor, dict[str, Tensor]]:
    per_token = forward_kl_sampled(inputs.long_logp, inputs.require("short_logp", cfg.mode))
    keep = kd_keep(inputs.rewards, cfg.tau)
    return depo_kd_loss(
        per_token, inputs.mask, keep, norm, aggregation=aggregation, num_rollouts=inputs.num_rollouts
    )


def _kd_full(
    inputs: DePOInputs, cfg: DePOConfig, norm: Normaliser, aggregation: str
) -> tuple[Tensor, dict[str, Tensor]]:
    per_token = inputs.full_kl
    if per_token is None:
        per_token = forward_kl_full(
            inputs.require("long_logits", cfg.mode),
            inputs.require("short_logits", cfg.mode),
            temperature=inputs.temperature,
        )
    keep = kd_keep(inputs.rewards, cfg.tau)
    return depo_kd_loss(
        per_token, inputs.mask, keep, norm, aggregation=aggregation, num_rollouts=inputs.num_rollouts
    )


def _iw(
    inputs: DePOInputs, cfg: DePOConfig, norm: Normaliser, aggregation: str
) -> tuple[Tensor, dict[str, Tensor]]:
    loss, metrics = depo_iw_loss(
        inputs.long_logp,
        inputs.require("short_logp", cfg.mode),
        inputs.require("advantages", cfg.mode),
        inputs.mask,
        cfg,
        norm,
        aggregation=aggregation,
    )
    return loss, {f"iw_{k}": v for k, v in metrics.items()}


DePOTerm = Callable[[DePOInputs, DePOConfig, Normaliser, str], tuple[Tensor, dict[str, Tensor]]]
DEPO_TERMS: dict[str, DePOTerm] = {"kd-sampled": _kd_sampled, "kd-full": _kd_full, "iw": _iw}


def depo_aux_mask(mask: Tensor, rewards: Tensor, cfg: DePOConfig) -> Tensor:
    """The bool ``[B, S]`` mask the auxiliary term's :class:`Normaliser` counts: kept rollouts for
    KD, all rollouts for IW."""
    if cfg.importance != "none":
        return as_bool_mask(mask)
    return kd_mask(mask, kd_keep(rewards, cfg.tau))


def depo_aux_loss(
    inputs: DePOInputs, cfg: DePOConfig, norm: Normaliser, *, aggregation: str = "token-mean"
) -> tuple[Tensor, dict[str, Tensor]]:
    """``lam * L_KD`` or ``lam * L_IW`` of one micro-batch (0-dim), with ``depo/``-prefixed metrics.

    ``norm`` counts :func:`depo_aux_mask` over the global batch. Metrics are detached 0-dim tensors,
    reduced as :func:`megatron_lcr.rl.losses.metric_reduction` says; ``depo/aux_loss`` includes lam.
    """
    lookup(AGGREGATIONS, aggregation, "aggregation")
    term, metrics = lookup(DEPO_TERMS, cfg.mode, "DePO mode")(inputs, cfg, norm, aggregation)
    loss = cfg.lam * term
    out = {f"depo/{k}": v for k, v in metrics.items()}
    out["depo/aux_loss"] = loss.detach()
    return loss, out


def depo_loss(
    px: tuple[Tensor, dict[str, Tensor]],
    inputs: DePOInputs,
    cfg: DePOConfig,
    aux_norm: Normaliser,
    *,
    aggregation: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DePO's objective ``L = L_PX + lam * L_KD`` (or ``+ lam * L_IW``) for one micro-batch.

    ``px`` is :func:`policy_loss`'s ``(loss, metrics)`` on the short context; ``aux_norm`` counts
    :func:`depo_aux_mask`. With ``cfg.enabled`` False, ``px`` is returned unchanged. The metrics
    are ``px``'s, the ``depo/`` ones, and ``loss`` (the total).
    """
    px_loss, px_metrics = px
    if not cfg.enabled:
        return px_loss, px_metrics
    aux_loss, aux_metrics = depo_aux_loss(inputs, cfg, aux_norm, aggregation=aggregation)
    loss = px_loss + aux_loss
    return loss, {**px_metrics, **aux_metrics, "loss": loss.detach()}
