"""Preemption: stop at a step boundary with a checkpoint when the job is told to go, so that a requeued
job (the same command, the same ``--out``) resumes with no step lost or repeated.

Two ways to be told, either on any rank:

- a signal to the trainer process: SIGUSR1 (``sbatch --signal=USR1@SECS``: a warning ahead of the time
  limit) or SIGTERM (SLURM's preemption and ``scancel``, followed by SIGKILL after the grace time;
  torchrun forwards it to its workers);
- a request file whose path is in ``$LCR_PREEMPT_REQUEST`` appears (rank 0 looks). The script of
  ``lcr launch slurm`` writes it when its batch shell gets SIGUSR1 (``--signal=B:USR1@SECS``). It does
  not forward the signal through ``srun``: SLURM delivers a step's signal to every process of the
  step, and the rollout servers rank 0 launched (``lcr serve``, SGLang, which uses SIGUSR1 itself, and
  their watchdogs) would die of it in the middle of a step (seen with proctrack/linuxproc, SLURM 22.05).

The loop asks :meth:`Preemption.requested` after every whole step (every rank, the same step); the
answer is the maximum over all ranks (one all-reduce of one number), so a signal that reached some
ranks before the check and others after it still stops all of them at the same step: a collective
save that only some ranks enter would hang. Then the loop saves its checkpoint and calls
:meth:`Preemption.exit`: rank 0 records ``preempted.json`` in the run directory (step, checkpoint,
reason) and every rank leaves with :data:`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.parallel.env import collective_device

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEST_ENV = "LCR_PREEMPT_REQUEST"
"""Environment variable naming the request file (set by the script ``lcr launch slurm`` writes)."""
RECORD_NAME = "preempted.json"
"""Written to the run directory by rank 0 when a run stops for preemption."""
PREEMPTED_EXIT_CODE = 75
"""Exit status of a trainer that stopped for preemption (EX_TEMPFAIL: "try again later")."""
# What requested() reduces: 0 nothing, else the index + 1 of the first reason below.
_REASONS = ("request file", *(sig.name for sig in PREEMPT_SIGNALS))


class Preempted(SystemExit):
    """Raised by :meth:`Preemption.exit`; a SystemExit, so the CLI exits with its code instead of
    reporting an error, and the ``with`` blocks around the loop (servers, logs) close on the way out."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.reason = step, reason


class Preemption:
    """``with Preemption(out_dir) as preempt:`` installs the signal handlers (and restores the previous
    ones on exit); in the loop, ``if preempt.requested(): save(step); preempt.exit(step)``."""

    def __init__(self, out_dir: str | Path, *, request_file: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.request_file = Path(request_file) if request_file else _request_from_env()
        self._signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._reason = ""

    def __enter__(self) -> Preemption:
        # Signal handlers can only be set from the main thread (tests may run loops elsewhere).
        if _in_main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: the step in progress finishes first. No printing here: a handler that writes to
        # stderr while the interrupted code does (the progress bar) fails with a reentrant-call error.
        if self._signal is None:  # the first signal names the reason (torchrun may forward a second)
            self._signal = signal.Signals(signum)

    def _local_reason(self) -> int:
        if self._signal is not None:
            return 1 + _REASONS.index(self._signal.name)
        is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if is_rank0 and self.request_file is not None and self.request_file.exists():
            return 1
        return 0

    def requested(self) -> bool:
        """Whether any rank was told to stop. Collective: every rank calls it at the same step boundary."""
        local = self._local_reason()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([local], dtype=torch.int64, device=collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        self._reason = _REASONS[local - 1] if local else ""
        return bool(local)

    def exit(self, step: int, checkpoint: str | Path | None = None) -> None:
        """Leave the run after ``step`` (whose checkpoint the caller has saved): rank 0 records it and
        removes the request file it answered; every rank raises :class:`Preempted`."""
        reason = self._reason or "request"
        if not dist.is_initialized() or dist.get_rank() == 0:
            record = {"step": step, "reason": reason, "checkpoint": str(checkpoint) if checkpoint else None,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(self.out_dir / RECORD_NAME, json.dumps(record, indent=2) + "\n")
            if self.request_file is not None:
                self.request_file.unlink(missing_ok=True)
            print(f"lcr: preempted ({reason}) after step {step}; checkpoint {checkpoint}; the same command "
                  "resumes from it", file=sys.stderr, flush=True)
        raise Preempted(step, reason)


def _request_from_env() -> Path | None:
    path = os.environ.get(REQUEST_ENV, "")
    return Path(path) if path else None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
