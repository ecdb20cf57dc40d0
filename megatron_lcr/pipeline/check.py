"""The check at a stage boundary of the sparse-to-dense workflow (the paper's conditions for OPD to help).

- C2, the teacher is close to the student: the per-token reverse KL ``KL(student || teacher)`` on the
  student's own answers to held-out prompts, sampled at temperature 1 and scored by both models (k3,
  unbiased and never negative, is the table's value; k1, unbiased but noisier, is kept beside it;
  Schulman 2020). Temperature 1 because engines
  score unscaled log-probs (``distill.teacher``).
- C1, the teacher is reward-shaped: the teacher's held-out EM next to the student's.

Both models run on servers launched from the run's ``rollout.server`` (``lcr serve`` on CPU, SGLang on
GPUs), one model after the other so that each may use all of the node's GPUs; the check needs no
Megatron process and scales with the engines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

from megatron_lcr.data.tasks import load_task_samples
from megatron_lcr.distill.opd import reverse_kl_k1, reverse_kl_k3
from megatron_lcr.pipeline.config import CheckConfig
from megatron_lcr.rollout.engine import GenerateRequest, SamplingParams
from megatron_lcr.rollout.served import ServedModel, served
from megatron_lcr.train.task import TaskContext


@contextlib.contextmanager
def served_for(run_cfg, model_dir: str, log_dir: Path, seed: int) -> Iterator[ServedModel]:
    """``run_cfg.rollout.server`` launched to serve ``model_dir`` for the duration."""
    with served(dataclasses.replace(run_cfg.rollout.server, model_path=model_dir, log_dir=str(log_dir)),
                seed=seed) as model:
        yield model


def _response_logp(model: ServedModel, sequences: list[list[int]], cut: list[int]) -> list[list[float]]:
    return [r.input_logprobs[n:] for r, n in zip(model.score(sequences), cut)] if sequences else []


def reverse_kl_per_token(student_logp: list[list[float]], teacher_logp: list[list[float]]) -> dict[str, float]:
    """Token means of k1 and k3 of ``KL(student || teacher)`` over the responses (lists of per-token log-probs)."""
    import torch

    s = torch.tensor([x for row in student_logp for x in row], dtype=torch.float64)
    t = torch.tensor([x for row in teacher_logp for x in row], dtype=torch.float64)
    if s.numel() == 0:
        return {"k1": math.nan, "k3": math.nan, "tokens": 0}
    return {"k1": reverse_kl_k1(s, t).mean().item(), "k3": reverse_kl_k3(s, t).mean().item(), "tokens": s.numel()}


def boundary_check(run_cfg, *, student: str, teacher: str, check: CheckConfig, log_dir: Path,
                   teacher_eval: dict | None = None) -> dict:
    """``{"kl_k1", "kl_k3", "kl_tokens", "teacher": held-out EM}`` for this student and teacher.

    ``run_cfg`` (a resolved ``lcr train`` config) gives the data, prompt, response length and servers;
    ``teacher_eval``: the teacher's evaluation when already known (it does not change within a stage).
    """
    task = TaskContext.create(run_cfg.data, run_cfg.prompt, student)
    samples = load_task_samples(run_cfg.data, "eval", task.count_tokens)
    prompts = task.prompts(samples[:check.num_prompts], check.context)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=run_cfg.rl.max_new_tokens,
                              stop_token_ids=task.stop_token_ids, seed=check.seed)
    requests = [GenerateRequest(input_ids=p, sampling=sampling, n=1, rid=f"check-{i}", return_logprob=False)
                for i, p in enumerate(prompts)]
    # One model's servers at a time: each may need every GPU of the node (a 70B teacher at TP 8).
    with served_for(run_cfg, student, log_dir / "student", check.seed) as s:
        answers = [c for c in sorted(s.generate(requests), key=lambda c: c.prompt_index) if c.output_ids]
        sequences = [prompts[c.prompt_index] + list(c.output_ids) for c in answers]
        cut = [len(prompts[c.prompt_index]) for c in answers]
        s_logp = _response_logp(s, sequences, cut)
    with served_for(run_cfg, teacher, log_dir / "teacher", check.seed) as t:
        t_logp = _response_logp(t, sequences, cut)
        if teacher_eval is None:
            teacher_eval = task.evaluate(t.generate, samples, run_cfg.eval)
    kl = reverse_kl_per_token(s_logp, t_logp)
    return {"kl_k1": kl["k1"], "kl_k3": kl["k3"], "kl_tokens": kl["tokens"], "teacher": teacher_eval}
