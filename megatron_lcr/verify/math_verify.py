"""Symbolic math equivalence with Hugging Face's ``math-verify``, callable from any thread.

Gold and prediction are each parsed (a string with no ``$``, ``\\(``, ``\\[`` or ``\\boxed`` is
wrapped in ``$...$`` first, so ``2x+1`` is read as one expression, not as the number 2), then
``verify(gold, prediction)``; parse failures and timeouts count as not equivalent.

math-verify bounds each parse and comparison with SIGALRM, which works only on a process's main
thread. On the main thread the check runs in place (re-arming any outer ITIMER_REAL, such as
pytest-timeout's, that math-verify's ``alarm(0)`` cancels); off it, the check runs in a helper child
process (on its main thread) with a hard deadline, killed and restarted if it ever hangs.
``rl/rewards.py``'s ``math`` reward is the pure wrapper around ``math_equivalent``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

MATH_TIMEOUT_S = 5
"""Default bound, in whole seconds (SIGALRM's unit), on each math-verify parse and comparison."""


def _as_math_text(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify parses it as one LaTeX expression."""
    if any(marker in text for marker in ("$", "\\(", "\\[", "\\boxed")):
        return text
    return f"${text}$"


def _math_equal_here(prediction: str, golds: Sequence[str], timeout_s: int) -> bool:
    """math-verify on this thread, which must be the main one (its timeouts are SIGALRM)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        predicted = parse(_as_math_text(prediction), parsing_timeout=timeout_s)
        if not predicted:
            return False
        for gold in golds:
            parsed_gold = parse(_as_math_text(gold), parsing_timeout=timeout_s)
            if parsed_gold and verify(parsed_gold, predicted, timeout_seconds=timeout_s):
                return True
    except (Exception, TimeoutException):  # a malformed answer scores 0; it must not stop training
        return False
    return False


@contextlib.contextmanager
def _preserving_real_timer() -> Iterator[None]:
    """Re-arm an outer ITIMER_REAL (e.g. pytest-timeout's) that math-verify's ``alarm(0)`` cancels."""
    delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.monotonic()
    try:
        yield
    finally:
        if delay > 0:  # an overdue outer timer fires now rather than never
            remaining = max(delay - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


class _MathChild:
    """A child Python process answering math checks, one JSON line per request, on its main thread."""

    STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def equal(self, prediction: str, golds: Sequence[str], timeout_s: int) -> bool:
        # Worst case: one parse per gold and the prediction, four timed comparisons per gold.
        deadline_s = timeout_s * (5 * len(golds) + 1) + 5.0
        request = json.dumps({"prediction": prediction, "golds": list(golds), "timeout_s": timeout_s}) + "\n"
        with self._lock:
            for _ in range(2):  # a child that died since the last request is replaced once
                proc = self._started()
                try:
                    proc.stdin.write(request)
                    proc.stdin.flush()
                except OSError:
                    self._stop()
                    continue
                line = self._read_line(proc, deadline_s)
                if line is None:  # hung past every math-verify timeout, or crashed on this input
                    self._stop()
                    return False
                return bool(json.loads(line))
            raise RuntimeError("math reward helper process keeps dying before it reads a request")

    def _started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        code = "from megatron_lcr.verify.math_verify import serve_math_requests; serve_math_requests()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        if self._read_line(self._proc, self.STARTUP_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("math reward helper process failed to start (see its stderr above)")
        return self._proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        return line.strip() if line else None

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):  # unflushed input to a dead child
                    pipe.close()
            self._proc = None


_MATH_CHILD = _MathChild()


def serve_math_requests() -> None:
    """The helper child's loop: read ``{prediction, golds, timeout_s}`` lines, answer ``true``/``false``."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    import math_verify  # noqa: F401  (import before "ready": the first request's deadline excludes it)

    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        result = _math_equal_here(request["prediction"], request["golds"], request["timeout_s"])
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


def math_equivalent(prediction: str, golds: Sequence[str], timeout_s: int = MATH_TIMEOUT_S) -> bool:
    """True if math-verify finds ``prediction`` equivalent to some gold in ``golds``; any thread.

    ``timeout_s``: whole seconds allowed per parse and per comparison (SIGALRM resolution).
    """
    if threading.current_thread() is threading.main_thread():
        with _preserving_real_timer():
            return _math_equal_here(prediction, golds, timeout_s)
    return _MATH_CHILD.equal(prediction, golds, timeout_s)
