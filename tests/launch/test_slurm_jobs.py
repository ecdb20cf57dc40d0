"""``lcr launch slurm`` on a real SLURM cluster (slurmctld, slurmd, munge; tools/slurm_local.sh): the tiny
CPU DePO job, submitted, waited for and checked; then the same run preempted.

- Uninterrupted: one node, ``--ntasks-per-node 2`` (torchrun with 2 gloo ranks, DP=2), rank 0 launching
  the ``lcr serve`` server. The job completes without a restart; results.json, every step's metrics once,
  and a final checkpoint holding the training state of exactly 2 ranks; one log per role.
- Preempted: three nodes, 2 trainer nodes x 1 rank (torchrun's rendezvous across nodes, DP=2) and a
  rollout node running ``lcr rollout-servers``, whose URL the trainer gets. Once step 1 is logged the
  test sends the batch shell SIGUSR1, as ``--signal=B:USR1@SECS`` does before the time limit. The
  trainer finishes its step, checkpoints, the job requeues itself (SLURM counts one restart), resumes
  and finishes; its metrics equal the uninterrupted run's step for step (no step lost or repeated:
  a lost or repeated step would change the data cursor, the optimizer state and every later number).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.rl.test_rl_run import metrics, tiny_policy, write_config  # noqa: F401 - fixture
from tests.train.test_pretrain import lcr

pytestmark = pytest.mark.slurm

STEPS = 10
# One job's limit here (seconds): start-up ~30 s, ten tiny steps, a requeue delay of cred_expire (15 s).
JOB_TIMEOUT_S = 420


def squeue_state(env: dict[str, str], job: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                          check=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for_job(env: dict[str, str], job: str, out: Path) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while squeue_state(env, job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            log = out / "slurm" / f"job-{job}.log"
            pytest.fail(f"job {job} still queued or running after {JOB_TIMEOUT_S}s; "
                        f"{log.read_text()[-2000:] if log.is_file() else 'no job log'}")
        time.sleep(2)
    return job_info(env, job)


def submit(env: dict[str, str], cfg: Path, out: Path, *flags: str) -> str:
    proc = lcr("launch", "slurm", str(cfg), "--out", str(out), "--gpus-per-node", "0", "--time", "20",
               "--signal-lead", "120", *flags, env={"SLURM_CONF": env["SLURM_CONF"]}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = proc.stdout.strip()
    assert job.isdigit(), proc.stdout
    return job


def comparable(out: Path) -> list[dict]:
    """Training rows without wall times and the engine side of the log-prob check (server batching
    rounds fp32 differently at the 1e-7 level); every training number must be identical."""
    drop = ("time/", "sync/seconds", "rollout/logp_diff")
    return [{k: v for k, v in row.items() if not k.startswith(drop)} for row in metrics(out) if "loss" in row]


def rank_states(out: Path) -> list[str]:
    results = json.loads((out / "results.json").read_text())
    return sorted(p.name for p in (Path(results["checkpoint"]) / "state").glob("rank_*.pt"))


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_policy) -> Path:  # noqa: F811
    return write_config(tmp_path_factory.mktemp("slurm") / "run.yaml", tiny_policy, trainer={"steps": STEPS})


@pytest.fixture(scope="module")
def finished(slurm_env, run_config, tmp_path_factory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("finished") / "run"
    job = submit(slurm_env, run_config, out, "--ntasks-per-node", "2", "--cpus-per-node", "2")
    return out, job, wait_for_job(slurm_env, job, out)


@pytest.fixture(scope="module")
def preempted(slurm_env, run_config, tmp_path_factory) -> tuple[Path, str, dict, int]:
    out = tmp_path_factory.mktemp("preempted") / "run"
    job = submit(slurm_env, run_config, out, "--nodes", "3", "--rollout-nodes", "1", "--ntasks-per-node", "1",
                 "--cpus-per-node", "1", "rollout.server.host=0.0.0.0")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    logged = []
    while not logged:
        if time.monotonic() > deadline or not squeue_state(slurm_env, job):
            subprocess.run(["scancel", job], env=slurm_env, timeout=30)
            pytest.fail(f"job {job} logged no training step: {(out / 'slurm' / f'job-{job}.log').read_text()[-2000:]}")
        time.sleep(0.2)
        logged = [row["step"] for row in metrics(out) if "loss" in row] if (out / "metrics.jsonl").is_file() else []
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
    return out, job, wait_for_job(slurm_env, job, out), max(logged)


def test_job_trains_and_writes_its_results(finished):
    out, job, info = finished
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0")
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == STEPS and set(results["trained"]) >= {"short_em", "long_em"}
    assert [row["step"] for row in comparable(out)] == list(range(1, STEPS + 1))
    assert rank_states(out) == ["rank_00000.pt", "rank_00001.pt"]  # --ntasks-per-node 2: two ranks
    job_log = (out / "slurm" / f"job-{job}.log").read_text()
    assert "trainer finished" in job_log and "requeue" not in job_log
    assert "lcr: preempted" not in (out / "slurm" / f"trainer-{job}-node0.log").read_text()
    assert (out / "rollout_logs" / "server0.log").is_file()  # rank 0 launched the server
    assert not (out / "preempted.json").exists()


def test_preempted_job_checkpoints_requeues_and_matches_the_uninterrupted_run(preempted, finished):
    out, job, info, signalled_after = preempted
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0")
    record = json.loads((out / "slurm" / f"preempted-{job}-0.json").read_text())
    assert record["reason"] == "request file"
    # The step under way when the warning came, or the next: never a lost one, never the last.
    assert signalled_after <= record["step"] < STEPS
    assert record["checkpoint"].endswith(f"iter_{record['step']:07d}")
    job_log = (out / "slurm" / f"job-{job}.log").read_text()
    for line in ("(restart 0): trainer", "rollout servers ready: http://", "SIGUSR1 (time limit ahead)",
                 "requeueing", "(restart 1): trainer", "trainer finished"):
        assert line in job_log, job_log[-3000:]
    assert f"lcr: preempted (request file) after step {record['step']}" in (
        out / "slurm" / f"trainer-{job}-node0.log").read_text()
    assert (out / "slurm" / f"trainer-{job}-node1.log").is_file()
    assert len(list((out / "slurm").glob(f"rollout-{job}-*.log"))) == 1
    expected = comparable(finished[0])
    assert [row["step"] for row in expected] == list(range(1, STEPS + 1))
    assert all(row["skipped"] == 0.0 for row in expected)
    assert comparable(out) == expected
    assert rank_states(out) == ["rank_00000.pt", "rank_00001.pt"]
