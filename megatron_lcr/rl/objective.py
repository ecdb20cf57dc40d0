"""What the trainer asks of an objective, and plain RL (GRPO / DAPO / GSPO / CISPO) as one.

An objective turns a step's rollouts into the sequences it trains on, says which extra per-token
values it needs (:class:`Needs`), and computes its loss from a micro-batch's per-token tensors
(:class:`~megatron_lcr.rl.sequences.TokenBatch`). The trainer scores, packs, runs the guarded
update and never looks at an objective's name or settings. Losses divide by global counts
(:class:`~megatron_lcr.rl.losses.Normaliser`), which :meth:`Objective.normalisers` computes from
all the sequences of one update, so micro-batches sum to the update's loss whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from megatron_lcr.data.schema import Sample
from megatron_lcr.rl.losses import Normaliser, PolicyLossConfig, policy_loss
from megatron_lcr.rl.sequences import Role, Rollout, TokenBatch, TokenSequence

LongPrompt = Callable[[Sample], list[int]]
"""A sample's long-context prompt ids."""


@dataclass(frozen=True)
class Needs:
    """Per-token values an objective needs beyond the policy's log-probs."""

    old: bool = True
    """The sampling policy's log-probs (``TokenBatch.old_logp``): importance ratios, DePO's short-context
    teacher; objectives that use neither spare the trainer that forward pass."""
    ref: bool = False
    """The reference policy's log-probs on the ``POLICY`` views (``TokenBatch.ref_logp``)."""
    entropy: bool = False
    """The policy's per-token entropy (``TokenBatch.entropy``)."""
    pair_kl: bool = False
    """The exact KL between each non-``POLICY`` view and its ``POLICY`` view (``TokenBatch.pair_kl``);
    both views then share a micro-batch, so the trainer runs the ``POLICY`` view's forward too."""
    teacher: bool = False
    """The teacher's log-probs of every view's response tokens (``TokenBatch.teacher_logp``)."""
    teacher_kl: str | None = None
    """'reverse' (``KL(policy || teacher)``) or 'forward' (``KL(teacher || policy)``): the exact per-position
    KL to a Megatron teacher over the vocabulary (``TokenBatch.teacher_kl``), from the teacher's hidden
    states and output weight inside the fused kernels."""
    teacher_rollouts: bool = False
    """The step's rollouts are sampled from the teacher, not from the policy (forward-KL warmup)."""
    teacher_topk: int = 0
    """k > 0: an engine teacher's k most likely tokens and their log-probs at every response position, and
    the policy's log-probs of those tokens (``TokenBatch.teacher_topk_logp`` / ``topk_logp``)."""

    @property
    def any_teacher(self) -> bool:
        return self.teacher or self.teacher_kl is not None or self.teacher_rollouts or self.teacher_topk > 0


class Objective(Protocol):
    """A training objective over one step's rollouts."""

    needs: Needs

    def sequences(self, rollouts: Sequence[Rollout], long_prompt: LongPrompt) -> list[TokenSequence]:
        """The views to score and train on; each non-``POLICY`` view right after its ``POLICY`` view."""
        ...

    def normalisers(self, sequences: Sequence[TokenSequence], num_rollouts: int) -> Any:
        """Global counts of one update's sequences (``num_rollouts`` rollouts), passed to :meth:`loss`."""
        ...

    def loss(self, batch: TokenBatch, norms: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch's share of the update's loss and its summable metrics (detached 0-dim)."""
        ...


def role_normaliser(sequences: Sequence[TokenSequence], role: Role, max_response_len: int) -> Normaliser:
    """Counts of the ``role`` views that are in the loss."""
    chosen = [s for s in sequences if s.role == role and s.in_loss]
    return Normaliser(num_tokens=sum(len(s.response) for s in chosen), num_sequences=len(chosen),
                      max_response_len=max_response_len)


def trains_on(rollout: Rollout, *, mask_truncated: bool) -> bool:
    """Whether a rollout is in the policy-gradient loss (dynamic sampling and truncation masks)."""
    return rollout.in_policy_loss and not (mask_truncated and rollout.finish_reason == "length")


def policy_view(k: int, rollout: Rollout, *, in_loss: bool, in_update: bool) -> TokenSequence:
    """Rollout ``k``'s response after the prompt it was sampled with."""
    return TokenSequence(rollout.prompt, rollout.response, Role.POLICY, rollout=k, reward=rollout.reward,
                         advantage=rollout.advantage, in_loss=in_loss, in_update=in_update,
                         engine_logp=rollout.engine_logp)


@dataclass
class PolicyGradient:
    """Plain RL: the clipped policy-gradient loss ``rl.loss`` on the ``POLICY`` views (``L_PX``)."""

    loss_cfg: PolicyLossConfig
    max_response_len: int
    """Dr.GRPO's constant divisor: the configured maximum response length (tokens)."""
    mask_truncated: bool = False
    """Leave truncated responses out of the loss."""

    @property
    def needs(self) -> Needs:
        return Needs(ref=self.loss_cfg.kl_coef > 0, entropy=self.loss_cfg.entropy_coef > 0)

    def sequences(self, rollouts: Sequence[Rollout], long_prompt: LongPrompt) -> list[TokenSequence]:
        return [policy_view(k, r, in_loss=True, in_update=True) for k, r in enumerate(rollouts)
                if r.response and trains_on(r, mask_truncated=self.mask_truncated)]

    def normalisers(self, sequences: Sequence[TokenSequence], num_rollouts: int) -> Normaliser:
        return role_normaliser(sequences, Role.POLICY, self.max_response_len)

    def loss(self, batch: TokenBatch, norms: Normaliser) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(batch.logp, batch.old_logp, batch.advantage, batch.token_mask(Role.POLICY),
                           self.loss_cfg, norms, ref_logp=batch.ref_logp, entropy=batch.entropy)
