"""profiling/report.py and profile_plots.py: the report of hand-made step lines equals a hand computation
(means, shares, tokens/s, FLOPs per token, MFU), and the figures draw exactly those seconds."""

from __future__ import annotations

import pytest

from megatron_lcr.profiling.flops import TransformerDims, matmul_params, param_count
from megatron_lcr.profiling.report import build_report, render_markdown

RECORDS = [
    {"step": 0, "eval/short_em": 50.0},  # evaluation lines are not steps
    {"step": 1, "time/generation_s": 2.0, "time/forward_backward_s": 5.0, "time/optimizer_s": 0.5, "time/other_s": 0.5,
     "time/step_s": 8.0, "rollout/prompt_tokens": 100.0, "rollout/response_tokens": 20.0, "train/tokens": 200.0,
     "perf/update_flops": 6e12, "perf/logprob_flops": 1e12, "perf/ranks": 2.0},
    {"step": 2, "time/generation_s": 1.0, "time/forward_backward_s": 2.0, "time/optimizer_s": 0.25, "time/sync_s": 0.5,
     "time/other_s": 0.25, "time/step_s": 4.0, "rollout/prompt_tokens": 120.0, "rollout/response_tokens": 40.0,
     "train/tokens": 300.0, "perf/update_flops": 9e12, "perf/logprob_flops": 1.5e12, "perf/ranks": 2.0},
    {"step": 3, "time/generation_s": 1.0, "time/forward_backward_s": 2.0, "time/optimizer_s": 0.25,
     "time/checkpoint_s": 1.0, "time/other_s": 0.75, "time/step_s": 5.0, "rollout/prompt_tokens": 80.0,
     "rollout/response_tokens": 40.0, "train/tokens": 100.0, "perf/update_flops": 3e12, "perf/logprob_flops": 0.5e12,
     "perf/ranks": 2.0},
    {"step": 3, "eval/long_em": 30.0},
]
DIMS = TransformerDims(layers=2, hidden=8, ffn_hidden=12, heads=4, kv_heads=2, head_dim=2, vocab=10)
NVML = {"available": False, "line": "NVML unavailable: NVML Shared Library Not Found", "gpus": []}
RUN = {"command": "train", "config": "c.yaml", "argv": "lcr profile c.yaml --steps 3 --out d", "steps": 3}


def report(peak=(100.0, "--peak-tflops"), warmup=1) -> dict:
    return build_report(RECORDS, warmup=warmup, dims=DIMS, peak=peak, why_no_peak="no GPU; pass --peak-tflops",
                        nvml=NVML, run=RUN)


def test_phase_means_and_shares_over_the_measured_steps():
    r = report()
    assert r["run"]["warmup_steps"] == [1] and r["run"]["measured_steps"] == [2, 3]
    assert r["step_time"] == {"mean_s": 4.5, "min_s": 4.0, "max_s": 5.0}
    table = {p["phase"]: (p["mean_s"], p["share"]) for p in r["phases"]}
    assert [p["phase"] for p in r["phases"]] == ["generation", "forward_backward", "optimizer", "sync", "checkpoint",
                                                 "other"]
    assert table["generation"] == (1.0, pytest.approx(2 / 9))
    assert table["forward_backward"] == (2.0, pytest.approx(4 / 9))
    assert table["sync"] == (0.25, pytest.approx(0.5 / 9))  # a phase one step lacks counts 0 there
    assert table["checkpoint"] == (0.5, pytest.approx(1 / 9))
    assert table["other"] == (0.5, pytest.approx(1 / 9))
    assert sum(share for _, share in table.values()) == pytest.approx(1.0)
    assert r["other_max_share"] == pytest.approx(0.75 / 5)
    assert [s["phase_sum_error_s"] for s in r["steps"]] == [0.0, 0.0, 0.0]
    assert [s["warmup"] for s in r["steps"]] == [True, False, False]


def test_tokens_flops_and_mfu_equal_a_hand_computation():
    r = report()
    rate = r["throughput"]
    assert rate["prompt_tokens_per_s"] == pytest.approx(200 / 9)
    assert rate["response_tokens_per_s"] == pytest.approx(80 / 9)
    assert rate["train_tokens_per_s"] == pytest.approx(400 / 9)
    assert rate["generation_response_tokens_per_s"] == pytest.approx(80 / 2)
    flops = r["flops"]
    assert flops["params"] == param_count(DIMS) and flops["matmul_forward_flops_per_token"] == 2 * matmul_params(DIMS)
    assert flops["training_flops_per_token"] == pytest.approx(12e12 / 400)
    assert flops["forward_flops_per_token"] == pytest.approx(12e12 / 400 / 3)
    assert flops["model_flops_per_step"] == pytest.approx((12e12 + 2e12) / 2)
    mfu = r["mfu"]
    assert mfu["ranks"] == 2.0
    assert mfu["achieved_tflops_per_rank"] == pytest.approx(14e12 / 9 / 2 / 1e12)
    assert mfu["value"] == pytest.approx(14e12 / 9 / 2 / 100e12)
    assert mfu["forward_backward"] == pytest.approx(12e12 / 4 / 2 / 100e12)
    assert mfu["note"] is None


def test_without_a_peak_mfu_is_na_and_says_why():
    mfu = report(peak=None)["mfu"]
    assert mfu["value"] is None and mfu["forward_backward"] is None
    assert mfu["note"] == "n/a: no GPU; pass --peak-tflops"
    assert mfu["achieved_tflops_per_rank"] == pytest.approx(14e12 / 9 / 2 / 1e12)  # still measured


def test_markdown_has_the_table_the_nvml_line_and_every_step():
    text = render_markdown(report())
    assert "| forward_backward | 2.000 | 44.4 |" in text
    assert "| checkpoint | 0.500 | 11.1 |" in text
    assert "| **step** | **4.500** | **100.0** |" in text
    assert "| MFU, whole step | 0.78% |" in text and "| MFU, forward/backward phase | 1.50% |" in text
    assert "\nNVML unavailable: NVML Shared Library Not Found\n" in text
    assert "| 1* | 8.000 |" in text and "| 3 | 5.000 |" in text
    assert "| MFU, whole step | n/a: no GPU; pass --peak-tflops |" in render_markdown(report(peak=None))


def test_traced_steps_are_shown_but_not_averaged():
    r = build_report(RECORDS, warmup=1, dims=DIMS, peak=None, why_no_peak="", nvml=NVML, run=RUN, traced=(3,))
    assert r["run"]["measured_steps"] == [2] and r["run"]["traced_steps"] == [3]
    assert r["step_time"]["mean_s"] == 4.0 and {p["phase"]: p["mean_s"] for p in r["phases"]}["sync"] == 0.5
    assert [(s["step"], s["measured"], s["traced"]) for s in r["steps"]] == [(1, False, False), (2, True, False),
                                                                           (3, False, True)]
    assert "| 3t | 5.000 |" in render_markdown(r)


def test_runs_without_steps_or_with_nothing_left_to_measure_are_errors():
    with pytest.raises(ValueError, match="no training step"):
        build_report(RECORDS[:1], warmup=0, dims=DIMS, peak=None, why_no_peak="", nvml=NVML, run=RUN)
    with pytest.raises(ValueError, match="no step to measure: the run logged 3 step"):
        report(warmup=3)
    with pytest.raises(ValueError, match=r"steps \[2, 3\] are traced"):
        build_report(RECORDS, warmup=1, dims=DIMS, peak=None, why_no_peak="", nvml=NVML, run=RUN, traced=(2, 3))


def test_step_bars_stack_each_steps_phase_seconds(tmp_path):
    from megatron_lcr.profiling.profile_plots import plot_step_breakdown

    out = tmp_path / "bars.png"
    fig = plot_step_breakdown(report(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
    assert heights["forward_backward"] == [5.0, 2.0, 2.0]
    assert heights["checkpoint"] == [0.0, 0.0, 1.0] and heights["sync"] == [0.0, 0.5, 0.0]
    tops = [max(bar.get_y() + bar.get_height() for c in ax.containers for bar in [c[i]]) for i in range(3)]
    assert tops == pytest.approx([8.0, 4.0, 5.0])  # each bar reaches its step time
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1*", "2", "3"]


def test_timeline_draws_each_span_on_its_phase_row(tmp_path):
    from megatron_lcr.profiling.profile_plots import plot_timeline

    spans = {"step": 2, "wall_start": 100.0, "step_s": 4.0,
             "spans": [["generation", 0.0, 1.0, 0], ["forward_backward", 1.2, 3.2, 0], ["optimizer", 3.2, 3.45, 0]]}
    samples = [{"time": 100.5, "index": 0, "util_pct": 10.0}, {"time": 102.0, "index": 0, "util_pct": 95.0}]
    fig = plot_timeline(spans, tmp_path / "timeline.png", samples)
    phases_ax, gpu_ax = fig.axes
    assert [t.get_text() for t in phases_ax.get_yticklabels()] == ["generation", "forward_backward", "optimizer"]
    bars = [(c.get_paths()[0].vertices[:, 0].min(), c.get_paths()[0].vertices[:, 0].max())
            for c in phases_ax.collections]
    assert bars == [pytest.approx((0.0, 1.0)), pytest.approx((1.2, 3.2)), pytest.approx((3.2, 3.45))]
    (line,) = gpu_ax.get_lines()
    assert list(line.get_xdata()) == [0.5, 2.0] and list(line.get_ydata()) == [10.0, 95.0]
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
