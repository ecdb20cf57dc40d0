"""Distillation objectives: on-policy distillation (``opd``), dGRPO (``dgrpo``) and the forward-KL warmup
(``fkl``), on the typed step of :mod:`megatron_lcr.rl.objective`.

- **OPD** (the student's own rollouts, the per-token reverse KL to the teacher): as a direct loss
  (``sg(k1) * log pi_s``, whose expected gradient is the KL's, or the exact KL over the vocabulary from a
  Megatron teacher's hidden states) or as a dense reward (advantage ``-lam * KL`` per token, through the
  clipped policy loss of ``rl.loss``, without its KL penalty or entropy bonus). Every rollout with a
  response counts: the teacher's opinion is a signal even where the task rewards of a group are all equal.
- **dGRPO** (Combining On-Policy Optimization and Distillation for Long-Context Reasoning): GRPO's (or
  DAPO's / GSPO's) clipped loss on the same rollouts plus ``lam`` times OPD, one objective:
  ``L = L_PG + lam * L_OPD`` (mode 'loss'), or ``L_PG`` plus the clipped loss of the dense reward
  ``-lam * KL`` (mode 'reward'; lam = 0 is exactly the policy loss either way). ``rl.context`` chooses
  short or long prompts as for the other baselines.
- **Forward-KL warmup** (stage 2a of the sparse-to-dense workflow): the rollouts are sampled by the
  teacher (``Needs.teacher_rollouts``); the student minimises ``KL(teacher || student)`` per token on
  them, from the teacher's sampled-token log-probs (the engine's, at the rollout temperature; the
  gradient is SFT's on the teacher's tokens) or exactly from a Megatron teacher's hidden states.

All terms divide by global token counts of one update (``rl.loss.aggregation``), like the policy loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from torch import Tensor

from megatron_lcr.distill.config import FKLConfig, OPDConfig
from megatron_lcr.distill.opd import reverse_kl_pg_loss, reverse_kl_sampled, topk_forward_kl, topk_reverse_kl
from megatron_lcr.rl.losses import Normaliser, aggregate, policy_loss, upcast
from megatron_lcr.rl.objective import LongPrompt, Needs, PolicyGradient, policy_view, role_normaliser, trains_on
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch, TokenSequence


@dataclass(frozen=True)
class DistillNorms:
    """Global counts of one update: the policy-gradient term's (views in the loss) and every view's."""

    pg: Normaliser
    all: Normaliser


def _every_view_normaliser(sequences: Sequence[TokenSequence], max_response_len: int) -> Normaliser:
    views = [s for s in sequences if s.role == Role.POLICY]
    return Normaliser(num_tokens=sum(len(s.response) for s in views), num_sequences=len(views),
                      max_response_len=max_response_len)


def _token_mean(values: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """A summable metric: ``sum(values * mask) / global tokens``, detached."""
    return ((upcast(values) * mask).sum() / max(norm.num_tokens, 1)).detach()


def _topk_masses(prefix: str, batch: TokenBatch, mask: Tensor, norm: Normaliser) -> dict[str, Tensor]:
    """How much of each model's mass the teacher's top-k set holds (token means): what the tail carries."""
    return {f"{prefix}/teacher_topk_mass": _token_mean(batch.teacher_topk_logp.exp().sum(-1), mask, norm),
            f"{prefix}/student_topk_mass": _token_mean(batch.topk_logp.exp().sum(-1), mask, norm)}


@dataclass
class OnPolicyDistillation:
    """OPD alone (objective ``opd``): ``lam * KL(student || teacher)`` on the student's rollouts."""

    policy: PolicyGradient
    """Supplies the aggregation, the response-length divisor and, in 'reward' mode, the clipped loss."""
    cfg: OPDConfig
    with_policy_loss: ClassVar[bool] = False
    """Whether the task's policy-gradient loss is part of the objective (dGRPO)."""

    @property
    def needs(self) -> Needs:
        full = self.cfg.estimator == "full"  # the exact KL needs the teacher's hidden states, not its log-probs
        topk = self.cfg.estimator == "topk"  # the set KL needs an engine's top-k, not the sampled token's log-prob
        return Needs(old=self.cfg.mode == "reward" or self.with_policy_loss,
                     ref=self.policy.needs.ref, entropy=self.policy.needs.entropy, teacher=not (full or topk),
                     teacher_kl="reverse" if full else None, teacher_topk=self.cfg.top_k if topk else 0)

    def in_pg(self, rollout: Rollout) -> bool:
        """Whether the rollout's task advantage enters the loss (not for OPD alone)."""
        return False

    def sequences(self, rollouts: Sequence[Rollout], long_prompt: LongPrompt) -> list[TokenSequence]:
        return [policy_view(k, r, in_loss=self.in_pg(r), in_update=True) for k, r in enumerate(rollouts) if r.response]

    def normalisers(self, sequences: Sequence[TokenSequence], num_rollouts: int) -> DistillNorms:
        limit = self.policy.max_response_len
        return DistillNorms(role_normaliser(sequences, Role.POLICY, limit), _every_view_normaliser(sequences, limit))

    def per_token_kl(self, batch: TokenBatch) -> Tensor:
        """``[n, R]`` the chosen estimate of ``KL(student || teacher)`` at each sampled prefix."""
        if self.cfg.estimator == "full":
            return batch.teacher_kl
        if self.cfg.estimator == "topk":
            return topk_reverse_kl(batch.topk_logp, batch.teacher_topk_logp, tail=self.cfg.tail)
        return reverse_kl_sampled(batch.distill_logp, batch.teacher_logp, self.cfg.estimator)

    def loss(self, batch: TokenBatch, norms: DistillNorms) -> tuple[Tensor, dict[str, Tensor]]:
        every = batch.mask * (batch.role == int(Role.POLICY)).to(batch.mask.dtype)[:, None]
        kl = self.per_token_kl(batch)
        metrics = {"opd/kl": _token_mean(kl, every, norms.all)}
        if self.cfg.estimator == "topk":
            metrics.update(_topk_masses("opd", batch, every, norms.all))
        if self.cfg.mode == "reward":
            return self._reward_loss(batch, kl, every, norms, metrics)
        exact = self.cfg.estimator in ("full", "topk")  # differentiable as they stand: the KL is the loss
        term = kl if exact else reverse_kl_pg_loss(batch.distill_logp, batch.teacher_logp)
        opd = self.cfg.lam * aggregate(term, every, self.policy.loss_cfg.aggregation, norms.all)
        loss, pg_metrics = self._pg_loss(batch, norms)
        loss = opd if loss is None else loss + opd
        return loss, {**pg_metrics, **metrics, "opd/loss": opd.detach(), "loss": loss.detach()}

    def _pg_loss(self, batch: TokenBatch, norms: DistillNorms) -> tuple[Tensor | None, dict[str, Tensor]]:
        return None, {}

    def _reward_loss(self, batch: TokenBatch, kl: Tensor, every: Tensor, norms: DistillNorms,
                     metrics: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_PG`` (dGRPO) plus the clipped policy loss of every view with per-token advantages ``-lam * KL``:
        a dense reward term of its own, so that ``lam = 0`` is exactly the policy loss."""
        advantages = (-self.cfg.lam * upcast(kl)).detach()
        opd, opd_metrics = policy_loss(batch.logp, batch.old_logp, advantages, every, self.policy.loss_cfg, norms.all)
        loss, pg_metrics = self._pg_loss(batch, norms)
        loss = opd if loss is None else loss + opd
        return loss, {**pg_metrics, **metrics, **{f"opd/{k}": v for k, v in opd_metrics.items()},
                      "opd/loss": opd.detach(), "loss": loss.detach()}


@dataclass
class DGRPO(OnPolicyDistillation):
    """dGRPO (objective ``dgrpo``): the policy loss of ``rl`` on the rollouts it trains on plus ``lam`` x OPD
    on every rollout."""

    with_policy_loss: ClassVar[bool] = True

    def in_pg(self, rollout: Rollout) -> bool:
        return trains_on(rollout, mask_truncated=self.policy.mask_truncated)

    def _pg_loss(self, batch: TokenBatch, norms: DistillNorms) -> tuple[Tensor | None, dict[str, Tensor]]:
        return self.policy.loss(batch, norms.pg)


@dataclass
class ForwardKLWarmup:
    """Forward-KL warmup (objective ``fkl``): ``KL(teacher || student)`` on the teacher's samples."""

    policy: PolicyGradient
    """Supplies the aggregation and the response-length divisor."""
    cfg: FKLConfig

    @property
    def needs(self) -> Needs:
        return Needs(old=False, teacher_rollouts=True, teacher_kl="forward" if self.cfg.estimator == "full" else None,
                     teacher_topk=self.cfg.top_k if self.cfg.estimator == "topk" else 0)

    def sequences(self, rollouts: Sequence[Rollout], long_prompt: LongPrompt) -> list[TokenSequence]:
        # The teacher sampled these: its log-probs are the engine's (at the rollout temperature); they
        # are no check of the student's, so the view carries them as the teacher's, not as the engine's.
        views = []
        for k, r in enumerate(rollouts):
            if r.response:
                view = policy_view(k, r, in_loss=True, in_update=True)
                views.append(replace(view, engine_logp=None, teacher_logp=list(r.engine_logp)))
        return views

    def normalisers(self, sequences: Sequence[TokenSequence], num_rollouts: int) -> Normaliser:
        return role_normaliser(sequences, Role.POLICY, self.policy.max_response_len)

    def loss(self, batch: TokenBatch, norms: Normaliser) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.token_mask(Role.POLICY)
        sampled = upcast(batch.teacher_logp).detach() - upcast(batch.distill_logp)  # gradient: SFT's on its tokens
        if self.cfg.estimator == "topk":
            kl = topk_forward_kl(batch.topk_logp, batch.teacher_topk_logp, tail=self.cfg.tail)
        else:
            kl = batch.teacher_kl if self.cfg.estimator == "full" else sampled
        loss = aggregate(kl, mask, self.policy.loss_cfg.aggregation, norms)
        metrics = {"fkl/kl": _token_mean(kl, mask, norms), "fkl/sampled_kl": _token_mean(sampled, mask, norms),
                   "fkl/loss": loss.detach(), "loss": loss.detach()}
        if self.cfg.estimator == "topk":
            metrics.update(_topk_masses("fkl", batch, mask, norms))
        return loss, metrics
