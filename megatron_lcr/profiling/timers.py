"""Wall-clock seconds per phase of each training step, as ``time/<phase>_s`` metrics.

One :class:`StepTimer` runs through a training loop (``StepTimer.for_run``; a bare ``StepTimer()``
is a throwaway for code called outside a loop). Each :meth:`StepTimer.metrics` call closes a
step's record and opens the next one, so ``time/step_s`` is the time since the previous record
closed (the first: since the timer was made) and every second of the loop lands in exactly one
step's line. That is why a checkpoint saved after step N's line is written (a checkpoint must never
exist without its step's line: a resumed run keeps the lines up to its checkpoint) shows up as
``time/checkpoint_s`` in step N+1's line. ``time/other_s`` is the part of the step no phase covers,
so that the phases and ``other`` add up to ``time/step_s`` exactly.

Phases are host-side spans (generation, rewards, log-prob scoring, forward/backward, the optimizer
step, the weight sync, ...); a phase entered twice in one step adds up. A phase entered inside
another counts for itself only (the teacher's forward inside the update): the outer one is charged
the rest, so phases never count a second twice. On CUDA each phase ends with a device synchronize, so
that its seconds are its own kernels' rather than the ones queued before it (a handful per step).

``lcr profile`` asks a loop's timer for more through the ``LCR_PROFILE`` environment variable (a JSON
object, see :class:`ProfileRequest`; it crosses any launcher): the spans of every step (phase, start,
end) appended to a JSONL file by global rank 0, and a torch profiler trace (chrome format, one file
per rank, the phases as ``lcr/<phase>`` ranges) of chosen steps. A traced step runs slower (the
profiler records every operator); the report leaves traced steps out of its means.

The phases the loops time: ``lcr train``: generation, reward (rewards and group advantages),
old_logprob, ref_logprob, teacher, forward_backward, optimizer, sync (the finite-weights check and the
weight sync), eval (held-out evaluation at ``eval.interval``), checkpoint; ``lcr sft`` / ``pretrain``:
forward_backward, optimizer, checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV = "LCR_PROFILE"


@dataclass(frozen=True, kw_only=True)
class ProfileRequest:
    """What ``lcr profile`` asks of a run's step timers (``LCR_PROFILE``: this, as JSON)."""

    spans: str | None = None
    """JSONL file that global rank 0 appends each step's phase spans to; None: no spans."""
    trace_steps: tuple[int, ...] = ()
    """Steps to record a torch profiler trace of."""
    trace_dir: str | None = None
    """Directory of the traces (``step<N>.rank<R>.json``)."""

    def __post_init__(self) -> None:
        if self.trace_steps and not self.trace_dir:
            raise ValueError(f"{PROFILE_ENV}: trace_steps {list(self.trace_steps)} needs a trace_dir")

    def to_env(self) -> str:
        return json.dumps({"spans": self.spans, "trace_steps": list(self.trace_steps), "trace_dir": self.trace_dir})

    @classmethod
    def from_env(cls, environ=os.environ) -> ProfileRequest | None:
        text = environ.get(PROFILE_ENV)
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(spans=raw.get("spans"), trace_steps=tuple(int(s) for s in raw.get("trace_steps") or ()),
                       trace_dir=raw.get("trace_dir"))
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{PROFILE_ENV} is not a profile request ({err}): {text[:200]}") from None


def _synchronize_cuda() -> None:
    torch = sys.modules.get("torch")  # a process that never imported torch has no GPU work to wait for
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _global_rank() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


@dataclass
class _Record:
    """The step being timed."""

    step: int
    started: float  # perf_counter
    wall_started: float  # time.time(), to line spans up with other processes' clocks (NVML samples)
    seconds: dict[str, float] = field(default_factory=dict)
    spans: list[list] = field(default_factory=list)  # [phase, start_s, end_s, depth] from `started`


class StepTimer:
    """Seconds per named phase of each step of a loop; ``metrics()`` closes a step."""

    def __init__(self, first_step: int = 1, request: ProfileRequest | None = None) -> None:
        self.request = request
        self._inner: list[float] = []  # per open phase: seconds spent in phases nested in it
        self._trace = None
        self._record = self._open(first_step, time.perf_counter())

    @classmethod
    def for_run(cls, first_step: int) -> StepTimer:
        """The timer of a training loop whose next step is ``first_step``, with what ``LCR_PROFILE`` asks."""
        return cls(first_step, ProfileRequest.from_env())

    def _open(self, step: int, now: float) -> _Record:
        request = self.request
        if request and step in request.trace_steps:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._trace = profile(activities=activities)
            self._trace.start()
        return _Record(step=step, started=now, wall_started=time.time())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        record = self._record
        start = time.perf_counter()
        self._inner.append(0.0)
        label = nullcontext()
        if self._trace is not None:  # the phases show up as ranges in the trace
            from torch.profiler import record_function

            label = record_function(f"lcr/{name}")
        try:
            with label:
                yield
                _synchronize_cuda()
        finally:
            end = time.perf_counter()
            span = end - start
            record.seconds[name] = record.seconds.get(name, 0.0) + span - self._inner.pop()
            record.spans.append([name, start - record.started, end - record.started, len(self._inner)])
            if self._inner:
                self._inner[-1] += span

    def metrics(self) -> dict[str, float]:
        """Close the current step: ``time/<phase>_s`` per phase, ``time/other_s`` (the rest) and
        ``time/step_s`` (since the previous ``metrics()``, or the timer's creation). The next step
        starts now."""
        now = time.perf_counter()
        record = self._record
        step_s = now - record.started
        out = {f"time/{name}_s": value for name, value in record.seconds.items()}
        out["time/other_s"] = step_s - sum(record.seconds.values())
        out["time/step_s"] = step_s
        self._close(record, step_s)
        # The next step starts after the profiler's own writing (a trace can take seconds to export):
        # that is the one stretch of the loop no step's line holds.
        self._record = self._open(record.step + 1, now if self.request is None else time.perf_counter())
        return out

    def _close(self, record: _Record, step_s: float) -> None:
        request = self.request
        if request is None:
            return
        rank = _global_rank()
        if self._trace is not None:
            self._trace.stop()
            Path(request.trace_dir).mkdir(parents=True, exist_ok=True)
            self._trace.export_chrome_trace(str(Path(request.trace_dir) / f"step{record.step}.rank{rank}.json"))
            self._trace = None
        if request.spans and rank == 0:
            line = {"step": record.step, "wall_start": record.wall_started, "step_s": step_s, "spans": record.spans}
            with open(request.spans, "a") as f:
                f.write(json.dumps(line) + "\n")
