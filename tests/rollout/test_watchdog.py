"""The server watchdog: servers die with the process that launched them, and only then.

- A SIGKILLed launcher: the watchdog stops its command's process group (SIGTERM; SIGKILL after the
  grace period for a command that ignores SIGTERM).
- The real thing: ``lcr train`` with two ``lcr serve`` servers is SIGKILLed once they answer
  /health; no process of the servers' groups is left.
- A launcher *thread* that exits (restarts run in worker threads) does not stop the server, although
  Linux sends the watchdog its parent-death signal then.
- Exit codes pass through; signals to the watchdog reach the command; what the command leaves
  behind in its group is stopped when it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_lcr.rollout.sglang import WATCHDOG_SCRIPT, watchdog_command
from tests.distributed import REPO_ROOT
from tests.rollout.test_node import healthy

# A launcher that starts the watchdog (argv: grace_s, then the command) and waits to be killed.
LAUNCHER = """
import os, subprocess, sys, time
wd = [sys.executable, "-I", "-S", sys.argv[1], "--parent", str(os.getpid()), "--grace-s", sys.argv[2], "--",
      *sys.argv[3:]]
print(subprocess.Popen(wd, start_new_session=True).pid, flush=True)
time.sleep(600)
"""


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie counts: it holds nothing; this container's init may never reap it)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(predicate, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what} not within {timeout_s:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - start


def _group(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and not _gone(proc):
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _children_started(watchdog: psutil.Process, count: int = 1) -> list[psutil.Process]:
    _wait_until(lambda: len(watchdog.children(recursive=True)) >= count, 15, "the watchdog's command")
    return watchdog.children(recursive=True)


@pytest.mark.parametrize("command, processes, grace_s", [
    (["sleep", "600"], 1, "15"),
    # Ignores SIGTERM (and so does the sleep it runs): only the SIGKILL after the grace period ends it.
    (["sh", "-c", "trap '' TERM; sleep 600"], 2, "1"),
], ids=["sigterm", "ignores-sigterm"])
def test_command_dies_with_a_sigkilled_launcher(tmp_path, command, processes, grace_s):
    log = tmp_path / "watchdog.log"
    with open(log, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(WATCHDOG_SCRIPT), grace_s, *command],
                                    stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    watchdog = None
    try:
        watchdog = psutil.Process(int(launcher.stdout.readline()))
        group = [watchdog, *_children_started(watchdog, processes)]
        time.sleep(0.3)  # the shell has set its trap
        launcher.kill()
        launcher.wait()
        took = _wait_until(lambda: all(_gone(p) for p in group), 10, "the command's process group gone")
        assert _group(watchdog.pid) == []
        if grace_s == "1":
            assert took >= 0.8  # SIGTERM was tried first, for the 1 s grace period
        assert f"parent {launcher.pid} exited" in log.read_text()
    finally:
        for proc in _group(launcher.pid) + (_group(watchdog.pid) if watchdog else []):
            proc.kill()


def test_exit_codes_and_leftovers():
    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(watchdog_command(command), capture_output=True, text=True, timeout=30)

    assert run("sh", "-c", "exit 3").returncode == 3
    assert run("sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM  # as a shell reports it
    assert run("no-such-command-lcr").returncode == 127
    # The background sleep keeps the output pipe open: run() returns only because the watchdog stopped it.
    done = run("sh", "-c", "sleep 600 & echo $!; exit 0")
    assert done.returncode == 0
    left = int(done.stdout.split()[0])
    assert not psutil.pid_exists(left) or _gone(psutil.Process(left))


def test_sigterm_reaches_the_command():
    watchdog = subprocess.Popen(watchdog_command(["sleep", "600"]), start_new_session=True)
    (sleep,) = _children_started(psutil.Process(watchdog.pid))
    watchdog.send_signal(signal.SIGTERM)
    assert watchdog.wait(timeout=10) == 128 + signal.SIGTERM
    assert _gone(sleep)


def test_launcher_thread_exit_does_not_stop_the_command():
    # Popen from a thread that then ends, as a restart from asyncio.to_thread does: Linux sends the
    # watchdog its parent-death signal, but this process (its parent) lives on.
    box = []

    def launch() -> None:
        box.append(subprocess.Popen(watchdog_command(["sleep", "600"]), start_new_session=True))
        box.extend(_children_started(psutil.Process(box[0].pid)))  # the watchdog has set its signal up

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    watchdog, sleep = box
    try:
        time.sleep(2.0)  # four polls of the parent
        assert watchdog.poll() is None and not _gone(sleep)
    finally:
        watchdog.terminate()
        watchdog.wait(timeout=10)


def _health(port: int) -> bool:
    return healthy(f"http://127.0.0.1:{port}")


def _server_port(watchdog: psutil.Process) -> int:
    cmdline = watchdog.cmdline()
    return int(cmdline[cmdline.index("--port") + 1])


def test_sigkilled_trainer_leaves_no_server_process(tmp_path):
    out = tmp_path / "run"
    script = Path(sys.executable).with_name("lcr")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    overrides = ["trainer.steps=1000", "trainer.tensorboard=false", "data.longblocks.num_samples=32",
                 "data.num_eval=4", "rollout.server.num_servers=2"]
    trainer = subprocess.Popen([str(script), "train", "examples/tiny/depo.yaml", "--out", str(out), *overrides],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        me = psutil.Process(trainer.pid)

        def watchdogs() -> list[psutil.Process]:
            return [p for p in me.children() if str(WATCHDOG_SCRIPT) in p.cmdline()]

        _wait_until(lambda: trainer.poll() is not None or (
            len(watchdogs()) == 2 and all(_health(_server_port(w)) for w in watchdogs())), 300, "two healthy servers")
        assert trainer.poll() is None, "the trainer exited before its servers were up"
        groups = {w.pid: _group(w.pid) for w in watchdogs()}
        assert all(len(members) >= 2 for members in groups.values())  # the watchdog and its lcr serve
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        # lcr serve stops on SIGTERM; 15 s of grace then SIGKILL bound one stuck in a collective.
        _wait_until(lambda: all(_gone(p) for members in groups.values() for p in members), 25,
                    "every server process gone")
        assert all(_group(pgid) == [] for pgid in groups)
        log = (out / "rollout_logs" / "server0.log").read_text()
        assert f"parent {trainer.pid} exited" in log
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
