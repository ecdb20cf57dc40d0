"""The training job's teacher, built from ``distill.teacher`` for the objectives that need one.

- Scoring (``Needs.teacher`` / ``Needs.teacher_kl`` / ``Needs.teacher_topk``): a frozen Megatron model in
  the job, on the student's layout (``distill.megatron_teacher``) or on its own tensor-parallel groups
  (``distill.teacher.tensor_parallel_size``: ``distill.layout_teacher``), or engine servers
  (``distill.teacher.EngineTeacher``), by ``distill.teacher.scorer``. The log-probs are taken at the
  distillation temperature, as the student's (``RLRunConfig.distill_temperature``: the rollout
  temperature unless ``distill.teacher.temperature``).
- Generation (``Needs.teacher_rollouts``, the forward-KL warmup): servers serving the teacher, launched
  from ``distill.teacher.hf_path`` (or given by ``distill.teacher.engine.urls``), used like the
  rollout engines but never sent weights (the teacher is frozen).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from megatron_lcr.distill.layout_teacher import LayoutTeacher
from megatron_lcr.distill.megatron_teacher import MegatronTeacher
from megatron_lcr.distill.teacher import EngineTeacher
from megatron_lcr.models.builder import ModelConfig
from megatron_lcr.rl.objective import Needs
from megatron_lcr.rollout.engines import Engines, RolloutConfig, launched_gpus
from megatron_lcr.rollout.served import ServedModel
from megatron_lcr.rollout.sglang import SGLangLaunchConfig
from megatron_lcr.rollout.weight_sync import WeightSyncConfig
from megatron_lcr.train.token_logprobs import ScoringSpec


def _scores(needs: Needs) -> bool:
    """Whether the objective needs a scorer of its own (the warmup's top-k comes from its generator's servers)."""
    return needs.teacher or needs.teacher_kl is not None or (needs.teacher_topk > 0 and not needs.teacher_rollouts)


def _server(cfg) -> SGLangLaunchConfig:
    """The teacher servers' launch config, serving the teacher's directory unless it names another."""
    teacher = cfg.distill.teacher
    return dataclasses.replace(teacher.engine.server, model_path=teacher.engine.server.model_path or teacher.hf_dir)


def teacher_server_gpus(cfg, needs: Needs) -> list[int]:
    """Node 0's GPUs the teacher servers rank 0 launches will use (empty: none launched, on CPU or by URL)."""
    teacher = cfg.distill.teacher
    launches = needs.teacher_rollouts or (_scores(needs) and teacher.scorer == "engine")
    return launched_gpus(teacher.engine.server, teacher.engine.urls) if launches else []


def open_scorer(cfg, needs: Needs, spec: ScoringSpec, *, student, out_dir: Path, stack: contextlib.ExitStack):
    """The teacher that scores the student's sequences (None if the objective needs none)."""
    teacher = cfg.distill.teacher
    if not _scores(needs):
        return None
    if teacher.scorer == "engine":
        engine = teacher.engine if teacher.engine.urls else dataclasses.replace(teacher.engine, server=_server(cfg))
        return stack.enter_context(EngineTeacher(engine, student_dir=str(student.hf_config_dir),
                                                 log_dir=str(out_dir / "teacher_logs")))
    model = ModelConfig(hf_path=teacher.hf_path, params_dtype=teacher.params_dtype or cfg.model.params_dtype,
                        transformer_impl=cfg.model.transformer_impl)
    if teacher.own_layout:
        return LayoutTeacher(model, teacher.own_layout, vocab_size=spec.vocab_size, temperature=cfg.distill_temperature,
                             token_budget=cfg.trainer.token_budget,
                             student_padded_vocab=student.model_cfg.padded_vocab_size)
    return MegatronTeacher(model, cfg.parallel, dataclasses.replace(spec, temperature=cfg.distill_temperature),
                           load=teacher.load, token_budget=cfg.trainer.token_budget, layout=cfg.pack_layout,
                           fixed_length=cfg.parallel.pipeline_model_parallel_size > 1,
                           student_padded_vocab=student.model_cfg.padded_vocab_size)


def open_generator(cfg, needs: Needs, *, out_dir: Path, seed: int, stack: contextlib.ExitStack) -> Engines | None:
    """Servers sampling from the teacher (None unless the objective's rollouts are the teacher's)."""
    if not needs.teacher_rollouts:
        return None
    engine = cfg.distill.teacher.engine
    rollout = RolloutConfig(server=_server(cfg), urls=list(engine.urls), max_concurrency=engine.max_concurrency,
                            request_timeout_s=engine.request_timeout_s,
                            # never synced (a frozen teacher); 'disk' is the mode that needs no group with the servers
                            sync=WeightSyncConfig(mode="disk", disk_dir=str(out_dir / "teacher_logs")))
    return stack.enter_context(Engines(rollout, model_path=rollout.server.model_path,
                                       log_dir=str(out_dir / "teacher_logs"), seed=seed))


def generator_scorer(cfg, needs: Needs, generator: Engines | None, *, out_dir: Path) -> EngineTeacher | None:
    """The forward-KL warmup's top-k scorer: the teacher servers that sample its rollouts, so that no second
    set is launched (None unless the objective asks for the teacher's top-k on the teacher's own samples)."""
    if not (needs.teacher_topk and needs.teacher_rollouts and generator is not None):
        return None
    attach = ServedModel(generator.syncer.client, generator.syncer) if generator.is_source else None
    engine = dataclasses.replace(cfg.distill.teacher.engine, server=_server(cfg))
    return EngineTeacher(engine, student_dir=cfg.model.hf_path, log_dir=str(out_dir / "teacher_logs"), attach=attach)
