"""Group advantages and the reward-side filters of GRPO and DAPO.

- GRPO (Shao et al. 2024, DeepSeekMath), outcome supervision: each prompt gets G sampled responses,
  and a response's advantage is its reward minus the group mean, divided by the group's standard
  deviation (``normalize_std=True``) or not (Dr.GRPO, Liu et al. 2025, drops the division because it
  up-weights prompts that are nearly always or never solved).
  The std is the **unbiased** (Bessel-corrected, ``G - 1``) sample std: the one GRPO's reference
  implementations use (TRL's ``GRPOTrainer`` and verl's GRPO estimator call ``torch.std``), so that
  advantage scales, and the learning rates tuned with them, carry over. A group of one response has
  no spread: its advantage is 0.
- DAPO (Yu et al. 2025):
  * dynamic sampling: a group whose rewards are all equal has all-zero advantages and gives no
    gradient, so it is dropped and the batch is refilled from further generation rounds
    (:class:`GroupFiller`); "equal" is exact equality, which rule-based rewards (EM, 0/1) satisfy;
  * soft overlong punishment (:func:`overlong_penalty`), added to the reward of responses that run
    into the last ``buffer`` tokens before the maximum length;
  * overlong filtering (:func:`response_mask`): truncated responses are excluded from the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(kw_only=True)
class AdvantageConfig:
    """Group advantages, DAPO's dynamic sampling and overlong handling."""

    normalize_std: bool = True
    """Divide by the group's (unbiased) reward std (GRPO); False: only subtract the mean (Dr.GRPO)."""
    eps: float = 1e-6
    """Added to the group std before dividing (reward units)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill the batch by generating more."""
    max_sampling_rounds: int = 3
    """Extra generation rounds (beyond the first) the trainer may use to refill the batch (rounds)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: length of the penalty ramp before the max length (tokens); 0: off."""
    overlong_penalty: float = 1.0
    """Penalty at and beyond the maximum response length (reward units)."""
    mask_truncated: bool = False
    """Exclude responses cut at the maximum length (finish_reason 'length') from the loss."""

    def __post_init__(self) -> None:
        if self.eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.max_sampling_rounds < 0:
            raise ValueError(f"max_sampling_rounds must be >= 0, got {self.max_sampling_rounds}")
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.overlong_penalty < 0.0:
            raise ValueError(f"overlong_penalty must be >= 0, got {self.overlong_penalty}")


def group_advantages(rewards: Tensor, *, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages ``[N, G] -> [N, G]`` (N prompts, G responses each), float32 (float64 kept).

    ``(r - mean_g) / (std_g + eps)`` with the unbiased std, or ``r - mean_g``. Equal rewards give 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    r = rewards if rewards.dtype == torch.float64 else rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    if r.shape[1] < 2:
        return torch.zeros_like(r)
    return centred / (r.std(dim=1, keepdim=True, correction=1) + eps)


def informative_groups(rewards: Tensor) -> Tensor:
    """``rewards: [N, G] -> bool [N]``: True where the group's rewards are not all equal."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    return (rewards != rewards[:, :1]).any(dim=1)


@dataclass(kw_only=True)
class GroupFiller:
    """Collects informative groups over generation rounds until ``target`` are kept (DAPO).

    Usage: ``while filler.needs_more: filler.add(rewards, groups)`` then train on ``filler.kept``.
    Order is deterministic: rounds in the order added, groups in their order within a round; the
    first ``target`` informative groups are kept, later informative ones count as ``surplus``.
    """

    target: int
    """Groups to collect (prompts per training batch)."""
    max_extra_rounds: int
    """Rounds allowed after the first (AdvantageConfig.max_sampling_rounds)."""
    kept: list[Any] = field(default_factory=list, init=False)
    """The kept groups' items, at most ``target``."""
    rounds: int = field(default=0, init=False)
    """Rounds added so far."""
    dropped: int = field(default=0, init=False)
    """Groups dropped because their rewards were all equal."""
    surplus: int = field(default=0, init=False)
    """Informative groups not kept because ``target`` was already reached."""

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ValueError(f"target must be >= 1, got {self.target}")
        if self.max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds must be >= 0, got {self.max_extra_rounds}")

    @property
    def done(self) -> bool:
        """``target`` informative groups have been collected."""
        return len(self.kept) >= self.target

    @property
    def needs_more(self) -> bool:
        """Not done, and another round is allowed."""
        return not self.done and self.rounds < 1 + self.max_extra_rounds

    def add(self, rewards: Tensor, groups: Sequence[Any] | None = None) -> int:
        """Add one round: ``rewards: [N, G]``, ``groups``: N items (default ``(round, index)``).

        Returns how many of this round's groups were kept.
        """
        if self.rounds >= 1 + self.max_extra_rounds:
            raise RuntimeError(
                f"round {self.rounds + 1} exceeds 1 + max_extra_rounds ({1 + self.max_extra_rounds})"
            )
        if groups is None:
            groups = [(self.rounds, i) for i in range(rewards.shape[0])]
        if len(groups) != rewards.shape[0]:
            raise ValueError(f"{len(groups)} groups for rewards of shape {tuple(rewards.shape)}")
        useful = informative_groups(rewards).tolist()
        self.rounds += 1
        self.dropped += useful.count(False)
        informative = [g for g, ok in zip(groups, useful) if ok]
        room = max(self.target - len(self.kept), 0)
        self.kept.extend(informative[:room])
        self.surplus += max(len(informative) - room, 0)
        return min(len(informative), room)

    def metrics(self) -> dict[str, float]:
        """Counts for logging (per step: not summed over ranks, the filler runs on one)."""
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/kept_groups": float(len(self.kept)),
            "dynamic_sampling/dropped_groups": float(self.dropped),
            "dynamic_sampling/surplus_groups": float(self.surplus),
        }


def overlong_penalty(lengths: Tensor, *, max_len: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment, ``lengths: [M]`` (tokens) -> ``[M]`` float32 (reward units).

    0 if ``L <= max_len - buffer``; ``((max_len - buffer) - L) / buffer * factor`` on the ramp
    ``max_len - buffer < L <= max_len`` (reaching ``-factor`` at ``max_len``); ``-factor`` beyond.
    ``buffer = 0`` has no ramp; since generation stops at ``max_len``, it then never penalises.
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"buffer ({buffer}) must be in [0, max_len ({max_len})]")
    length = lengths.to(torch.float32)
    start = float(max_len - buffer)
    ramp = (start - length) / max(buffer, 1) * factor
    penalty = torch.where(length > start, ramp, torch.zeros_like(length))
    return torch.where(length > max_len, torch.full_like(length, -factor), penalty)


def response_mask(finish_reasons: Sequence[str | None], mask: Tensor, *, mask_truncated: bool) -> Tensor:
    """``mask: [B, S]`` with the rows of truncated responses (finish_reason 'length') zeroed when
    ``mask_truncated`` (DAPO's overlong filtering); unchanged otherwise. Same dtype as ``mask``."""
    if len(finish_reasons) != mask.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for mask of shape {tuple(mask.shape)}")
    if not mask_truncated:
        return mask
    truncated = torch.tensor([r == "length" for r in finish_reasons], device=mask.device)
    return torch.where(truncated[:, None], torch.zeros_like(mask), mask)
