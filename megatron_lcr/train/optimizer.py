"""Optimizer and learning-rate schedule: Megatron-Core's own, configured from one dataclass.

Megatron's optimizer keeps fp32 master weights for bf16/fp16 models and, with
``use_distributed_optimizer``, shards optimizer state over data-parallel ranks (ZeRO-1). Its
scheduler does linear warmup then constant / linear / cosine decay to ``min_lr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW with warmup and decay (the RL recipes use a tiny constant LR after a short warmup)."""

    lr: float = 1e-6
    """Peak learning rate (per optimizer step)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay coefficient."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (L2 over all parameters); 0 disables clipping."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """LR schedule after warmup."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, lr ({self.lr})]")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and clip_grad ({self.clip_grad}) must be >= 0")


def build_optimizer(
    cfg: OptimizerConfig,
    chunks: list[torch.nn.Module],
    *,
    params_dtype: torch.dtype,
    use_distributed_optimizer: bool,
    total_steps: int,
):
    """Megatron optimizer over the (DDP-wrapped) chunks, and its LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    megatron_cfg = MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(megatron_cfg, chunks)
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
