"""``lcr data ...``: generate LongBlocks, build short/long contexts from QA datasets, print statistics.

Every command writes its output atomically (temporary file, then rename) and reports bad input as a
one-line :class:`~megatron_lcr.data.schema.DataError` naming the file and line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from megatron_lcr.data.schema import DataError, Document, Sample, iter_jsonl, read_samples, render_context, write_samples


def _counter(tokenizer_dir: str | None) -> Callable[[str], int]:
    from megatron_lcr.data.tokenizer import load_tokenizer, token_counter

    return token_counter(load_tokenizer(tokenizer_dir))


def longblocks(args: argparse.Namespace) -> None:
    from megatron_lcr.data.longblocks import LongBlocksConfig, generate

    cfg = LongBlocksConfig(
        num_samples=args.num, seed=args.seed, short_tokens=args.short_tokens, long_tokens=args.long_tokens,
        long_noise=args.long_noise, **({"families": tuple(args.families)} if args.families else {}),
    )
    samples = generate(cfg, _counter(args.tokenizer), progress=True)
    write_samples(args.out, samples)
    print(f"wrote {len(samples)} samples to {args.out}", file=sys.stderr)


def read_documents(path: str) -> list[Document]:
    """A distractor file: JSONL of ``{"title": ..., "text": ...}`` objects."""
    docs = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("title"), str) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with string fields 'title' and 'text'")
        docs.append(Document(title=record["title"], text=record["text"]))
    return docs


def contexts(args: argparse.Namespace) -> None:
    from megatron_lcr.data.contexts import ContextConfig, build_samples, distractor_pool
    from megatron_lcr.data.formats import load_qa

    records = load_qa(args.source, args.format)
    pool = distractor_pool(records, read_documents(args.distractors) if args.distractors else ())
    cfg = ContextConfig(short_tokens=args.short_tokens, long_tokens=args.long_tokens, seed=args.seed)
    samples = build_samples(records, pool, _counter(args.tokenizer), cfg, progress=True)
    write_samples(args.out, samples)
    print(f"wrote {len(samples)} samples to {args.out}", file=sys.stderr)


def context_lengths(samples: list[Sample], count_tokens: Callable[[str], int]) -> dict[str, list[int]]:
    """Token lengths of every sample's rendered short and long context (empty contexts skipped)."""
    lengths: dict[str, list[int]] = {"short": [], "long": []}
    for sample in samples:
        for kind, docs in (("short", sample.short_context), ("long", sample.long_context)):
            if docs:
                lengths[kind].append(count_tokens(render_context(docs)))
    return lengths


def stats_table(splits: dict[str, dict[str, list[int]]]) -> str:
    """A markdown table like the DePO paper's Table 1: examples, mean and max tokens per split and context."""
    rows = ["| split | context | examples | mean tokens | max tokens |", "| --- | --- | ---: | ---: | ---: |"]
    for split, kinds in splits.items():
        for kind, lengths in kinds.items():
            if lengths:
                rows.append(f"| {split} | {kind} | {len(lengths)} | {statistics.fmean(lengths):.0f} | {max(lengths)} |")
    return "\n".join(rows)


def stats(args: argparse.Namespace) -> None:
    count_tokens = _counter(args.tokenizer)
    splits = {Path(path).stem: context_lengths(read_samples(path), count_tokens) for path in args.files}
    print(stats_table(splits))


def add_parser(sub) -> None:
    """Register ``lcr data`` and its three commands on the top-level subparsers."""
    data = sub.add_parser("data", help="generate and inspect long-context datasets",
                          description="LongBlocks generation, short/long contexts from QA data, dataset statistics.")
    cmds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    tok_help = "tokenizer directory whose tokens budgets count (default: the tiny CPU tokenizer)"

    lb = cmds.add_parser("longblocks", help="generate a LongBlocks dataset (JSONL)",
                         description="Seeded synthetic multi-hop / grounding / long-form samples with short and long contexts.")
    lb.add_argument("--out", required=True, help="output JSONL file")
    lb.add_argument("--num", type=int, required=True, help="number of samples")
    lb.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    lb.add_argument("--short-tokens", type=int, default=1024, help="short-context budget in tokens (default 1024)")
    lb.add_argument("--long-tokens", type=int, default=8192, help="long-context budget in tokens (default 8192)")
    lb.add_argument("--long-noise", type=float, default=0.0,
                    help="share of the long context's extra documents that are filler-only noise instead of "
                         "distractors (0-1; 1: the long context differs from the short one in length alone)")
    lb.add_argument("--tokenizer", default=None, help=tok_help)
    lb.add_argument("--families", nargs="+", choices=["multihop", "grounding", "longform"], help="task families (default all)")
    lb.set_defaults(func=longblocks)

    ctx = cmds.add_parser("contexts", help="build short/long contexts from a QA dataset",
                          description="Turn MuSiQue / HotpotQA / 2Wiki / LongBench files into megatron_lcr samples.")
    ctx.add_argument("--source", required=True, help="dataset file in its original format")
    ctx.add_argument("--format", required=True, choices=["musique", "hotpotqa", "2wiki", "longbench", "lcr"])
    ctx.add_argument("--out", required=True, help="output JSONL file")
    ctx.add_argument("--short-tokens", type=int, default=1024, help="short-context budget in tokens (default 1024)")
    ctx.add_argument("--long-tokens", type=int, default=8192, help="long-context budget in tokens (default 8192)")
    ctx.add_argument("--distractors", default=None, help="extra distractor documents: JSONL of {title, text}")
    ctx.add_argument("--seed", type=int, default=0, help="seed of distractor choice and shuffling")
    ctx.add_argument("--tokenizer", default=None, help=tok_help)
    ctx.set_defaults(func=contexts)

    st = cmds.add_parser("stats", help="examples, mean and max context tokens per split",
                         description="A table like the DePO paper's Table 1, one row per file (split) and context kind.")
    st.add_argument("files", nargs="+", help="megatron_lcr JSONL files (the file name is the split)")
    st.add_argument("--tokenizer", default=None, help=tok_help)
    st.set_defaults(func=stats)
