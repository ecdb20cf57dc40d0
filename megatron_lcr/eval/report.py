"""``lcr eval``'s outputs: the results table (stdout and results.md), results.json, predictions.jsonl
and by_length.png (one group of bars per length bucket, one bar per dataset).

One table row per dataset and per subset of it: ``all``, then one row per value of each of its groups
(``context=short``, ``length=medium``, ...). Columns: metric, prompts, mean score and mean EM (percent;
avg@k over the k samples of each prompt), then the score in every length bucket present with its
prompt count, and how many prompts were cut to fit the window.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.eval.buckets import BUCKET_ORDER


def _buckets_present(results: dict) -> list[str]:
    present = {b for d in results["datasets"].values() for b in d["by_length"]}
    return [b for b in BUCKET_ORDER if b in present]


def _subsets(dataset: dict) -> list[tuple[str, dict]]:
    rows = [("all", dataset)]
    for group, values in dataset["groups"].items():
        rows += [(f"{group}={value}", stats) for value, stats in values.items()]
    return rows


def results_table(results: dict) -> str:
    """The markdown table of ``results`` (see the module docstring)."""
    buckets = _buckets_present(results)
    k = results["decoding"]["samples"]
    what = "greedy" if results["decoding"]["temperature"] == 0 else f"avg@{k}, T={results['decoding']['temperature']}"
    header = ["dataset", "subset", "metric", "n", "score", "EM", *buckets, "truncated"]
    lines = [f"lcr eval: {results['model']} ({what}; scores in %, bucket cells 'score (n)'; "
             f"prompts cut to {results['max_prompt_tokens']} tokens)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * 3 + [" ---: "] * (len(header) - 3)) + "|"]
    for name, dataset in results["datasets"].items():
        for subset, stats in _subsets(dataset):
            cells = [f"{stats['by_length'][b]['score']:.1f} ({stats['by_length'][b]['n']})"
                     if b in stats["by_length"] else "-" for b in buckets]
            lines.append("| " + " | ".join([name, subset, dataset["metric"], str(stats["n"]), f"{stats['score']:.1f}",
                                            f"{stats['em']:.1f}", *cells, str(stats["truncated"])]) + " |")
    return "\n".join(lines)


def plot_by_length(results: dict, out: Path) -> None:
    """``out`` (PNG): per length bucket, one bar per dataset (its overall score in that bucket)."""
    from megatron_lcr.profiling.plot import pyplot, save_figure

    plt = pyplot()
    buckets = _buckets_present(results)
    names = list(results["datasets"])
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(3.0 + 1.5 * len(buckets) * max(1, len(names)) ** 0.5, 3.6))
    for i, name in enumerate(names):
        by_length = results["datasets"][name]["by_length"]
        xs = [j + (i - (len(names) - 1) / 2) * width for j, b in enumerate(buckets) if b in by_length]
        ys = [by_length[b]["score"] for b in buckets if b in by_length]
        bars = ax.bar(xs, ys, width=width, label=f"{name} ({results['datasets'][name]['metric']})")
        ax.bar_label(bars, labels=[str(by_length[b]["n"]) for b in buckets if b in by_length], fontsize=7)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel("prompt length (tokens, model tokenizer)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("score by context length (bar labels: prompts)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay visible
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)


def write_outputs(out: Path, results: dict, predictions: list[dict]) -> None:
    """results.json, results.md, predictions.jsonl and (with matplotlib) by_length.png in ``out``."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_table(results) + "\n")
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('lcr eval: matplotlib is not installed, so no by_length.png (pip install -e ".[plot]")', file=sys.stderr)
        return
    plot_by_length(results, out / "by_length.png")
