"""Wall-clock seconds per phase of a training step, as ``time/<phase>_s`` metrics.

Phases are host-side spans (generation, log-prob scoring, the update, the weight sync, ...); a phase
entered twice in one step adds up. ``time/step_s`` is the step's whole span so far.
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

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``time/<phase>_s`` per phase and ``time/step_s``, the time since the step began."""
        out = {f"time/{name}_s": value for name, value in self.seconds.items()}
        out["time/step_s"] = time.perf_counter() - self.started
        return out
