"""``lcr plot``: the training curves of one or more runs, side by side, as an image.

Reads each run's ``metrics.jsonl`` (``lcr train`` / ``sft`` / ``pretrain`` write one line per step
and one per held-out evaluation) and draws one panel per metric with one line per run, so a DePO
run and its baseline can be compared at a glance: by default held-out EM on the short and on the
long context, mean reward, DePO's KD loss and seconds per step. The format follows the file name
(``.png``, ``.svg``, ``.pdf``). matplotlib is an optional dependency (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from megatron_lcr.atomic import atomic_write_bytes
from megatron_lcr.data.schema import DataError, iter_jsonl

DEFAULT_METRICS = ("eval/short_em", "eval/long_em", "rollout/reward_mean", "depo/kd_loss", "time/step_s")
_TITLES = {"eval/short_em": "held-out EM, short context (%)", "eval/long_em": "held-out EM, long context (%)",
           "rollout/reward_mean": "mean reward", "depo/kd_loss": "DePO KD loss", "time/step_s": "seconds per step"}


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The records of ``run`` (a run directory or a metrics.jsonl file); errors name file and line."""
    path = Path(run)
    if path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics file (is {run} an lcr train/sft/pretrain output directory?)")
    records = []
    for lineno, record in iter_jsonl(str(path)):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DataError(f"{path}:{lineno}: expected an object with an integer 'step'")
        records.append(record)
    return records


def _plottable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that hold a finite number under ``key``, in step order."""
    points = sorted((r["step"], float(r[key])) for r in records if _plottable(r.get(key)))
    return [s for s, _ in points], [v for _, v in points]


def _labels(runs: list[str]) -> list[str]:
    """Run directory names, or the whole paths where two names clash."""
    names = [Path(r).name or str(r) for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed, or wanted, on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | os.PathLike) -> None:
    """Write ``fig`` to ``out`` whole or not at all (the format from its suffix), and close it."""
    image = io.BytesIO()
    try:
        fig.savefig(image, format=Path(out).suffix.lstrip(".") or "png", dpi=120)
    finally:
        pyplot().close(fig)
    atomic_write_bytes(out, image.getvalue())


def plot_runs(runs: list[str], out: str | os.PathLike, metrics: tuple[str, ...] = DEFAULT_METRICS):
    """Draw ``metrics`` of ``runs`` into ``out`` (written whole or not at all); returns the figure.

    A metric no run has is left out; if none of them is there, the error lists what the runs have.
    """
    plt = pyplot()
    records = [read_metrics(run) for run in runs]
    have = {k for recs in records for r in recs for k, v in r.items() if k != "step" and _plottable(v)}
    present = [m for m in metrics if m in have]
    if not present:
        raise ValueError(f"none of the metrics {list(metrics)} is in {', '.join(map(str, runs))}; "
                         f"they have: {', '.join(sorted(have)) or 'nothing'}")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        for label, recs in zip(_labels(runs), records):
            steps, values = series(recs, metric)
            if steps:
                # Evaluations come every few steps: markers show where the points are.
                ax.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None)
        ax.set_title(_TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    return fig
