"""A synthetic next-token task for smoke-training a tiny model on CPU.

Each sequence is an arithmetic progression modulo ``modulus``: ``x_i = offset + (a + i*b) mod m``
with start ``a`` and step ``b in 1..max_step`` drawn per sequence. After two tokens the rest is
determined, so a model that learns the task drives the loss from ``ln(vocab)`` towards roughly
``(ln m + ln max_step) / S``: a clear, quick signal that the whole training stack works. The RL recipes use the
long-context data in this package instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class SyntheticLMConfig:
    """Arithmetic-progression sequences (token ids only; no tokenizer needed)."""

    modulus: int = 64
    """Size of the cycle the progressions live in (token ids offset .. offset+modulus-1)."""
    offset: int = 4
    """First token id used (ids below are left for special tokens)."""
    max_step: int = 3
    """Largest step between consecutive tokens (the model must infer it from the first two)."""
    seed: int = 0
    """Seed of the generator (train and eval streams derive from it)."""

    def __post_init__(self) -> None:
        if self.modulus < 2 or self.offset < 0:
            raise ValueError(f"modulus ({self.modulus}) must be >= 2 and offset ({self.offset}) >= 0")
        if not 1 <= self.max_step < self.modulus:
            raise ValueError(f"max_step ({self.max_step}) must be in 1..modulus-1 ({self.modulus - 1})")


def arithmetic_sequences(cfg: SyntheticLMConfig, num: int, length: int, *, stream: int = 0) -> torch.Tensor:
    """``[num, length]`` int64 token ids; ``stream`` separates train (0) from eval (1) draws."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000003 + stream)
    start = torch.randint(0, cfg.modulus, (num, 1), generator=gen)
    step = torch.randint(1, cfg.max_step + 1, (num, 1), generator=gen)
    positions = torch.arange(length)[None, :]
    return cfg.offset + (start + positions * step) % cfg.modulus
