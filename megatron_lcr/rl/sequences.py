"""The typed data of one RL step: rollouts, the sequences an objective trains on, and a micro-batch's
per-token tensors as the objective sees them.

A rollout is one sampled response. An objective turns a step's rollouts into :class:`TokenSequence`
views of those responses, each with a :class:`Role`: the response after the prompt it was sampled
with (``POLICY``), or after another prompt (``LONG_CONTEXT``: DePO's long context). The trainer
scores the ``POLICY`` views with the policy at the start of the step; every view of a response then
carries those log-probs as ``old_logp`` (the sampling policy's, the PPO behaviour policy and DePO's
short-context teacher alike), packs the views into micro-batches and hands the objective a
:class:`TokenBatch` per micro-batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor

from megatron_lcr.data.schema import Sample


class Role(enum.IntEnum):
    """Which view of a rollout's response a sequence is."""

    POLICY = 0
    """The response after the prompt it was sampled with."""
    LONG_CONTEXT = 1
    """The same response after the sample's long-context prompt (DePO)."""


@dataclass
class Rollout:
    """One sampled response and everything the losses need about it."""

    sample: Sample
    """The question it answers."""
    context: str
    """Context it was sampled with: 'short' or 'long'."""
    prompt: list[int]
    """Prompt token ids (with that context)."""
    response: list[int]
    """Response token ids."""
    engine_logp: list[float]
    """The engine's log-prob of each response token (after temperature)."""
    finish_reason: str | None
    """'stop', 'length' or 'abort'."""
    reward: float
    """Task reward (+ overlong shaping)."""
    advantage: float = 0.0
    """Group-relative advantage."""
    in_policy_loss: bool = True
    """False when dynamic sampling left its group out (equal rewards, or beyond the target)."""


@dataclass
class TokenSequence:
    """One view of a rollout's response, as packed into a micro-batch."""

    prompt: list[int]
    """Prompt token ids (never trained on)."""
    response: list[int]
    """Response token ids."""
    role: Role = Role.POLICY
    """Which view of the response this is."""
    rollout: int = 0
    """Index of its rollout in the step (the views of one response share it)."""
    reward: float = 0.0
    """The rollout's reward."""
    advantage: float = 0.0
    """The rollout's group advantage."""
    in_loss: bool = True
    """Its tokens count in its role's loss term."""
    in_update: bool = True
    """It runs through the training forward (False: only scored, e.g. a teacher row's source)."""
    engine_logp: list[float] | None = None
    """The engine's log-probs of the response (``POLICY`` views; compared with ``old_logp``)."""
    old_logp: list[float] | None = None
    """The sampling policy's log-probs of the response, scored by the trainer on the ``POLICY`` view."""
    ref_logp: list[float] | None = None
    """The reference policy's log-probs on this view (a KL penalty's)."""
    teacher_logp: list[float] | None = None
    """A teacher's log-probs of the response on this view (distillation; ``Needs.teacher``)."""
    teacher_topk_ids: list[list[int]] | None = None
    """Per response token, the teacher's k most likely token ids at that position (``Needs.teacher_topk``)."""
    teacher_topk_logp: list[list[float]] | None = None
    """Their log-probs under the teacher, in the same order."""

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass(frozen=True)
class TokenBatch:
    """One micro-batch as an objective's loss sees it: ``n`` rows, ``R`` response positions."""

    logp: Tensor
    """``[n, R]`` the current policy's log-probs (with grad; 0 where masked)."""
    mask: Tensor
    """``[n, R]`` 1.0 on response tokens."""
    role: Tensor
    """``[n]`` int64 :class:`Role` of each row."""
    rollout: Tensor
    """``[n]`` float rollout index of each row."""
    reward: Tensor
    """``[n]`` rewards."""
    advantage: Tensor
    """``[n]`` group advantages."""
    in_loss: Tensor
    """``[n]`` 1.0 where the row counts in its role's loss."""
    old_logp: Tensor
    """``[n, R]`` the sampling policy's log-probs."""
    ref_logp: Tensor | None = None
    """``[n, R]`` the reference policy's log-probs, when the objective asked for them."""
    entropy: Tensor | None = None
    """``[n, R]`` per-token entropy (with grad), when asked for."""
    pair_kl: Tensor | None = None
    """``[n, R]`` exact KL(``POLICY`` view || this view) over the vocabulary on non-``POLICY`` rows
    (with grad on this view's side), when asked for."""
    teacher_logp: Tensor | None = None
    """``[n, R]`` the teacher's log-probs of the response tokens at the distillation temperature, when asked
    for (``Needs.teacher``)."""
    distill_logp: Tensor | None = None
    """``[n, R]`` the policy's log-probs at the distillation temperature (with grad; ``logp`` itself when that
    is the rollout temperature): what distillation terms compare with ``teacher_logp``."""
    teacher_kl: Tensor | None = None
    """``[n, R]`` exact per-position KL between the policy and a Megatron teacher over the vocabulary
    (``Needs.teacher_kl`` names the direction; with grad on the policy's side), when asked for."""
    teacher_topk_logp: Tensor | None = None
    """``[n, R, k]`` the teacher's log-probs of its k most likely tokens at each position (``Needs.teacher_topk``)."""
    topk_logp: Tensor | None = None
    """``[n, R, k]`` the policy's log-probs of those tokens at the distillation temperature (with grad)."""

    def __post_init__(self) -> None:
        if self.distill_logp is None:
            object.__setattr__(self, "distill_logp", self.logp)

    def token_mask(self, role: Role) -> Tensor:
        """``[n, R]`` float: the response tokens of the rows of ``role`` that count in the loss."""
        rows = (self.role == int(role)).to(self.mask.dtype) * self.in_loss
        return self.mask * rows[:, None]
