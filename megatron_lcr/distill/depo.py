"""DePO (Decomposed Policy Optimization): RL on short contexts plus short-to-long self-distillation.

As specified in DESIGN.md (the DePO paper's objective): the policy is trained with a base RL
algorithm (GRPO, DAPO or GSPO; :mod:`megatron_lcr.rl.losses`) only on the *short* context
``(x, c_short)`` (gold documents plus a few distractors), giving ``L_PX``. The same responses, scored
by the same policy on the *long* context ``(x, c_long)`` (a superset of ``c_short``), add

- **DePO** (objective ``depo``): knowledge distillation from short to long context, the forward KL
  ``KL(pi(.|x, c_short) || pi(.|x, c_long))`` on the short-context rollouts whose reward is
  ``>= tau`` (tau = 1: exact match). The short-context side is the teacher and is detached; the
  long-context side is the student. ``L = L_PX + lam * L_KD``.
- **DePO-IW** (objective ``depo-iw``): instead of KD, off-policy RL on the long context over *all*
  rollouts, with importance weights ``pi(o|x, c_long) / pi_old(o|x, c_short)`` at token level or
  sequence level (GSPO's length-normalised geometric mean), clipped as PPO, with the rollouts'
  (short-context) group advantages. ``L = L_PX + lam * L_IW``.

Two per-token KL estimators (``kd_estimator``):

- ``sampled``: ``log pi_short(y_t) - log pi_long(y_t)`` on the tokens the short-context policy
  sampled. Summed over a response it is an unbiased estimate of the sequence-level forward KL; its
  gradient is exactly the SFT (cross-entropy) gradient on the kept rollouts.
- ``full``: the exact per-position KL over the vocabulary, ``sum_v p_s (log p_s - log p_l)``, at each
  sampled prefix; summed over a response it is a lower-variance unbiased estimate of the same KL. The
  trainer computes it with the fused vocab-parallel kernels from the two views in one micro-batch
  (``Needs.pair_kl``), so no ``[tokens, vocab]`` tensor exists.

Choices the paper leaves open, made here:

- The KD loss is normalised over the *kept* rollouts only, so ``lam`` does not silently scale with
  the fraction of rollouts kept.
- The teacher log-probs of the sampled estimator are the rollout (old) short-context log-probs: its
  gradient does not depend on them, only the logged KL value does (equal on-policy).
- The IW objective is exactly :func:`megatron_lcr.rl.losses.policy_loss` (no dual clip, no KL or
  entropy terms) with ``long_logp`` as the policy and ``old_short_logp`` as the behaviour policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_lcr.registry import lookup
from megatron_lcr.rl.losses import (
    Normaliser,
    PolicyLossConfig,
    aggregate,
    as_bool_mask,
    check_clip_range,
    policy_loss,
    upcast,
)
from megatron_lcr.rl.objective import LongPrompt, Needs, PolicyGradient, role_normaliser, policy_view, trains_on
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch, TokenSequence

KD_ESTIMATORS = ("sampled", "full")
# DePO-IW's importance level -> the policy loss that clips that ratio.
IW_LOSSES = {"token": "ppo", "sequence": "gspo"}


@dataclass(kw_only=True)
class DePOConfig:
    """DePO's auxiliary long-context term: KD (objective ``depo``) or importance-weighted RL (``depo-iw``)."""

    lam: float = 1.0
    """lambda: weight of the KD (or IW) term relative to L_PX (dimensionless; the paper's Table 6 uses
    1.0, its appendix finds 0.5 best)."""
    tau: float = 1.0
    """Reward threshold: KD uses the short-context rollouts with reward >= tau (reward units)."""
    kd_estimator: str = "sampled"
    """``depo``: the per-token KL, 'sampled' (on the sampled tokens) or 'full' (exact over the vocabulary)."""
    importance: str = "token"
    """``depo-iw``: 'token' or 'sequence' (GSPO) importance ratios."""
    eps_low: float = 0.2
    """DePO-IW: ratios below 1 - eps_low are clipped (dimensionless)."""
    eps_high: float = 0.2
    """DePO-IW: ratios above 1 + eps_high are clipped (dimensionless)."""

    def __post_init__(self) -> None:
        lookup(IW_LOSSES, self.importance, "depo.importance")
        lookup(dict.fromkeys(KD_ESTIMATORS), self.kd_estimator, "depo.kd_estimator")
        check_clip_range(self.eps_low, self.eps_high, None)
        if self.lam < 0.0:
            raise ValueError(f"depo.lam must be >= 0, got {self.lam}")

    def iw_loss_config(self, aggregation: str = "token-mean") -> PolicyLossConfig:
        """The PPO loss config of the DePO-IW term."""
        return PolicyLossConfig(name=IW_LOSSES[self.importance], eps_low=self.eps_low, eps_high=self.eps_high,
                                aggregation=aggregation)


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


def depo_iw_loss(long_logp: Tensor, old_short_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: DePOConfig,
                 norm: Normaliser, *, aggregation: str = "token-mean") -> tuple[Tensor, dict[str, Tensor]]:
    """DePO-IW: clipped PPO loss over all rollouts with importance weights of ``cfg.importance``.

    ``long_logp`` (with grad), ``old_short_logp``, ``mask``: ``[B, S]``; ``advantages``: ``[B]`` or
    ``[B, S]`` (the short-context group advantages); ``norm`` counts all rollouts' tokens.
    Returns :func:`policy_loss`'s ``(loss, metrics)``.
    """
    return policy_loss(long_logp, old_short_logp, advantages, mask, cfg.iw_loss_config(aggregation), norm)


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class DePONorms:
    """Global counts of one update: ``L_PX``'s (short views in the loss) and the long views'."""

    px: Normaliser
    long: Normaliser
    num_rollouts: int


@dataclass
class DePO:
    """``L_PX + lam * L_KD`` (objective ``depo``); ``L_PX`` is ``policy``'s loss on the short views."""

    policy: PolicyGradient
    cfg: DePOConfig

    @property
    def needs(self) -> Needs:
        return Needs(ref=self.policy.needs.ref, entropy=self.policy.needs.entropy,
                     pair_kl=self.cfg.kd_estimator == "full")

    def keeps(self, rollout: Rollout) -> bool:
        """Whether the rollout's long view is trained on (KD: reward >= tau)."""
        return rollout.reward >= self.cfg.tau

    def sequences(self, rollouts: Sequence[Rollout], long_prompt: LongPrompt) -> list[TokenSequence]:
        out = []
        for k, r in enumerate(rollouts):
            if not r.response:
                continue  # nothing to score (an engine that returned no token)
            px, long = trains_on(r, mask_truncated=self.policy.mask_truncated), self.keeps(r)
            if px or long:  # the short view is always scored: its log-probs are the long view's teacher
                out.append(policy_view(k, r, in_loss=px, in_update=px or (long and self.needs.pair_kl)))
            if long:
                out.append(TokenSequence(long_prompt(r.sample), r.response, Role.LONG_CONTEXT, rollout=k,
                                         reward=r.reward, advantage=r.advantage))
        return out

    def normalisers(self, sequences: Sequence[TokenSequence], num_rollouts: int) -> DePONorms:
        limit = self.policy.max_response_len
        return DePONorms(role_normaliser(sequences, Role.POLICY, limit),
                         role_normaliser(sequences, Role.LONG_CONTEXT, limit), num_rollouts)

    def long_term(self, batch: TokenBatch, mask: Tensor, norms: DePONorms) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_KD`` of the long views (``mask``) and its metrics."""
        per_token = batch.pair_kl if self.needs.pair_kl else forward_kl_sampled(batch.logp, batch.old_logp)
        return depo_kd_loss(per_token, mask, kd_keep(batch.reward, self.cfg.tau), norms.long,
                            aggregation=self.policy.loss_cfg.aggregation, num_rollouts=norms.num_rollouts)

    def loss(self, batch: TokenBatch, norms: DePONorms) -> tuple[Tensor, dict[str, Tensor]]:
        px_loss, metrics = self.policy.loss(batch, norms.px)
        term, term_metrics = self.long_term(batch, batch.token_mask(Role.LONG_CONTEXT), norms)
        aux = self.cfg.lam * term
        loss = px_loss + aux
        return loss, {**metrics, **{f"depo/{k}": v for k, v in term_metrics.items()},
                      "depo/aux_loss": aux.detach(), "loss": loss.detach()}


@dataclass
class DePOIW(DePO):
    """``L_PX + lam * L_IW`` (objective ``depo-iw``): importance-weighted RL on every long view."""

    @property
    def needs(self) -> Needs:
        return self.policy.needs

    def keeps(self, rollout: Rollout) -> bool:
        return True

    def long_term(self, batch: TokenBatch, mask: Tensor, norms: DePONorms) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = depo_iw_loss(batch.logp, batch.old_logp, batch.advantage, mask, self.cfg, norms.long,
                                     aggregation=self.policy.loss_cfg.aggregation)
        return loss, {f"iw_{k}": v for k, v in metrics.items()}
