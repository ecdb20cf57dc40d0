"""The question-answering samples a training job reads: a JSONL file, or LongBlocks generated in-process.

``lcr sft`` and ``lcr train`` take their train and held-out samples from here. With a path the file
is read (``schema.read_samples``: every error names file and line); without one, LongBlocks is
generated with the given settings, the held-out split from ``seed + 1`` so it shares no sample draws
with the training split. Either way an empty split is an error before any work starts.
"""

from __future__ import annotations

import functools
import random

from dataclasses import dataclass, field, replace
from typing import Literal

from megatron_lcr.data.longblocks import LongBlocksConfig, generate
from megatron_lcr.data.schema import DataError, Sample, read_samples

Split = Literal["train", "eval"]


@dataclass(kw_only=True)
class TaskDataConfig:
    """Where the train and held-out samples come from."""

    train_path: str = ""
    """JSONL of samples (``lcr data longblocks|contexts``); empty: generate LongBlocks in-process."""
    eval_path: str = ""
    """JSONL of held-out samples; empty: generate LongBlocks with seed ``longblocks.seed + 1``."""
    num_train: int = 0
    """Use the first N training samples (samples); 0: all (generation then makes longblocks.num_samples)."""
    num_eval: int = 128
    """Held-out samples scored on both contexts (samples)."""
    tokenizer: str = ""
    """Tokenizer directory; empty: the model's own directory."""
    longblocks: LongBlocksConfig = field(default_factory=LongBlocksConfig)
    """Generation settings used when a path is empty."""

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_eval < 1:
            raise ValueError(f"num_train ({self.num_train}) must be >= 0 and num_eval ({self.num_eval}) >= 1")


def load_task_samples(cfg: TaskDataConfig, split: Split, count_tokens) -> list[Sample]:
    """The ``split`` samples per ``cfg``; ``count_tokens(text) -> int`` sizes generated contexts."""
    path = cfg.train_path if split == "train" else cfg.eval_path
    limit = cfg.num_train if split == "train" else cfg.num_eval
    if path:
        samples = read_samples(path)
        where = path
    else:
        gen = cfg.longblocks if split == "train" else replace(cfg.longblocks, seed=cfg.longblocks.seed + 1)
        if limit:
            gen = replace(gen, num_samples=limit)
        samples = generate(gen, count_tokens, progress=True)
        where = f"LongBlocks(seed={gen.seed})"
    if limit:
        samples = samples[:limit]
    if not samples:
        raise DataError(f"{where}: the {split} split has no samples")
    return samples


@functools.lru_cache(maxsize=4)
def _permutation(num: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(random.Random(seed * 100003 + epoch).sample(range(num), num))


def data_order(num: int, seed: int, batch_index: int, batch: int) -> list[int]:
    """Sample indices of the ``batch_index``-th batch (1-based) of ``batch`` samples out of ``num``.

    Epochs are fresh seeded permutations, so a run resumed at a batch index draws the same samples.
    """
    first = (batch_index - 1) * batch
    return [_permutation(num, seed, position // num)[position % num] for position in range(first, first + batch)]
