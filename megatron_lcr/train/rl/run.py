"""``lcr train``: the RL / DePO step loop, start to finish (every rank runs this).

    generate (engines) -> reward -> group advantages -> old log-probs (+ref) -> loss -> optimizer step
    -> weight sync (engines get version = step) -> metrics -> evaluation -> checkpoint

Outputs under ``--out``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step),
``tensorboard/``, ``checkpoints/iter_N`` (model, optimizer, RNG, data cursor; resumed from
automatically), ``rollout_logs/`` and ``results.json``: held-out EM on the short and the long
context of the base and the trained policy, and the wall time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.data.tasks import data_order
from megatron_lcr.models.megatron_checkpoint import load_model
from megatron_lcr.parallel.env import read_dist_env
from megatron_lcr.parallel.placement import check_rollout_placement
from megatron_lcr.parallel.state import destroy_megatron
from megatron_lcr.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from megatron_lcr.rollout.engines import Engines
from megatron_lcr.train.export import export_hf
from megatron_lcr.train.metrics_log import MetricsLog
from megatron_lcr.train.micro_batches import plan_micro_batches
from megatron_lcr.train.model_setup import build_policy, has_hf_weights
from megatron_lcr.train.rl.config import RLRunConfig
from megatron_lcr.train.rl.step import (build_sequences, check_weights_finite, gradient_scale, guarded_update,
                                        make_loss_fn, score, step_norms, training_units)
from megatron_lcr.train.rl.rollouts import collect_rollouts
from megatron_lcr.train.task import start_qa_job
from megatron_lcr.train.token_logprobs import ScoringSpec


class BadStepsError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def _scoring_spec(cfg: RLRunConfig, vocab_size: int, entropy: bool) -> ScoringSpec:
    from megatron_lcr.models.builder import use_transformer_engine

    source = cfg.trainer.logprobs_from
    from_hidden = source == "hidden" or (source == "auto" and not cfg.parallel.sequence_parallel)
    return ScoringSpec(vocab_size=vocab_size, temperature=cfg.rl.temperature, entropy=entropy,
                       thd=use_transformer_engine(cfg.model), kernels=cfg.kernels, from_hidden=from_hidden)


def _old_logprobs(cfg, policy, ref, sequences, spec) -> dict[str, float]:
    """Fill ``old_logp`` / ``teacher_logp`` (and ``ref_logp``) of the step's sequences; returns metrics."""
    short = [i for i, s in enumerate(sequences) if s.values["aux"] == 0.0]
    kwargs = dict(token_budget=cfg.trainer.token_budget, fixed_length=cfg.parallel.pipeline_model_parallel_size > 1,
                  layout=cfg.pack_layout)
    old = score(policy.chunks, sequences, short, spec, **kwargs)
    refs = score(ref.chunks, sequences, short, spec, **kwargs) if ref is not None else {}
    by_rollout = {}
    diffs = []
    for i in short:
        seq = sequences[i]
        seq.token_values["old_logp"] = old[i]["logp"]
        if i in refs:
            seq.token_values["ref_logp"] = refs[i]["logp"]
        by_rollout[seq.values["rollout"]] = old[i]["logp"]
        engine = seq.token_values.pop("engine_logp")
        diffs += [abs(a - b) for a, b in zip(old[i]["logp"], engine)]
    for seq in sequences:
        if seq.values["aux"]:
            seq.token_values["teacher_logp"] = by_rollout[seq.values["rollout"]]
    return {"rollout/logp_diff_max": max(diffs, default=0.0),
            "rollout/logp_diff_mean": sum(diffs) / max(len(diffs), 1)}


def _train_on(cfg, policy, optimizer, scheduler, sequences, spec, num_rollouts) -> dict:
    """One guarded update; ``spec`` is the training spec (``pair_kl`` set for the exact KD)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    trained = [s for s in sequences if s.values["px"] or s.values["aux"] or s.values["teacher"]]
    batches = plan_micro_batches(trained, token_budget=cfg.trainer.token_budget, dp_size=dp,
                                 dp_rank=ps.get_data_parallel_rank(), pad_id=0,
                                 fixed_length=cfg.parallel.pipeline_model_parallel_size > 1,
                                 units=training_units(trained), layout=cfg.pack_layout)
    norms = step_norms(trained, cfg.rl.max_new_tokens, num_rollouts)
    loss_fn = make_loss_fn(cfg, norms, scale=gradient_scale(len(batches)))
    metrics = guarded_update(policy.chunks, optimizer, scheduler, batches, spec, loss_fn)
    metrics["train/sequences"] = float(len(trained))
    metrics["train/micro_batches"] = float(len(batches))
    return metrics


def run_rl(cfg: RLRunConfig, out_dir: str | Path) -> dict:
    """Train per ``cfg``; returns the results (also written to ``out_dir/results.json``)."""
    started = time.time()
    out_dir = Path(out_dir)
    trainer = cfg.trainer
    check_rollout_placement(trainer_gpus=range(read_dist_env(os.environ).local_world_size),
                            rollout_gpus=cfg.rollout.launched_gpus(), sync_mode=cfg.rollout.sync.mode)
    job = start_qa_job(cfg, out_dir, load=trainer.load, seed=trainer.seed, total_steps=trainer.steps)
    task, train, held_out, is_main = job.task, job.train, job.held_out, job.is_main
    policy, optimizer, scheduler = job.policy, job.optimizer, job.scheduler
    ref = build_policy(cfg.model, cfg.parallel, load=trainer.load) if cfg.rl.loss.kl_coef > 0 else None
    state = {"step": 0, "cursor": 0, "bad_steps": 0, "base": None}
    resume_from = latest_checkpoint(out_dir) if trainer.resume else None
    if resume_from is not None:
        load_model([c.module for c in policy.chunks], resume_from)
        state = load_training_state(resume_from, optimizer, scheduler)
    engine_model = str(policy.hf_config_dir) if has_hf_weights(policy.hf_config_dir) else str(export_hf(policy, out_dir / "engine_init"))
    spec = _scoring_spec(cfg, policy.arch.vocab_size, entropy=cfg.rl.loss.entropy_coef > 0)
    train_spec = replace(spec, pair_kl=cfg.depo.enabled and cfg.depo.mode == "kd-full")
    long_prompts: dict[str, list[int]] = {}

    def long_prompt(sample):
        if sample.id not in long_prompts:
            long_prompts[sample.id] = task.prompts([sample], "long")[0]
        return long_prompts[sample.id]

    with Engines(cfg.rollout, model_path=engine_model, log_dir=str(out_dir / "rollout_logs"),
                 seed=trainer.seed) as engines, MetricsLog(out_dir, enabled=is_main,
                                                           tensorboard=trainer.tensorboard,
                                                           total=trainer.steps, first=state["step"]) as log:
        engines.sync(policy, state["step"])  # the engines hold exactly the trainer's weights from here on
        if state["base"] is None:
            state["base"] = task.evaluate(engines.generate, held_out, cfg.eval)
            log.write(0, {f"eval/{k}": v for k, v in state["base"].items()})
        for step in range(state["step"] + 1, trainer.steps + 1):
            t0 = time.perf_counter()

            def draw(round_: int) -> list:
                state["cursor"] += 1
                return [train[i] for i in data_order(len(train), trainer.seed, state["cursor"], trainer.prompts_per_step)]

            rollouts, metrics = collect_rollouts(engines.generate, cfg.rl, task, draw,
                                                 prompts_per_step=trainer.prompts_per_step,
                                                 seed=trainer.seed * 100003 + step)
            t1 = time.perf_counter()
            sequences = build_sequences(rollouts, cfg.depo, long_prompt, mask_truncated=cfg.rl.advantage.mask_truncated)
            metrics.update(_old_logprobs(cfg, policy, ref, sequences, spec))
            t2 = time.perf_counter()
            metrics.update(_train_on(cfg, policy, optimizer, scheduler, sequences, train_spec, len(rollouts)))
            t3 = time.perf_counter()
            if metrics["skipped"]:
                state["bad_steps"] += 0 if metrics.get("overflow") else 1
                if state["bad_steps"] >= trainer.max_bad_steps:
                    raise BadStepsError(f"step {step}: {state['bad_steps']} consecutive steps had a non-finite loss or "
                                        f"gradient (trainer.max_bad_steps={trainer.max_bad_steps})")
            else:
                state["bad_steps"] = 0
                check_weights_finite(policy.chunks, step)
                metrics.update({f"sync/{k}": v for k, v in engines.sync(policy, step).items() if k != "weight_version"})
            metrics.update({"time/rollout_s": t1 - t0, "time/logprob_s": t2 - t1, "time/train_s": t3 - t2,
                            "time/step_s": time.perf_counter() - t0})
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != trainer.steps:
                metrics.update({f"eval/{k}": v for k, v in task.evaluate(engines.generate, held_out, cfg.eval).items()})
            state["step"] = step
            log.write(step, metrics)
            if trainer.save_interval and step % trainer.save_interval == 0 and step != trainer.steps:
                save_checkpoint(policy, cfg.parallel, out_dir, step=step, keep_last=trainer.keep_last,
                                optimizer=optimizer, scheduler=scheduler, trainer_state=state)
        trained = task.evaluate(engines.generate, held_out, cfg.eval)
        log.write(trainer.steps, {f"eval/{k}": v for k, v in trained.items()})
    final = save_checkpoint(policy, cfg.parallel, out_dir, step=trainer.steps, keep_last=trainer.keep_last,
                            optimizer=optimizer, scheduler=scheduler, trainer_state=state)
    results = {"base": state["base"], "trained": trained, "steps": trainer.steps,
               "wall_seconds": time.time() - started, "checkpoint": str(final)}
    if is_main:
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    destroy_megatron()
    return results
