"""profiling/timers.py: a step's phases and 'other' add up to the step exactly; a record closes where the
next begins; spans and traces when lcr profile asks for them."""

from __future__ import annotations

import json
import time

import pytest

from megatron_lcr.profiling.timers import PROFILE_ENV, ProfileRequest, StepTimer


def phase_sum(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k != "time/step_s")


class FakeTime:
    """The timer module's clock, moved by hand: exact seconds whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return 1000.0 + self.now


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    from megatron_lcr.profiling import timers

    fake = FakeTime()
    monkeypatch.setattr(timers, "time", fake)
    return fake


def test_phases_add_up_and_other_is_the_rest_exactly():
    timer = StepTimer()  # the real clock
    with timer.phase("generation"):
        time.sleep(0.02)
    time.sleep(0.03)  # in no phase
    for _ in range(2):
        with timer.phase("forward_backward"):
            time.sleep(0.01)
    try:
        with timer.phase("sync"):
            raise RuntimeError("a failed phase is still timed")
    except RuntimeError:
        pass
    metrics = timer.metrics()
    assert set(metrics) == {"time/generation_s", "time/forward_backward_s", "time/sync_s", "time/other_s", "time/step_s"}
    assert metrics["time/generation_s"] >= 0.02 and metrics["time/forward_backward_s"] >= 0.02
    assert metrics["time/other_s"] >= 0.03
    assert phase_sum(metrics) == pytest.approx(metrics["time/step_s"], abs=1e-12)


def test_a_nested_phase_counts_for_itself_and_the_outer_one_gets_the_rest(clock):
    timer = StepTimer()
    clock.now = 1.0
    with timer.phase("train"):
        clock.now = 4.0
        for _ in range(2):
            with timer.phase("teacher"):
                clock.now += 5.0
    clock.now = 15.0
    assert timer.metrics() == {"time/teacher_s": 10.0, "time/train_s": 3.0,  # not the 13 s its span took
                               "time/other_s": 2.0, "time/step_s": 15.0}


def test_each_record_starts_where_the_last_closed_and_carries_what_came_after_it(clock):
    """A checkpoint saved after step 1's line lands in step 2's; no second is in two records or none."""
    timer = StepTimer()
    with timer.phase("forward_backward"):
        clock.now = 2.0
    clock.now = 3.0
    first = timer.metrics()
    with timer.phase("checkpoint"):
        clock.now = 5.0
    with timer.phase("forward_backward"):
        clock.now = 6.0
    clock.now = 6.5
    second = timer.metrics()
    assert first == {"time/forward_backward_s": 2.0, "time/other_s": 1.0, "time/step_s": 3.0}
    assert second == {"time/checkpoint_s": 2.0, "time/forward_backward_s": 1.0, "time/other_s": 0.5, "time/step_s": 3.5}


def test_spans_of_every_step_go_to_the_file_lcr_profile_names(tmp_path):
    spans = tmp_path / "spans.jsonl"
    before = time.time()
    timer = StepTimer(first_step=5, request=ProfileRequest(spans=str(spans)))
    with timer.phase("generation"):
        time.sleep(0.02)
    with timer.phase("train"):
        with timer.phase("teacher"):
            time.sleep(0.01)
    step5 = timer.metrics()
    with timer.phase("checkpoint"):
        pass
    timer.metrics()
    lines = [json.loads(line) for line in spans.read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 6]
    first = lines[0]
    assert before <= first["wall_start"] <= lines[1]["wall_start"] <= time.time()
    assert first["step_s"] == step5["time/step_s"]
    assert [(name, depth) for name, _, _, depth in first["spans"]] == [("generation", 0), ("teacher", 1), ("train", 0)]
    (_, g0, g1, _), (_, t0, t1, _), (_, r0, r1, _) = first["spans"]
    assert 0 <= g0 < g1 <= r0 <= t0 < t1 <= r1 <= first["step_s"]  # offsets from the step's start, nested inside
    assert g1 - g0 == pytest.approx(step5["time/generation_s"], abs=1e-9)
    assert (r1 - r0) - (t1 - t0) == pytest.approx(step5["time/train_s"], abs=1e-9)


def test_a_trace_covers_the_chosen_step_only_and_shows_the_phases(tmp_path):
    import torch

    traces = tmp_path / "traces"
    timer = StepTimer(first_step=1, request=ProfileRequest(trace_steps=(2,), trace_dir=str(traces)))
    for step in (1, 2, 3):
        with timer.phase("forward_backward"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        timer.metrics()
    assert sorted(p.name for p in traces.iterdir()) == ["step2.rank0.json"]
    events = json.loads((traces / "step2.rank0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "lcr/forward_backward" in names and "aten::mm" in names


def test_the_request_travels_through_the_environment(monkeypatch):
    request = ProfileRequest(spans="/x/spans.jsonl", trace_steps=(2, 3), trace_dir="/x/traces")
    monkeypatch.setenv(PROFILE_ENV, request.to_env())
    assert ProfileRequest.from_env() == request
    assert StepTimer.for_run(4).request == request
    monkeypatch.delenv(PROFILE_ENV)
    assert ProfileRequest.from_env() is None and StepTimer.for_run(1).request is None
    monkeypatch.setenv(PROFILE_ENV, "{not json")
    with pytest.raises(ValueError, match=f"{PROFILE_ENV} is not a profile request"):
        StepTimer.for_run(1)
    with pytest.raises(ValueError, match=r"trace_steps \[2\] needs a trace_dir"):
        ProfileRequest(trace_steps=(2,))
