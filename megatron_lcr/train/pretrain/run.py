"""``lcr pretrain``: supervised next-token training of a Megatron model, start to finish.

Outputs under ``--out``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step),
``checkpoints/iter_N`` (megatron_lcr checkpoints) and ``results.json`` (held-out loss of the base and
the trained model, wall time, tokens/s). Every rank runs this function (torchrun / SLURM / single).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.config import save_resolved
from megatron_lcr.data.synthetic_lm import arithmetic_sequences
from megatron_lcr.models.families import hf_arch, model_dims
from megatron_lcr.models.hf_checkpoint import load_hf_config
from megatron_lcr.models.megatron_checkpoint import config_dir
from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
from megatron_lcr.profiling.flops import TransformerDims, step_flops_metrics
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.train.checkpoint import save_checkpoint
from megatron_lcr.train.pretrain.config import LMRunConfig
from megatron_lcr.train.lm_step import evaluate_loss, lm_train_step, micro_batches_from_sequences
from megatron_lcr.train.model_setup import build_policy
from megatron_lcr.train.optimizer import build_optimizer


def _rank_slice(tokens: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return tokens.chunk(dp)[rank]


def _from_last_stage(value):
    """Broadcast a Python value from the last pipeline stage's rank (global last rank) to all ranks."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_world_size() - 1)
    return box[0]


def run_lm_training(cfg: LMRunConfig, out_dir: str | Path) -> dict:
    """Train per ``cfg``; returns the results dict (also written to ``out_dir/results.json``)."""
    from tqdm import tqdm

    started = time.time()
    out_dir = Path(out_dir)
    trainer = cfg.trainer
    arch = hf_arch(load_hf_config(config_dir(cfg.model.hf_path, trainer.load)))
    dp = initialize_megatron(cfg.parallel, seed=trainer.seed, dims=model_dims(arch), seq_length=trainer.seq_length)
    if trainer.global_batch_size % (dp * trainer.micro_batch_size):
        raise ValueError(
            f"global_batch_size ({trainer.global_batch_size}) must be divisible by data-parallel size ({dp}) "
            f"x micro_batch_size ({trainer.micro_batch_size})"
        )
    is_main = torch.distributed.get_rank() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir / "config.yaml")
    policy = build_policy(cfg.model, cfg.parallel, load=trainer.load)
    optimizer, scheduler = build_optimizer(
        cfg.optimizer, policy.chunks, params_dtype=policy.chunks[0].config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, total_steps=trainer.steps,
    )
    length = trainer.seq_length + 1
    eval_mbs = micro_batches_from_sequences(
        _rank_slice(arithmetic_sequences(cfg.data, trainer.eval_sequences, length, stream=1)), trainer.micro_batch_size
    )
    base_loss = _from_last_stage(evaluate_loss(policy.chunks, eval_mbs, vocab_size=policy.arch.vocab_size))
    train_tokens = arithmetic_sequences(cfg.data, trainer.steps * trainer.global_batch_size, length, stream=0)
    metrics_file = (out_dir / "metrics.jsonl").open("w") if is_main else None
    bar = tqdm(range(1, trainer.steps + 1), desc="train", disable=not is_main, file=sys.stderr, mininterval=2.0)
    timer = StepTimer.for_run(1)  # a checkpoint's seconds land in the next step's line
    flops = step_flops_metrics(TransformerDims.from_arch(arch), ranks=torch.distributed.get_world_size(),
                               trained=[trainer.seq_length] * trainer.global_batch_size)  # every step alike
    for step in bar:
        batch = train_tokens[(step - 1) * trainer.global_batch_size: step * trainer.global_batch_size]
        metrics = lm_train_step(policy.chunks, optimizer, scheduler,
                                micro_batches_from_sequences(_rank_slice(batch), trainer.micro_batch_size),
                                vocab_size=policy.arch.vocab_size, timer=timer)
        metrics["loss"] = _from_last_stage(metrics["loss"])
        if metrics["loss"] is None or not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: loss is {metrics['loss']}")
        metrics.update({**flops, **timer.metrics()})
        if is_main:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", gnorm=f"{metrics['grad_norm']:.3f}")
        if trainer.save_interval and step % trainer.save_interval == 0 and step != trainer.steps:
            with timer.phase("checkpoint"):
                save_checkpoint(policy, cfg.parallel, out_dir, step=step, keep_last=trainer.keep_last)
    final = save_checkpoint(policy, cfg.parallel, out_dir, step=trainer.steps, keep_last=trainer.keep_last)
    trained_loss = _from_last_stage(evaluate_loss(policy.chunks, eval_mbs, vocab_size=policy.arch.vocab_size))
    wall = time.time() - started
    results = {
        "base": {"eval_loss": base_loss},
        "trained": {"eval_loss": trained_loss},
        "steps": trainer.steps,
        "tokens_per_second": trainer.steps * trainer.global_batch_size * trainer.seq_length / wall,
        "wall_seconds": wall,
        "checkpoint": str(final),
    }
    if is_main:
        metrics_file.close()
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    destroy_megatron()
    return results
