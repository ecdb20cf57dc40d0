"""Run a server command so that it dies with the process that launched it.

    python -I -S /abs/path/megatron_lcr/rollout/watchdog.py --parent PID -- CMD [ARG ...]

:class:`~megatron_lcr.rollout.sglang.ServerHandle` starts every rollout server (SGLang, vLLM, ``lcr
serve``, the router) under this script, in a new session. Without it, a trainer that is SIGKILLed
(OOM killer, ``scancel``, a crash in C code) leaves its servers running with parent 1, holding GPUs
and ports. The watchdog:

- starts CMD as its child, in its own process group (it makes one if it was not given one), with
  its stdin/stdout/stderr and environment;
- forwards SIGTERM, SIGINT and SIGHUP to CMD, once per signal kind (so a signal sent to the whole
  group does not reach CMD twice). CMD alone, not the group: a server's main process stops its own
  workers; SGLang 0.5.23 whose scheduler is signalled too takes its crash path instead (SIGQUIT,
  "Subprocess scheduler_0 crashed", crash diagnostics), and exits no sooner;
- when CMD exits, stops what CMD left behind in the group (SIGTERM, then SIGKILL after 5 s) and exits
  with CMD's exit code (128 + N when a signal N ended it, as a shell reports);
- when its parent dies, SIGTERMs the whole group, waits up to ``--grace-s`` (15 s) for it to exit,
  then SIGKILLs it. The whole group at once here: nobody waits for a graceful drain any more, and a
  main process that hangs must not keep its workers (and their GPUs) alive.

**Noticing the parent's death.** The decision is always ``os.getppid() != PID``, checked every
0.5 s (an orphan is re-parented to init or a sub-reaper). On Linux ``PR_SET_PDEATHSIG`` is set too,
but only to *wake* the loop at once: the kernel sends it when the *thread* that forked us exits, not
the process, and the launcher restarts servers from worker threads (``asyncio.to_thread``) that may
end while the trainer lives. Acting on the signal alone would kill a healthy server then; re-checking
the parent's pid cannot be fooled by that, because our parent process is unchanged
(tests/rollout/test_watchdog.py starts a watchdog from a thread that then exits).

Standard library only, run by file path (not ``-m``), so that it needs nothing importable: any
Python 3 runs it, an engine's own venv included, although the launcher uses its own interpreter.
``-I`` keeps this directory (which holds ``sglang.py`` and ``vllm.py``) off ``sys.path``; ``-S``
skips site-packages' start-up hooks. Members of the group are
listed from ``/proc`` (Linux); elsewhere the watchdog cannot tell its group's other members from
itself, so it leaves CMD's leftovers to the launcher and ends a dead parent's group with one
``killpg(SIGKILL)`` that includes itself.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Linux <sys/prctl.h>.
PR_SET_PDEATHSIG = 1
POLL_S = 0.5
# Grace for what CMD left behind when it exits by itself (its workers should be going too).
LEFTOVER_GRACE_S = 5.0


def _say(message: str) -> None:
    print(f"watchdog[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when the thread that forked us exits (a wake-up only, see above)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def group_pids(pgid: int) -> list[int] | None:
    """Live processes of group ``pgid`` other than this one, from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we listed
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 3 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _signal_members(pgid: int, sig: int) -> None:
    """Send ``sig`` to every member of the group but this process (all of it, this one too, without /proc)."""
    pids = group_pids(pgid)
    if pids is None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        return
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_group(pgid: int, child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group's other members, wait up to ``grace_s`` for them to exit, SIGKILL the rest."""
    for sig in FORWARDED:  # what we send ourselves from here on is no news
        signal.signal(sig, signal.SIG_IGN)
    _signal_members(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        left = group_pids(pgid)  # zombies count as gone
        if left == [] or (left is None and child.poll() is not None):
            break
        time.sleep(0.1)
    else:
        _signal_members(pgid, signal.SIGKILL)
    try:
        child.wait(timeout=5.0)  # reap CMD: once we exit, its zombie would be init's (which may never reap it)
    except subprocess.TimeoutExpired:
        pass


def exit_code(returncode: int) -> int:
    """CMD's exit status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _wakeup_pipe() -> int:
    """A pipe that every handled signal writes a byte to, so the loop's select() returns at once."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    return read_fd


def watch(parent: int, command: list[str], grace_s: float) -> int:
    """Run ``command`` under the watch of ``parent``; return the exit status for this process."""
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # never signal the group of whoever started us
    pgid = os.getpgrp()
    received: list[int] = []
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    # Handlers that do nothing but make the signal reach the wake-up pipe.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    wakeup = _wakeup_pipe()
    _set_parent_death_signal(signal.SIGUSR1)
    if os.getppid() != parent:
        _say(f"parent {parent} is gone (or is not this process's parent): not starting {command[0]}")
        return 1
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        _say(f"cannot start {command[0]}: {exc}")
        return 127  # as a shell reports a command it cannot run
    forwarded: set[int] = set()
    while True:
        select.select([wakeup], [], [], POLL_S)
        try:
            os.read(wakeup, 512)
        except BlockingIOError:
            pass
        while received:  # pop one by one: a handler may append while we forward
            sig = received.pop()
            if sig not in forwarded:
                forwarded.add(sig)
                child.send_signal(sig)
        if child.poll() is not None:
            stop_group(pgid, child, LEFTOVER_GRACE_S)
            return exit_code(child.returncode)
        if os.getppid() != parent:
            _say(f"parent {parent} exited: stopping process group {pgid} (SIGKILL after {grace_s:.0f} s)")
            stop_group(pgid, child, grace_s)
            return exit_code(child.returncode) if child.returncode is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="watchdog.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="pid of the launching process (our parent)")
    parser.add_argument("--grace-s", type=float, default=15.0,
                        help="seconds between SIGTERM and SIGKILL of the group once the parent is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    return watch(args.parent, command, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
