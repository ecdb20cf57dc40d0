"""The run configuration of ``lcr pretrain``: one section per component, each owned by its module."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lcr.data.synthetic_lm import SyntheticLMConfig
from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.parallel.layout import ParallelConfig
from megatron_lcr.train.optimizer import OptimizerConfig, check_precision


@dataclass(kw_only=True)
class TrainerConfig:
    """The step loop: how many steps, how the global batch is split, when to log and save."""

    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank."""
    seq_length: int = 64
    """Tokens per training sequence."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    log_interval: int = 10
    """Steps between metric lines on the console (every step goes to metrics.jsonl)."""
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a new one is complete)."""
    eval_sequences: int = 64
    """Held-out sequences scored before and after training."""
    load: str | None = None
    """megatron_lcr checkpoint to start from instead of model.hf_path's weights."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class LMRunConfig:
    """``lcr pretrain``: supervised next-token training of a Megatron model (a smoke test of the stack)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (Hugging Face architecture, dtype, TE/FP8)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP/DP layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the LR schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The step loop."""
    data: SyntheticLMConfig = field(default_factory=SyntheticLMConfig)
    """Training sequences."""

    def __post_init__(self) -> None:
        if not self.model.hf_path and not self.trainer.load:
            raise ValueError("model.hf_path (a Hugging Face model directory) or trainer.load must be set")
        check_precision(self.model.params_dtype, self.optimizer)
