"""``lcr profile``'s pictures: stacked step-time bars per step, and one step's phases on a timeline.

matplotlib is an optional dependency (``pip install -e ".[plot]"``); figures are written whole or not
at all.
"""

from __future__ import annotations

import os

from megatron_lcr.profiling.plot import pyplot, save_figure
from megatron_lcr.profiling.report import phase_order


def _colors(phases: list[str]) -> dict[str, tuple]:
    plt = pyplot()
    palette = plt.get_cmap("tab20").colors
    colors = {p: palette[i % len(palette)] for i, p in enumerate(q for q in phases if q != "other")}
    colors["other"] = (0.6, 0.6, 0.6)
    return colors


def plot_step_breakdown(report: dict, out: str | os.PathLike):
    """One bar per step, stacked by phase (seconds); steps left out of the means hatched. Returns the figure."""
    plt = pyplot()
    steps = report["steps"]
    phases = phase_order({p for s in steps for p in s["phases"]})
    colors = _colors(phases)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(steps) + 3.0), 4.0))
    x = list(range(len(steps)))
    bottom = [0.0] * len(steps)
    for phase in phases:
        heights = [s["phases"].get(phase, 0.0) for s in steps]
        bars = ax.bar(x, heights, bottom=bottom, color=colors[phase], label=phase, width=0.7)
        for bar, step in zip(bars, steps):
            if not step["measured"]:
                bar.set_hatch("//")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(x, [f"{s['step']}{'*' if s['warmup'] else ''}{'t' if s['traced'] else ''}" for s in steps])
    ax.set_xlabel("step (* warm-up, t traced; hatched: not in the means)")
    ax.set_ylabel("seconds")
    ax.set_title("step time by phase", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[p], label=p) for p in phases]  # unhatched, whatever step 1 was
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_timeline(spans: dict, out: str | os.PathLike, gpu_samples: list[dict] = ()):
    """One step's phase spans (``{"step", "wall_start", "step_s", "spans": [[phase, start, end, depth]]}``),
    one row per phase, nested spans thinner; with NVML samples (``time``, ``index``, ``util_pct``) the
    GPUs' utilisation over the same seconds below. Returns the figure."""
    plt = pyplot()
    phases = phase_order({name for name, *_ in spans["spans"]})
    colors = _colors(phases)
    rows = 2 if gpu_samples else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9.0, 0.45 * len(phases) + 1.8 + 1.8 * (rows - 1)), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [max(len(phases), 1), 3][:rows]})
    ax = axes[0][0]
    for row, phase in enumerate(phases):
        for name, start, end, depth in spans["spans"]:
            if name == phase:
                height = 0.8 if depth == 0 else 0.5
                ax.broken_barh([(start, end - start)], (row - height / 2, height), color=colors[phase])
    ax.set_yticks(range(len(phases)), phases)
    ax.invert_yaxis()
    ax.set_xlim(0, spans["step_s"])
    ax.set_title(f"step {spans['step']}: {spans['step_s']:.3f} s", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if gpu_samples:
        gpu_ax = axes[1][0]
        for index in sorted({s["index"] for s in gpu_samples}):
            mine = sorted((s["time"] - spans["wall_start"], s["util_pct"]) for s in gpu_samples if s["index"] == index)
            gpu_ax.plot([t for t, _ in mine], [u for _, u in mine], marker=".", label=f"GPU {index}")
        gpu_ax.set_ylabel("GPU util %")
        gpu_ax.set_ylim(0, 105)
        gpu_ax.legend(fontsize=7)
        gpu_ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("seconds since the step began")
    fig.tight_layout()
    save_figure(fig, out)
    return fig
