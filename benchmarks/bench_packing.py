"""Token balance of ``pack_sequences`` across data-parallel ranks, against round-robin assignment.

For each length distribution and rank count: the max/min ratio of per-rank token totals (mean and
worst over seeds) for LPT packing and for round-robin, a lower bound no assignment can beat, the
micro-batches per rank, and the packing time. Prints a markdown table and writes it, with the
machine, to ``benchmarks/results/packing_balance.md``.

    python benchmarks/bench_packing.py [--seeds 20] [--sequences 512] [--token-budget 16384]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np

from megatron_lcr.data.packing import balance_ratio, pack_sequences, rank_tokens

DISTRIBUTIONS = {
    "uniform [64, 8192]": lambda rng, n, budget: rng.integers(64, 8193, n),
    "log-normal (median 1024, sigma 1)": lambda rng, n, budget: np.exp(rng.normal(np.log(1024), 1.0, n)),
    "Zipf (64 x zipf(a=1.5))": lambda rng, n, budget: 64 * rng.zipf(1.5, n),
}
RANKS = (2, 8, 64)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "packing_balance.md")


def round_robin_ratio(lengths: list[int], num_ranks: int) -> float:
    totals = [0] * num_ranks
    for i, length in enumerate(lengths):
        totals[i % num_ranks] += length
    return balance_ratio(totals)


def ratio_lower_bound(lengths: list[int], num_ranks: int) -> float:
    """max/min >= max(longest, mean) / min_j (total - j longest) / (R - j).

    The max rank holds at least the longest sequence and at least the mean; the ranks holding none
    of the j longest sequences (at least R - j of them) share the rest, so the min is at most
    their average.
    """
    desc = sorted(lengths, reverse=True)
    total = sum(desc)
    prefix = np.concatenate([[0], np.cumsum(desc[: num_ranks - 1])])
    min_upper = min((total - prefix[j]) / (num_ranks - j) for j in range(len(prefix)))
    return max(desc[0], total / num_ranks) / min_upper


def machine_info() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"- Python {sys.version.split()[0]} ({platform.python_implementation()}), numpy {np.__version__}",
        f"- CPU: {cpu} ({os.cpu_count()} logical cores); {platform.platform()}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def run(seeds: int, sequences: int, token_budget: int) -> list[str]:
    header = (
        "| distribution | ranks | LPT max/min (mean / worst) | round-robin (mean / worst) "
        "| lower bound (worst seed) | micro-batches per rank | pack time (ms, median) |"
    )
    rows = [header, "|" + "---|" * 7]
    for name, draw in DISTRIBUTIONS.items():
        for num_ranks in RANKS:
            lpt, naive, bound, counts, times = [], [], [], [], []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                raw = draw(rng, sequences, token_budget)
                lengths = [int(x) for x in np.clip(np.rint(raw), 1, token_budget)]
                start = time.perf_counter()
                plan = pack_sequences(lengths, token_budget=token_budget, num_ranks=num_ranks, allow_empty=True)
                times.append((time.perf_counter() - start) * 1e3)
                lpt.append(balance_ratio(rank_tokens(plan, lengths)))
                naive.append(round_robin_ratio(lengths, num_ranks))
                bound.append(ratio_lower_bound(lengths, num_ranks))
                counts.append(len(plan[0]))
            worst = max(range(seeds), key=lambda s: lpt[s])
            rows.append(
                f"| {name} | {num_ranks} | {statistics.mean(lpt):.4f} / {max(lpt):.4f} "
                f"| {statistics.mean(naive):.3f} / {max(naive):.3f} | {bound[worst]:.4f} "
                f"| {min(counts)}-{max(counts)} | {statistics.median(times):.2f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    rows = run(args.seeds, args.sequences, args.token_budget)
    text = "\n".join([
        "# Packing balance across data-parallel ranks",
        "",
        f"`python benchmarks/bench_packing.py` — {args.sequences} sequences per step, token budget "
        f"{args.token_budget} per micro-batch, lengths clipped to [1, budget], {args.seeds} seeds each.",
        "LPT = `pack_sequences` (longest-processing-time-first onto the least-loaded rank). Ratio = max/min",
        "of per-rank token totals. The lower bound holds for any assignment of these lengths (see",
        "`ratio_lower_bound`); it is shown for the seed where LPT was worst.",
        "",
        *machine_info(),
        "",
        *rows,
        "",
    ])
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
