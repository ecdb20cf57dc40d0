"""Wall-clock seconds per phase of a training step, as ``time/<phase>_s`` metrics.

Phases are host-side spans (generation, log-prob scoring, the update, the weight sync, ...); a phase
entered twice in one step adds up. A phase entered inside another counts for itself only (the teacher's
forward inside the update): the outer one is charged the rest, so phases never count a second twice.
``time/step_s`` is the step's whole span so far.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Seconds per named phase of one step, from its creation on."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds spent in phases nested in it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            span = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + span - self._inner.pop()
            if self._inner:
                self._inner[-1] += span

    def metrics(self) -> dict[str, float]:
        """``time/<phase>_s`` per phase and ``time/step_s``, the time since the step began."""
        out = {f"time/{name}_s": value for name, value in self.seconds.items()}
        out["time/step_s"] = time.perf_counter() - self.started
        return out
