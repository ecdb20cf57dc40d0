"""``lcr sft``: supervised fine-tuning on chosen answers (the paper's SFT baseline; makes the tiny base model).

Each sample becomes ``prompt(question, context) -> "Answer: <first gold answer>" + EOS``; the loss is
next-token cross-entropy on the response tokens only (token mean over the global batch). The
context is the short one by default: the tiny base model is trained on short contexts only, which
is what gives it the long-context problem DePO fixes.

Outputs under ``--out``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/iter_N``, ``hf/`` (the
trained model as a Hugging Face directory: what rollout servers and ``lcr train`` load) and
``results.json`` with held-out EM on the short and the long context (through a reference/SGLang
server serving ``hf/``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.data.schema import Sample
from megatron_lcr.data.tasks import TaskDataConfig, data_order
from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.parallel.layout import ParallelConfig
from megatron_lcr.parallel.state import destroy_megatron
from megatron_lcr.profiling.flops import TransformerDims, step_flops_metrics
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.train.checkpoint import save_checkpoint
from megatron_lcr.rollout.engines import Engines, RolloutConfig
from megatron_lcr.train.evaluate import EvalConfig
from megatron_lcr.train.export import export_hf
from megatron_lcr.train.lm_step import MicroBatch, lm_train_step
from megatron_lcr.train.optimizer import OptimizerConfig, check_precision
from megatron_lcr.train.task import TaskContext, start_qa_job


@dataclass(kw_only=True)
class SFTTrainerConfig:
    """The SFT step loop."""

    steps: int = 1000
    """Optimizer steps."""
    global_batch_size: int = 32
    """Samples per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Samples per forward/backward pass on one rank."""
    context: Literal["short", "long"] = "short"
    """Which context the prompts carry."""
    seed: int = 1234
    """Seed of initialisation and data order."""
    save_interval: int = 0
    """Steps between checkpoints; 0: only at the end."""
    keep_last: int = 1
    """Checkpoints kept on disk."""
    load: str | None = None
    """megatron_lcr checkpoint to start from instead of model.hf_path's weights."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"steps ({self.steps}) must be >= 1 and global_batch_size ({self.global_batch_size}) "
                             f"a multiple of micro_batch_size ({self.micro_batch_size})")


@dataclass(kw_only=True)
class SFTRunConfig:
    """``lcr sft``: every section of the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP/DP layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the LR schedule."""
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    """The step loop."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """Train and held-out samples."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template and answer extraction."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation after training."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Servers that generate the held-out answers (they load the exported model)."""

    def __post_init__(self) -> None:
        if not self.model.hf_path and not self.trainer.load:
            raise ValueError("model.hf_path (a Hugging Face model directory) or trainer.load must be set")
        check_precision(self.model.params_dtype, self.optimizer)
        if self.parallel.context_parallel_size > 1:
            raise ValueError(f"parallel.cp={self.parallel.context_parallel_size}: lcr sft runs padded batches "
                             "without context parallelism; use cp=1 (lcr train supports cp > 1)")


def sft_pairs(samples: list[Sample], task: TaskContext, context: str) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per sample: the response is ``"<answer_prefix> <answer>"`` + EOS."""
    return list(zip(task.prompts(samples, context), (task.response_ids(s.answers[0]) for s in samples)))


def padded_micro_batches(pairs: list[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int) -> list[MicroBatch]:
    """Right-padded ``[mbs, S]`` micro-batches (S: the longest sequence of the step) with loss on responses."""
    width = max(len(p) + len(r) for p, r in pairs) - 1
    out = []
    for start in range(0, len(pairs), micro_batch_size):
        chunk = pairs[start:start + micro_batch_size]
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        labels = torch.zeros_like(inputs)
        mask = torch.zeros(len(chunk), width)
        for k, (prompt, response) in enumerate(chunk):
            seq = torch.tensor(prompt + response)
            inputs[k, :len(seq) - 1] = seq[:-1]
            labels[k, :len(seq) - 1] = seq[1:]
            mask[k, len(prompt) - 1:len(seq) - 1] = 1.0
        out.append(MicroBatch(inputs, labels, mask))
    return out


def run_sft(cfg: SFTRunConfig, out_dir: str | Path) -> dict:
    """Train per ``cfg``; every rank runs this. Returns the results (also in ``out_dir/results.json``)."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    started = time.time()
    out_dir = Path(out_dir)
    trainer = cfg.trainer

    def check_dp(dp: int) -> None:
        if trainer.global_batch_size % (dp * trainer.micro_batch_size):
            raise ValueError(f"global_batch_size ({trainer.global_batch_size}) must be divisible by data-parallel "
                             f"size ({dp}) x micro_batch_size ({trainer.micro_batch_size})")

    job = start_qa_job(cfg, out_dir, load=trainer.load, seed=trainer.seed, total_steps=trainer.steps, check_dp=check_dp)
    task, policy, optimizer, scheduler = job.task, job.policy, job.optimizer, job.scheduler
    dp, is_main, held_out = job.data_parallel_size, job.is_main, job.held_out
    pairs = sft_pairs(job.train, task, trainer.context)
    metrics_file = (out_dir / "metrics.jsonl").open("w") if is_main else None
    bar = tqdm(range(1, trainer.steps + 1), desc="sft", disable=not is_main, file=sys.stderr, mininterval=2.0)
    timer = StepTimer.for_run(1)  # a checkpoint's seconds land in the next step's line
    dims = TransformerDims.from_arch(policy.arch)
    for step in bar:
        chosen = [pairs[i] for i in data_order(len(pairs), trainer.seed, step, trainer.global_batch_size)]
        mine = chosen[ps.get_data_parallel_rank()::dp]
        metrics = lm_train_step(policy.chunks, optimizer, scheduler,
                                padded_micro_batches(mine, trainer.micro_batch_size, task.pad_id),
                                vocab_size=policy.arch.vocab_size, timer=timer)
        metrics.update(step_flops_metrics(dims, trained=[len(p) + len(r) - 1 for p, r in chosen],  # inputs: no last token
                                          ranks=torch.distributed.get_world_size()))
        box = [metrics["loss"]]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_world_size() - 1)
        metrics["loss"] = box[0]
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: loss is {metrics['loss']}")
        metrics.update(timer.metrics())
        if is_main:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if trainer.save_interval and step % trainer.save_interval == 0 and step != trainer.steps:
            with timer.phase("checkpoint"):
                save_checkpoint(policy, cfg.parallel, out_dir, step=step, keep_last=trainer.keep_last)
    final = save_checkpoint(policy, cfg.parallel, out_dir, step=trainer.steps, keep_last=trainer.keep_last)
    hf_dir = export_hf(policy, out_dir / "hf")
    with Engines(cfg.rollout, model_path=str(hf_dir), log_dir=str(out_dir / "rollout_logs")) as engines:
        trained = task.evaluate(engines.generate, held_out, cfg.eval)
    results = {"trained": trained, "steps": trainer.steps, "wall_seconds": time.time() - started,
               "checkpoint": str(final), "hf": str(hf_dir)}
    if is_main:
        metrics_file.close()
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        print(json.dumps(results), file=sys.stderr)
    destroy_megatron()
    return results
