"""Run a worker script under torchrun from a test (multi-process gloo tests; workers in tests/workers/)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun_command(nproc: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` and its environment: this checkout first on
    the import path, one thread per process (nproc processes share the machine's cores), offline HF.
    ``--standalone`` lets the rendezvous bind a port the OS picks, so concurrent runs (pytest-xdist,
    two checkouts) cannot collide on one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], env


def run_torchrun(
    script: str | os.PathLike, nproc: int, args: Sequence[str] = (), *, timeout: float = 600
) -> str:
    """Run ``script`` on ``nproc`` local processes; returns its combined stdout and stderr.

    Raises AssertionError with the tail of the output if torchrun exits non-zero or times out.
    """
    cmd, env = torchrun_command(nproc, str(script), *map(str, args))
    name = Path(script).name
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun {name} timed out after {timeout}s:\n{out[-3000:]}") from None
    except BaseException:  # Ctrl-C or pytest-timeout: do not leave the workers running
        _stop(proc)
        raise
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {name} (nproc {nproc}) exited with {proc.returncode}:\n{out[-3000:]}")
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop torchrun and its workers.

    Each worker runs in a session of its own, out of reach of a process-group kill, and a worker
    hanging in a collective would keep the output pipe open: so its pid is taken before torchrun goes.
    """
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # torchrun already gone; its workers were reaped or re-parented
        workers = []
    proc.terminate()  # torchrun forwards SIGTERM to its workers and waits for them
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=grace_s)
