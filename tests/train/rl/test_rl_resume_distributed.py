"""Exact resume with Megatron's distributed optimizer (ZeRO-1), under torchrun on gloo.

The distributed optimizer keeps master weights and Adam moments out of ``state_dict()``; a resume
that loads only that trains on uninitialised moments (non-finite weights by the next step). Here:

- DP=2: SIGKILL after the step-2 checkpoint, rerun: every logged number equals the uninterrupted
  run's, step for step; a finished 2-step run extended to 4 steps equals it too.
- TP=2 x DP=2: the same kill-and-resume.
- A checkpoint saved with the plain optimizer is refused by a run with the distributed one (one line
  naming both settings) instead of training on placeholders.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed import REPO_ROOT, torchrun_command
from tests.train.test_pretrain import error_lines
from tests.train.rl.test_rl_run import metrics, tiny_policy, write_config  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

STEPS = {"steps": 4, "save_interval": 2}


def train(nproc: int, cfg: Path, out: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(nproc, "-m", "megatron_lcr.cli", "train", str(cfg), "--out", str(out), *overrides)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_killed_after_step_2(nproc: int, cfg: Path, out: Path) -> None:
    """Start the run and SIGKILL torchrun, its workers and their rollout servers once the step-2
    checkpoint is complete (workers run in sessions of their own: killed by pid, not by group)."""
    cmd, env = torchrun_command(nproc, "-m", "megatron_lcr.cli", "train", str(cfg), "--out", str(out))
    job = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "iter_0000002" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    procs = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)] if job.poll() is None else []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    job.wait()
    assert state.is_file(), "the run never wrote its step-2 checkpoint"
    assert not (out / "results.json").exists()


def comparable(out: Path) -> list[dict]:
    """Training rows without wall times and the engine side of the log-prob check (server batching
    rounds fp32 differently at the 1e-7 level); every training number must be identical."""
    drop = ("time/", "sync/seconds", "rollout/logp_diff")
    return [{k: v for k, v in row.items() if not k.startswith(drop)} for row in metrics(out) if "loss" in row]


def assert_resumed_exactly(nproc: int, tmp_path: Path, policy: Path, parallel: dict) -> None:
    cfg = write_config(tmp_path / "c.yaml", policy, trainer=STEPS, parallel=parallel)
    reference = tmp_path / "reference"
    proc = train(nproc, cfg, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    train_killed_after_step_2(nproc, cfg, killed)
    proc = train(nproc, cfg, killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = comparable(reference)
    assert [row["step"] for row in expected] == [1, 2, 3, 4]
    assert all(row["skipped"] == 0.0 for row in expected)
    assert comparable(killed) == expected


def test_dp2_distributed_optimizer_kill_resume_and_extension_match_uninterrupted(tmp_path, tiny_policy):  # noqa: F811
    parallel = {"use_distributed_optimizer": True}
    assert_resumed_exactly(2, tmp_path, tiny_policy, parallel)
    # A finished 2-step run, extended to 4 steps by the same command with steps=4.
    extended = tmp_path / "extended"
    cfg = write_config(tmp_path / "c.yaml", tiny_policy, trainer=STEPS, parallel=parallel)
    proc = train(2, cfg, extended, "trainer.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(2, cfg, extended)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(extended) == comparable(tmp_path / "reference")


def test_tp2_dp2_distributed_optimizer_kill_resume_matches_uninterrupted(tmp_path, tiny_policy):  # noqa: F811
    assert_resumed_exactly(4, tmp_path, tiny_policy, {"tp": 2, "use_distributed_optimizer": True})


def test_plain_optimizer_checkpoint_is_refused_by_the_distributed_one(tmp_path, tiny_policy):  # noqa: F811
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_policy, trainer={"steps": 1})
    proc = train(2, cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(2, cfg, out, "trainer.steps=2", "parallel.use_distributed_optimizer=true")
    assert proc.returncode != 0
    lines = set(error_lines(proc.stderr))
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "use_distributed_optimizer=false, resumed with true" in lines.pop()
