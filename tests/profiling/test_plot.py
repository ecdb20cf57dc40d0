"""lcr plot: the curves drawn are the metrics in the files; bad runs and keys are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_lcr.data.schema import DataError
from megatron_lcr.profiling.plot import plot_runs, read_metrics, series


def write_run(path, records):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RUN_A = [{"step": 0, "eval/long_em": 20.0}, {"step": 1, "rollout/reward_mean": 0.25, "loss": 1.5},
         {"step": 2, "rollout/reward_mean": 0.5, "loss": float("nan")}, {"step": 2, "eval/long_em": 35.5}]
RUN_B = [{"step": 0, "eval/long_em": 20.0}, {"step": 2, "eval/long_em": 12.0}, {"step": 1, "rollout/reward_mean": 0.75}]


def test_series_keeps_finite_numbers_in_step_order():
    assert series(RUN_A, "eval/long_em") == ([0, 2], [20.0, 35.5])
    assert series(RUN_A, "loss") == ([1], [1.5])  # NaN is left out, not drawn as a gap-less line
    assert series(RUN_B, "rollout/reward_mean") == ([1], [0.75])
    assert series([{"step": 3, "skipped": True}], "skipped") == ([], [])
    assert series(RUN_A, "absent") == ([], [])


def test_each_panel_draws_every_runs_series(tmp_path):
    a, b = write_run(tmp_path / "depo", RUN_A), write_run(tmp_path / "grpo", RUN_B)
    out = tmp_path / "curves.png"
    fig = plot_runs([str(a), str(b)], out, ("eval/long_em", "rollout/reward_mean", "absent"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "depo", "grpo"]  # no temporary left
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # 'absent' is in no run: no panel
    drawn = {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in panels for line in ax.get_lines()}
    assert drawn == {
        ("held-out EM, long context (%)", "depo"): ([0, 2], [20.0, 35.5]),
        ("held-out EM, long context (%)", "grpo"): ([0, 2], [20.0, 12.0]),
        ("mean reward", "depo"): ([1, 2], [0.25, 0.5]),
        ("mean reward", "grpo"): ([1], [0.75]),
    }


def test_same_directory_names_are_told_apart_by_path(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = write_run(tmp_path / "x" / "run", RUN_A), write_run(tmp_path / "y" / "run", RUN_B)
    fig = plot_runs([str(a), str(b)], tmp_path / "c.svg", ("eval/long_em",))
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [str(a), str(b)]
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_bad_runs_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"nope/metrics.jsonl: no metrics file"):
        read_metrics(tmp_path / "nope")
    bad = write_run(tmp_path / "bad", RUN_A)
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"step": "three"}\n')
    with pytest.raises(DataError, match=r"bad/metrics.jsonl:5: expected an object with an integer 'step'"):
        read_metrics(bad)


def test_cli_unknown_metric_is_one_line_listing_what_there_is(tmp_path):
    run = write_run(tmp_path / "run", RUN_A)
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "megatron_lcr.cli", "plot", str(run), "--out", str(out),
                           "--metrics", "eval/lng_em"], capture_output=True, text=True)
    assert proc.returncode == 1 and not out.exists()
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("lcr: error: none of the metrics ['eval/lng_em']")
    assert line.endswith("they have: eval/long_em, loss, rollout/reward_mean"), line
