"""``lcr pipeline`` end to end on CPU: three stages (teacher RL, forward-KL warmup, OPD) of tiny random
models, each stage fed by the previous one's output; a run killed (SIGKILL) during OPD resumes in OPD and
ends with the same table as an uninterrupted run; bad input fails in one line before any work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_lcr.pipeline.check import reverse_kl_per_token
from megatron_lcr.pipeline.run import results_table
from tests.distributed import REPO_ROOT
from tests.train.test_pretrain import error_lines, lcr

BASE = {
    "model": {"params_dtype": "float32"},
    "optimizer": {"lr": 1.0e-3, "warmup_steps": 0, "decay_style": "constant", "weight_decay": 0.0, "clip_grad": 1.0},
    "trainer": {"steps": 1, "prompts_per_step": 2, "token_budget": 512, "seed": 7, "tensorboard": False},
    "data": {"num_eval": 4, "longblocks": {"num_samples": 24, "short_tokens": 96, "long_tokens": 200, "tolerance": 0.25,
                                           "families": ["multihop"], "max_hops": 1, "max_fillers": 1}},
    "prompt": {"instruction": 'Answer from the documents. End with "Answer:" and the answer.'},
    "rl": {"group_size": 2, "max_new_tokens": 5, "temperature": 1.0, "context": "long"},
    "objective": "opd",
    "distill": {"opd": {"estimator": "full"}},
    "eval": {"max_new_tokens": 5, "interval": 0},
}
STAGES = {
    "teacher_rl": {"overrides": ["trainer.steps=1"]},
    "fkl": {"overrides": ["trainer.steps=1", "distill.fkl.estimator=full"]},
    "opd": {"overrides": ["trainer.steps=3", "trainer.save_interval=1"]},
}
ROW_KEYS = {"name", "short_em", "long_em", "teacher_student_kl", "wall_seconds"}


def tiny_llama(out: Path, layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lcr.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    student, teacher = tiny_llama(root / "student", 1, 0), tiny_llama(root / "teacher", 2, 1)
    base = root / "base.yaml"
    base.write_text(json.dumps({**BASE, "model": {**BASE["model"], "hf_path": str(student)}}))
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "student": str(student), "teacher": str(teacher),
                                   "stages": STAGES, "check": {"num_prompts": 4}}))
    return cfg


def rows_without_time(out: Path) -> list[dict]:
    """The table's rows without wall time; the KL rounded to 6 significant digits: the check's servers
    batch requests as they arrive, which moves float sums in the last digits (the EMs are exact)."""
    rows = json.loads((out / "results.json").read_text())["stages"]
    return [{k: float(f"{v:.6g}") if k.startswith("teacher_student_kl") else v for k, v in row.items()
             if k != "wall_seconds"} for row in rows]


@pytest.mark.e2e
def test_stages_feed_each_other_and_a_kill_in_opd_resumes_there_with_the_same_table(tmp_path, config):
    reference = tmp_path / "reference"
    proc = lcr("pipeline", str(config), "--out", str(reference), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((reference / "results.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["teacher_rl", "fkl", "opd"]
    assert all(ROW_KEYS <= set(r) and math.isfinite(r["teacher_student_kl"]) for r in rows)
    assert "| teacher_rl | teacher |" in proc.stdout and (reference / "results.md").is_file()
    # Each stage starts from the previous output of the model it trains; stage 1's output is the teacher.
    fkl = yaml.safe_load((reference / "fkl" / "config.yaml").read_text())
    opd = yaml.safe_load((reference / "opd" / "config.yaml").read_text())
    assert fkl["distill"]["teacher"]["hf_path"] == str(reference / "teacher_rl" / "hf")
    assert opd["distill"]["teacher"]["hf_path"] == str(reference / "teacher_rl" / "hf")
    assert opd["model"]["hf_path"] == str(reference / "fkl" / "hf")
    assert (fkl["objective"], opd["objective"]) == ("fkl", "opd")

    out = tmp_path / "killed"
    script = Path(sys.executable).with_name("lcr")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen([str(script), "pipeline", str(config), "--out", str(out)], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "opd" / "checkpoints" / "iter_0000001" / "trainer_state.json"
    deadline = time.monotonic() + 1200
    while not state.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.is_file(), "the pipeline never wrote OPD's step-1 checkpoint"
    os.killpg(job.pid, signal.SIGKILL)  # the pipeline, its stage and their servers, no clean-up
    job.wait()
    assert not (out / "results.json").exists()
    done_before = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert sorted(done_before) == ["fkl", "teacher_rl"]

    proc = lcr("pipeline", str(config), "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line for line in proc.stdout.splitlines() if line.startswith("lcr pipeline: stage ") and ": " in line
               and " done:" not in line]
    assert len(started) == 1 and started[0].startswith("lcr pipeline: stage opd:")  # finished stages not rerun
    assert rows_without_time(out) == rows_without_time(reference)


def test_bad_input_fails_in_one_line_before_any_work(tmp_path, config):
    cases = {
        "student=" + str(tmp_path / "missing"): "student " + str(tmp_path / "missing") + ": no Hugging Face weights",
        "stages.opd.overrides=[distill.opd.lam=-1]": "distill.opd.lam must be >= 0",
        "stages.fkl.overrides=[trainer.nope=1]": "stage fkl:",
        "check.num_prompts=0": "check.num_prompts must be >= 1",
    }
    for override, message in cases.items():
        out = tmp_path / "out"
        proc = lcr("pipeline", str(config), "--out", str(out), override, timeout=120)
        assert proc.returncode == 1 and not out.exists(), (override, proc.stderr[-2000:])
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and message in lines[0], (override, proc.stderr)
        if "stages." in override:
            assert lines[0].startswith(f"lcr: error: stage {override.split('.')[1]}: ")


def test_reverse_kl_per_token_is_the_token_mean_of_k1_and_k3():
    student, teacher = [[-0.5, -1.0], [-2.0]], [[-0.7, -0.2], [-2.0]]
    got = reverse_kl_per_token(student, teacher)
    k1 = [(-0.5 + 0.7), (-1.0 + 0.2), 0.0]
    k3 = [math.exp(-x) - 1 + x for x in k1]  # r - 1 - log r with log r = -k1
    assert got["tokens"] == 3
    assert got["k1"] == pytest.approx(sum(k1) / 3, abs=1e-12) and got["k3"] == pytest.approx(sum(k3) / 3, abs=1e-12)
    assert math.isnan(reverse_kl_per_token([], [])["k1"])


def test_results_table_has_a_row_per_stage_and_dashes_for_missing_values():
    table = results_table([{"name": "fkl", "model": "student", "steps": 3, "long_em": 12.5, "wall_seconds": 10.0}])
    lines = table.splitlines()
    assert lines[0].startswith("| name | model | steps |") and len(lines) == 3
    assert lines[2].startswith("| fkl | student | 3 | - |") and "12.50" in lines[2]
