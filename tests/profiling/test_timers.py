"""profiling/timers.py: a step's phases add up per name, and the step time covers them."""

from __future__ import annotations

import time

from megatron_lcr.profiling.timers import StepTimer


def test_phases_add_up_and_the_step_spans_them():
    timer = StepTimer()
    with timer.phase("rollout"):
        time.sleep(0.02)
    for _ in range(2):
        with timer.phase("train"):
            time.sleep(0.01)
    try:
        with timer.phase("sync"):
            raise RuntimeError("a failed phase is still timed")
    except RuntimeError:
        pass
    metrics = timer.metrics()
    assert set(metrics) == {"time/rollout_s", "time/train_s", "time/sync_s", "time/step_s"}
    assert metrics["time/rollout_s"] >= 0.02 and metrics["time/train_s"] >= 0.02
    assert metrics["time/step_s"] >= metrics["time/rollout_s"] + metrics["time/train_s"] + metrics["time/sync_s"]


def test_a_nested_phase_counts_for_itself_and_the_outer_one_gets_the_rest():
    timer = StepTimer()
    with timer.phase("train"):
        time.sleep(0.03)
        with timer.phase("teacher"):
            time.sleep(0.05)
        with timer.phase("teacher"):
            time.sleep(0.05)
    metrics = timer.metrics()
    assert 0.1 <= metrics["time/teacher_s"] < 0.13
    assert 0.03 <= metrics["time/train_s"] < 0.06  # not the 0.13 s its span took
    assert metrics["time/train_s"] + metrics["time/teacher_s"] <= metrics["time/step_s"] < 0.2
