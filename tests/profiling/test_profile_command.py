"""``lcr profile``: a real ``lcr train`` run of a tiny GRPO config (reference server on loopback), the
report built from what it logged, and one-line errors before anything runs.

On the run: every step's phases and ``other`` add up to its measured time, ``other`` stays under 5%
of each measured step, a checkpoint saved after a step lands in the next step's line, the tokens and
FLOPs the trainer logs agree with each other, the torch trace covers the asked step only, and on a
machine without NVIDIA GPUs the NVML part is one line, the rest of the report is there.
"""

from __future__ import annotations

import json

import pytest

from tests.train.rl.test_rl_run import metrics, tiny_policy, write_config  # noqa: F401 - fixture
from tests.train.test_pretrain import error_lines, lcr


def _has_nvidia_driver() -> bool:
    from tests.profiling.test_nvml import _has_nvidia_driver as has

    return has()


@pytest.mark.e2e
def test_profile_of_three_grpo_steps(tmp_path, tiny_policy):  # noqa: F811
    cfg = write_config(tmp_path / "c.yaml", tiny_policy, objective="rl", trainer={"save_interval": 1})
    out = tmp_path / "profile"
    proc = lcr("profile", str(cfg), "--steps", "3", "--out", str(out), "--trace-steps", "2", "--peak-tflops", "0.05",
               timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nvml_lines = [line for line in proc.stderr.splitlines() if line.startswith("NVML")]
    if not _has_nvidia_driver():
        assert len(nvml_lines) == 1 and nvml_lines[0].startswith("NVML unavailable: ")
    report = json.loads((out / "profile.json").read_text())
    assert proc.stdout == (out / "profile.md").read_text() and proc.stdout.startswith("# lcr profile: train")
    assert report["run"]["warmup_steps"] == [1] and report["run"]["traced_steps"] == [2]
    assert report["run"]["measured_steps"] == [3]  # the traced step ran under the torch profiler

    lines = [m for m in metrics(out) if "time/step_s" in m]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for line, step in zip(lines, report["steps"]):
        phases = {k[5:-2]: v for k, v in line.items() if k.startswith("time/") and k != "time/step_s"}
        assert step["phases"] == phases and step["step_s"] == line["time/step_s"]
        assert sum(phases.values()) == pytest.approx(line["time/step_s"], rel=1e-9)  # phases + other == step
        assert {"generation", "reward", "old_logprob", "forward_backward", "optimizer", "sync", "other"} <= set(phases)
        assert ("checkpoint" in phases) == (line["step"] > 1)  # saved after steps 1 and 2, carried to 2 and 3
        if step["measured"]:
            assert phases["other"] < 0.05 * line["time/step_s"], line
        # GRPO trains each rollout once: trained tokens = prompt + response tokens; the update is forward +
        # backward (3x) over exactly the sequences the old log-probs scored forward once.
        assert line["train/tokens"] == line["rollout/prompt_tokens"] + line["rollout/response_tokens"]
        assert line["perf/update_flops"] == pytest.approx(3 * line["perf/logprob_flops"], rel=1e-12)
    assert report["other_max_share"] < 0.05

    measured = lines[2:]
    seconds = sum(m["time/step_s"] for m in measured)
    flops = sum(m["perf/update_flops"] + m["perf/logprob_flops"] for m in measured)
    assert report["mfu"]["value"] == pytest.approx(flops / seconds / 0.05e12, rel=1e-9)
    assert report["throughput"]["prompt_tokens_per_s"] == pytest.approx(
        sum(m["rollout/prompt_tokens"] for m in measured) / seconds, rel=1e-9)

    spans = [json.loads(line) for line in (out / "profile_spans.jsonl").read_text().splitlines()]
    assert [s["step"] for s in spans] == [1, 2, 3]
    for s, line in zip(spans, lines):
        assert s["step_s"] == line["time/step_s"]
        top = sorted((start, end) for _, start, end, depth in s["spans"] if depth == 0)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(top, top[1:]))  # phases do not overlap
        covered = sum(end - start for start, end in top)
        assert covered + line["time/other_s"] == pytest.approx(line["time/step_s"], rel=1e-9)
    assert sorted(p.name for p in (out / "traces").iterdir()) == ["step2.rank0.json"]
    events = json.loads((out / "traces" / "step2.rank0.json").read_text())["traceEvents"]
    assert {"lcr/generation", "lcr/forward_backward", "lcr/checkpoint"} <= {e.get("name") for e in events}
    for image in ("step_breakdown.png", "timeline.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "2", "--trace-steps", "2,5"], "--trace-steps '2,5': steps must be between 1 and --steps (2)"),
    (["--steps", "2", "--trace-steps", "two"], "--trace-steps 'two': expected comma-separated step numbers"),
    (["--steps", "2", "--warmup", "2"], "--warmup 2 must be >= 0 and below --steps (2)"),
    (["--steps", "3", "--trace-steps", "2,3"], "traces every step after the 1 warm-up step(s): none would be left"),
    (["--steps", "2", "--peak-tflops", "-1"], "--peak-tflops must be > 0, got -1.0"),
    (["--steps", "2", "trainer.steps=5"], "set the number of steps with --steps, not trainer.steps="),
    (["--steps", "2", "trainer.stepz=5"], "trainer.stepz"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, extra, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  hf_path: examples/tiny/base\n")
    out = tmp_path / "out"
    proc = lcr("profile", str(cfg), "--out", str(out), *extra)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert message in line
    assert not out.exists()


def test_an_existing_run_directory_is_refused_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = lcr("profile", "examples/tiny/depo.yaml", "--steps", "2", "--out", str(out))
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "exists and is not empty: lcr profile needs a fresh run directory" in line
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
