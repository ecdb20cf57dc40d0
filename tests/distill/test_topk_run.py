"""Distillation from an engine teacher's top-k through the whole ``lcr train`` loop on the tiny setup: OPD
(``distill.opd.estimator: topk``; the student samples at 0.7, the teacher, a launched ``lcr serve`` with
examples/tiny/teacher, scores at 1) and the forward-KL warmup (``distill.fkl.estimator: topk``: the teacher
samples and the same servers score their top-k). The KL over the teacher's top-8 set plus the tail falls
step after step.
The math of each piece is checked elsewhere against float64 (tests/distill/test_distill_objectives.py, the
engines' top-k in tests/rollout/test_engine_contract.py, the student's top-k log-probs at TP=2 in
tests/train/test_token_logprobs.py); this checks that they are wired together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed import REPO_ROOT


@pytest.mark.e2e
def test_opd_from_an_engine_teachers_top_k_lowers_the_set_kl(tmp_path):
    steps = _run(tmp_path, ["distill.opd.estimator=topk", "distill.opd.top_k=8", "distill.teacher.scorer=engine"])
    kl = [m["opd/kl"] for m in steps]
    assert kl[0] > kl[1] > kl[2] and kl[2] < 0.2 * kl[0], kl
    for m in steps:  # the teacher's top-8 holds most but not all of its mass: the tail term is live
        assert 0.5 < m["opd/teacher_topk_mass"] < 1.0 and 0.0 < m["opd/student_topk_mass"] < 1.0
        assert m["time/teacher_s"] > 0
    assert len(list((tmp_path / "run" / "teacher_logs").glob("server*.log"))) == 1


@pytest.mark.e2e
def test_the_forward_kl_warmup_from_the_teacher_servers_top_k_scores_on_the_sampling_servers(tmp_path):
    steps = _run(tmp_path, ["objective=fkl", "distill.fkl.estimator=topk", "distill.fkl.top_k=8"])
    kl = [m["fkl/kl"] for m in steps]
    assert kl[0] > kl[1] > kl[2] and kl[2] < 0.2 * kl[0], kl
    for m in steps:  # the set KL, not the sampled-token one: the top-k set's masses are reported
        assert 0.5 < m["fkl/teacher_topk_mass"] < 1.0 and 0.0 < m["fkl/student_topk_mass"] < 1.0
    # The teacher's samples and their top-k come from the same servers: one launched, not two.
    assert len(list((tmp_path / "run" / "teacher_logs").glob("server*.log"))) == 1


def _run(tmp_path, overrides: list[str]) -> list[dict]:
    """Three steps of examples/tiny/opd.yaml with ``overrides``, distilled at temperature 1 (rollouts at 0.7)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_lcr.cli", "train", "examples/tiny/opd.yaml", "--out", str(out),
           *overrides, "distill.teacher.temperature=1.0", "trainer.steps=3", "trainer.prompts_per_step=4",
           "data.num_eval=8"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    return steps
