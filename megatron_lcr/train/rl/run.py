"""``lcr train``: the RL step loop, start to finish (every rank runs this).

    generate (engines) -> train_step (old/ref log-probs, the objective's updates) -> weight sync
    (engines get version = step) -> metrics -> evaluation -> checkpoint

Outputs under ``--out``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step),
``tensorboard/``, ``checkpoints/iter_N`` (model, optimizer, RNG, data cursor; resumed from
automatically), ``rollout_logs/`` and ``results.json``: held-out EM on the short and the long
context of the base and the trained policy, and the wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.data.tasks import data_order
from megatron_lcr.models.megatron_checkpoint import load_model
from megatron_lcr.parallel.env import read_dist_env
from megatron_lcr.parallel.placement import check_rollout_placement, check_teacher_placement
from megatron_lcr.parallel.state import destroy_megatron
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.rollout.engines import Engines
from megatron_lcr.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from megatron_lcr.train.export import export_hf
from megatron_lcr.train.metrics_log import MetricsLog
from megatron_lcr.train.model_setup import build_policy, has_hf_weights
from megatron_lcr.train.preemption import Preemption
from megatron_lcr.train.rl.config import RLRunConfig
from megatron_lcr.train.rl.objectives import build_objective
from megatron_lcr.train.rl.rollouts import collect_rollouts
from megatron_lcr.train.rl.step import StepContext, train_step
from megatron_lcr.train.rl.teacher import generator_scorer, open_generator, open_scorer, teacher_server_gpus
from megatron_lcr.train.rl.update import check_weights_finite
from megatron_lcr.train.task import start_qa_job
from megatron_lcr.train.token_logprobs import ScoringSpec


class BadStepsError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainerState:
    """What the loop needs to continue identically after a resume (``trainer_state.json``)."""

    step: int = 0
    """Last finished step."""
    cursor: int = 0
    """Sampling rounds drawn so far (the data order's position)."""
    bad_steps: int = 0
    """Consecutive skipped steps."""
    base: dict | None = None
    """The base policy's held-out evaluation."""


def _scoring_spec(cfg: RLRunConfig, vocab_size: int, entropy: bool) -> ScoringSpec:
    from megatron_lcr.models.builder import use_transformer_engine

    source = cfg.trainer.logprobs_from
    from_hidden = source == "hidden" or (source == "auto" and not cfg.parallel.sequence_parallel)
    distill_t = cfg.distill_temperature
    return ScoringSpec(vocab_size=vocab_size, temperature=cfg.rl.temperature, entropy=entropy,
                       thd=use_transformer_engine(cfg.model), kernels=cfg.kernels, from_hidden=from_hidden,
                       distill_temperature=None if distill_t == cfg.rl.temperature else distill_t)


def _resume(cfg: RLRunConfig, out_dir: Path, job) -> TrainerState:
    resume_from = latest_checkpoint(out_dir) if cfg.trainer.resume else None
    if resume_from is None:
        return TrainerState()
    load_model([c.module for c in job.policy.chunks], resume_from)
    return TrainerState(**load_training_state(resume_from, job.optimizer, job.scheduler))


def _step_context(cfg: RLRunConfig, job, objective, out_dir: Path, stack: contextlib.ExitStack) -> StepContext:
    task, long_prompts = job.task, {}

    def long_prompt(sample) -> list[int]:
        if sample.id not in long_prompts:
            long_prompts[sample.id] = task.prompts([sample], "long")[0]
        return long_prompts[sample.id]

    ref = build_policy(cfg.model, cfg.parallel, load=cfg.trainer.load, trainable=False) if objective.needs.ref else None
    spec = _scoring_spec(cfg, job.policy.arch.vocab_size, entropy=objective.needs.entropy)
    teacher = open_scorer(cfg, objective.needs, spec, student=job.policy, out_dir=out_dir, stack=stack)
    return StepContext(optimizer=job.optimizer, scheduler=job.scheduler, ref=ref, long_prompt=long_prompt,
                       spec=spec, teacher=teacher,
                       token_budget=cfg.trainer.token_budget, layout=cfg.pack_layout,
                       fixed_length=cfg.parallel.pipeline_model_parallel_size > 1,
                       mini_batches=cfg.trainer.mini_batches, epochs=cfg.trainer.epochs)


def _count_bad(state: TrainerState, metrics: dict, step: int, limit: int) -> bool:
    """Track consecutive skipped steps (an fp16 overflow is not one); True if the step updated."""
    if not metrics["skipped"]:
        state.bad_steps = 0
        return True
    state.bad_steps += 0 if metrics.get("overflow") else 1
    if state.bad_steps >= limit:
        raise BadStepsError(f"step {step}: {state.bad_steps} consecutive steps had a non-finite loss or "
                            f"gradient (trainer.max_bad_steps={limit})")
    return False


def run_rl(cfg: RLRunConfig, out_dir: str | Path) -> dict:
    """Train per ``cfg``; returns the results (also written to ``out_dir/results.json``)."""
    started, out_dir, trainer = time.time(), Path(out_dir), cfg.trainer
    objective, trainer_gpus = build_objective(cfg), range(read_dist_env(os.environ).local_world_size)
    check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=cfg.rollout.launched_gpus(),
                            sync_mode=cfg.rollout.sync.mode)
    check_teacher_placement(trainer_gpus=trainer_gpus, rollout_gpus=cfg.rollout.launched_gpus(),
                            teacher_gpus=teacher_server_gpus(cfg, objective.needs))
    job = start_qa_job(cfg, out_dir, load=trainer.load, seed=trainer.seed, total_steps=trainer.steps)
    stack = contextlib.ExitStack()  # teacher servers, rollout engines, the metrics log
    with stack:
        # before the resume: building the reference or teacher model draws random numbers
        ctx = _step_context(cfg, job, objective, out_dir, stack)
        return _run(cfg, out_dir, job, objective, ctx, stack, started)


def _run(cfg: RLRunConfig, out_dir: Path, job, objective, ctx: StepContext, stack: contextlib.ExitStack,
         started: float) -> dict:
    policy, task, trainer = job.policy, job.task, cfg.trainer
    preempt = stack.enter_context(Preemption(out_dir))  # SIGUSR1 / SIGTERM / $LCR_PREEMPT_REQUEST
    state = _resume(cfg, out_dir, job)
    engine_model = policy.hf_config_dir if has_hf_weights(policy.hf_config_dir) else export_hf(policy, out_dir / "engine_init")

    def evaluate(engines) -> dict:
        return task.evaluate(engines.generate, job.held_out, cfg.eval)

    def draw(round_: int) -> list:
        state.cursor += 1
        return [job.train[i] for i in data_order(len(job.train), trainer.seed, state.cursor, trainer.prompts_per_step)]

    def save(step: int) -> Path:
        return save_checkpoint(policy, cfg.parallel, out_dir, step=step, keep_last=trainer.keep_last,
                               optimizer=job.optimizer, scheduler=job.scheduler, trainer_state=asdict(state))

    teacher_engines = open_generator(cfg, objective.needs, out_dir=out_dir, seed=trainer.seed, stack=stack)
    ctx = replace(ctx, teacher=ctx.teacher or generator_scorer(cfg, objective.needs, teacher_engines, out_dir=out_dir))
    with Engines(cfg.rollout, model_path=str(engine_model), log_dir=str(out_dir / "rollout_logs"),
                 seed=trainer.seed) as engines, MetricsLog(out_dir, enabled=job.is_main, tensorboard=trainer.tensorboard,
                                                           total=trainer.steps, first=state.step) as log:
        sampler = teacher_engines or engines  # the forward-KL warmup learns from the teacher's samples
        engines.sync(policy, state.step)  # the engines hold exactly the trainer's weights from here on
        if state.base is None:
            state.base = evaluate(engines)
            log.write(0, _eval_metrics(state.base))
        timer = StepTimer.for_run(state.step + 1)  # a checkpoint's seconds land in the next step's line
        for step in range(state.step + 1, trainer.steps + 1):
            rollouts, metrics = collect_rollouts(sampler.generate, cfg.rl, task, draw, seed=trainer.seed * 100003 + step,
                                                 prompts_per_step=trainer.prompts_per_step, timer=timer)
            metrics.update(train_step(policy, rollouts, objective, ctx, timer))
            if _count_bad(state, metrics, step, trainer.max_bad_steps):
                with timer.phase("sync"):
                    check_weights_finite(policy.chunks, step)
                    metrics.update({f"sync/{k}": v for k, v in engines.sync(policy, step).items() if k != "weight_version"})
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != trainer.steps:
                with timer.phase("eval"):
                    metrics.update(_eval_metrics(evaluate(engines)))
            metrics.update(timer.metrics())
            state.step = step
            log.write(step, metrics)
            stop = step != trainer.steps and preempt.requested()  # the same answer on every rank
            if stop or (trainer.save_interval and step % trainer.save_interval == 0 and step != trainer.steps):
                with timer.phase("checkpoint"):
                    checkpoint = save(step)
            if stop:
                preempt.exit(step, checkpoint)  # raises Preempted: the job requeues and resumes from here
        trained = evaluate(engines)
        log.write(trainer.steps, _eval_metrics(trained))
    final = save(trainer.steps)
    results = {"base": state.base, "trained": trained, "steps": trainer.steps,
               "wall_seconds": time.time() - started, "checkpoint": str(final)}
    if job.is_main:
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    destroy_megatron()
    return results


def _eval_metrics(results: dict) -> dict:
    return {f"eval/{k}": v for k, v in results.items()}
