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
    loss_scale: float | None = None
    """params_dtype float16 only: a static loss scale (> 1); None: Megatron's dynamic scaler, which starts
    at initial_loss_scale, halves it and skips the step on an overflow, doubles it after 1000 clean steps."""
    initial_loss_scale: float = 2.0**16
    """params_dtype float16, dynamic scaling: the first loss scale."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, lr ({self.lr})]")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and clip_grad ({self.clip_grad}) must be >= 0")
        if self.initial_loss_scale <= 1:
            raise ValueError(f"initial_loss_scale must be > 1, got {self.initial_loss_scale}")


def check_precision(params_dtype: str, cfg: OptimizerConfig) -> None:
    """Config-time check of a run's model dtype against its optimizer's loss scaling: fp16 gradients
    underflow without a loss scale > 1, and a loss scale means nothing for bf16 / fp32."""
    if params_dtype != "float16" and cfg.loss_scale is not None:
        raise ValueError(f"optimizer.loss_scale ({cfg.loss_scale}) applies to model.params_dtype 'float16' only, "
                         f"got {params_dtype!r}")
    if params_dtype == "float16" and cfg.loss_scale is not None and cfg.loss_scale <= 1:
        raise ValueError(f"model.params_dtype 'float16' with optimizer.loss_scale {cfg.loss_scale} trains without "
                         "loss scaling (fp16 gradients underflow): leave loss_scale unset (dynamic) or set it > 1")


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
        loss_scale=cfg.loss_scale,
        initial_loss_scale=cfg.initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(megatron_cfg, chunks)
    for chunk in chunks:
        # Megatron's schedules multiply each micro-batch's loss by this before backward; the optimizer
        # divides the gradients by the same scale (1 unless fp16) before clipping and the step.
        chunk.config.grad_scale_func = optimizer.scale_loss
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


def begin_update(chunks, optimizer) -> None:
    """Ready ``chunks`` and ``optimizer`` for one update's forward/backward through Megatron's schedule."""
    from megatron.core.distributed import finalize_model_grads

    # Megatron's schedule calls this after the last backward: DP gradient all-reduce (or
    # reduce-scatter for the distributed optimizer) and the tied-embedding all-reduce across stages.
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
