"""Context-length buckets and the per-bucket, per-group means ``lcr eval`` reports.

Length buckets follow QAs-RULER's 4K / 8K / 16K / 32K settings. A prompt's length is the number of
token ids of the whole prompt (template, context and question) under the evaluated model's own
tokenizer, counted *before* middle truncation, so a sample stays in the bucket its data put it in
however small the model's window is. A prompt of ``n`` tokens is in the first bucket whose upper
edge is ``>= n``:

========  ==========================
bucket    prompt tokens ``n``
========  ==========================
4K        ``n <= 4096``
8K        ``4096 < n <= 8192``
16K       ``8192 < n <= 16384``
32K       ``16384 < n <= 32768``
>32K      ``n > 32768``
========  ==========================

Besides length, a prediction can carry groups of its benchmark: LongBench v2's own ``length``
(short / medium / long) and ``difficulty`` (easy / hard) fields, and for megatron_lcr samples the
``context`` it was prompted with (short / long). :func:`summarize` gives the mean score, mean EM,
count and truncation count of a set of predictions, overall and per length bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LENGTH_BUCKETS: tuple[tuple[int, str], ...] = ((4096, "4K"), (8192, "8K"), (16384, "16K"), (32768, "32K"))
"""``(upper edge in tokens, name)``, ascending; a bucket holds lengths above the previous edge up to its own."""
OVER_LAST = ">32K"
"""Prompts longer than the last edge."""
BUCKET_ORDER = tuple(name for _, name in LENGTH_BUCKETS) + (OVER_LAST,)


def describe_buckets() -> str:
    """The bucket rule in one line, as results.json states it."""
    lows = [0] + [edge for edge, _ in LENGTH_BUCKETS[:-1]]
    rules = [f"{name} {low}<n<={edge}" if low else f"{name} n<={edge}" for low, (edge, name) in zip(lows, LENGTH_BUCKETS)]
    return (f"prompt tokens n (model tokenizer, before truncation): {', '.join(rules)}, "
            f"{OVER_LAST} n>{LENGTH_BUCKETS[-1][0]}")


def length_bucket(tokens: int) -> str:
    """The bucket of a prompt of ``tokens`` tokens (see the module docstring for the edges)."""
    if tokens < 0:
        raise ValueError(f"a prompt length cannot be negative, got {tokens}")
    for edge, name in LENGTH_BUCKETS:
        if tokens <= edge:
            return name
    return OVER_LAST


@dataclass(kw_only=True)
class Scored:
    """One prompt's outcome, as aggregation needs it."""

    score: float
    """Mean metric over the prompt's k samples, in [0, 1] (avg@k; k = 1 for greedy)."""
    em: float
    """Mean exact match over the k samples, in [0, 1]."""
    bucket: str
    """Length bucket of the prompt."""
    truncated: bool
    """Whether the prompt was cut in the middle to fit the window."""
    groups: dict[str, str] = field(default_factory=dict)
    """Benchmark groups of the prompt, e.g. ``{"context": "long"}``."""


def _stats(rows: Sequence[Scored]) -> dict:
    n = len(rows)
    return {"n": n, "score": 100.0 * sum(r.score for r in rows) / n, "em": 100.0 * sum(r.em for r in rows) / n,
            "truncated": sum(r.truncated for r in rows)}


def summarize(rows: Sequence[Scored]) -> dict:
    """``{"n", "score", "em", "truncated", "by_length": {bucket: {"n", "score", "em", "truncated"}}}``.

    ``score`` and ``em`` are percentages, means over prompts (each prompt already averaged over its
    samples); ``by_length`` lists the buckets that hold at least one prompt, shortest first.
    """
    if not rows:
        raise ValueError("nothing to summarize: no scored prompts")
    by_length = {name: _stats(members) for name in BUCKET_ORDER if (members := [r for r in rows if r.bucket == name])}
    return {**_stats(rows), "by_length": by_length}


def summarize_groups(rows: Sequence[Scored]) -> dict[str, dict[str, dict]]:
    """``{group: {value: summarize(prompts with that value)}}`` for every group any prompt has."""
    keys = dict.fromkeys(key for r in rows for key in r.groups)  # in order of first appearance
    out: dict[str, dict[str, dict]] = {}
    for key in keys:
        values = _ordered(r.groups[key] for r in rows if key in r.groups)
        out[key] = {value: summarize([r for r in rows if r.groups.get(key) == value]) for value in values}
    return out


_KNOWN_ORDER = ("short", "medium", "long", "easy", "hard")


def _ordered(values: Iterable[str]) -> list[str]:
    """Distinct values, the known ones (short < medium < long, easy < hard) first in that order."""
    distinct = set(values)
    return [v for v in _KNOWN_ORDER if v in distinct] + sorted(distinct - set(_KNOWN_ORDER))
