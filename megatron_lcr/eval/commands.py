"""``lcr eval --model DIR --data FILE [FILE ...] --out DIR``: the command line of ``eval.run``."""

from __future__ import annotations

import argparse
import dataclasses

from megatron_lcr.eval.formats import FORMATS
from megatron_lcr.eval.metrics import METRICS


def config_from_args(args: argparse.Namespace):
    """The :class:`~megatron_lcr.eval.config.EvalRunConfig` the arguments describe (validated)."""
    from megatron_lcr.data.prompts import PromptConfig
    from megatron_lcr.eval.config import EvalRunConfig
    from megatron_lcr.rollout.sglang import SGLangLaunchConfig, cpu_reference_launch

    if args.engine == "reference":  # lcr serve in float32 on free ports
        server = dataclasses.replace(cpu_reference_launch(), api_key=args.api_key, num_servers=args.num_servers,
                                     tp_size=args.tp_size)
    else:
        server = SGLangLaunchConfig(backend=args.engine, device=args.device, num_servers=args.num_servers,
                                    tp_size=args.tp_size, base_port=0, api_key=args.api_key)
    prompt = PromptConfig(use_chat_template=args.chat_template, system_prompt=args.system_prompt,
                          **({"instruction": args.instruction} if args.instruction else {}))
    return EvalRunConfig(
        model=args.model, data=list(args.data), out=args.out, format=args.format, metric=args.metric,
        limit=args.limit, contexts=tuple(args.contexts), temperature=args.temperature, samples=args.samples,
        seed=args.seed, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        prompt=prompt, server=server, urls=list(args.urls or []), max_concurrency=args.max_concurrency,
        predictions=args.predictions, overwrite=args.overwrite)


def evaluate(args: argparse.Namespace) -> None:
    from megatron_lcr.eval.run import run_eval

    run_eval(config_from_args(args))


def add_parser(sub) -> None:
    """Register ``lcr eval`` on the top-level subparsers."""
    ev = sub.add_parser(
        "eval", help="score a model or checkpoint on long-context benchmarks, per context-length bucket",
        description="Greedy (or --temperature/--samples: avg@k) answers from rollout servers (lcr serve by default, "
                    "SGLang, vLLM, or --urls), scored per dataset (F1 for QA, EM, numeric accuracy, ROUGE-L, "
                    "multiple-choice accuracy) and per prompt-length bucket (4K/8K/16K/32K), LongBench v2 group and "
                    "short/long context. Writes results.json, results.md, predictions.jsonl, by_length.png.")
    ev.add_argument("--model", required=True, help="Hugging Face model directory or megatron_lcr checkpoint")
    ev.add_argument("--data", required=True, nargs="+", metavar="FILE",
                    help="benchmark files: LongBench v1 JSONL, LongBench v2 JSON, RULER qa JSONL, DocMath-Eval JSON, "
                         "Frames TSV, megatron_lcr JSONL")
    ev.add_argument("--out", required=True, help="output directory (must be new or empty, unless --overwrite)")
    ev.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                    help="format of every file (default: detected per file)")
    ev.add_argument("--metric", default=None, choices=list(METRICS), help="score every record with this metric "
                                                                         "(default: each format's own)")
    ev.add_argument("--limit", type=int, default=0, help="only the first N records of each file (default: all)")
    ev.add_argument("--contexts", nargs="+", default=["short", "long"], choices=["short", "long"],
                    help="contexts of megatron_lcr samples to prompt with (default: both)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ev.add_argument("--samples", type=int, default=1, help="responses per prompt, scores averaged (avg@k; default 1)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest response in tokens (default 256)")
    ev.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="cut longer prompts in the middle (default: max_position_embeddings - max_new_tokens)")
    ev.add_argument("--engine", default="reference", choices=["reference", "sglang", "vllm"],
                    help="servers to launch: reference = lcr serve on CPU (default), sglang, vllm")
    ev.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="device of sglang/vllm servers")
    ev.add_argument("--num-servers", type=int, default=1, help="servers to launch (default 1)")
    ev.add_argument("--tp-size", type=int, default=1, help="GPUs per sglang/vllm server (default 1)")
    ev.add_argument("--urls", nargs="+", default=None, metavar="URL", help="use these running servers; launch none")
    ev.add_argument("--api-key", default=None, help="servers' API key (sent as 'Authorization: Bearer KEY')")
    ev.add_argument("--max-concurrency", type=int, default=64, help="requests in flight per server (default 64)")
    ev.add_argument("--predictions", default=None, metavar="FILE",
                    help="rescore an earlier run's predictions.jsonl instead of generating (no servers)")
    ev.add_argument("--chat-template", default="auto", choices=["auto", "always", "never"],
                    help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    ev.add_argument("--instruction", default=None,
                    help="task instruction of every prompt, as the model was trained with (prompt.instruction of its "
                         "lcr train/sft config; default: the default template's)")
    ev.add_argument("--system-prompt", default=None, help="system message of every prompt (default: none)")
    ev.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ev.set_defaults(func=evaluate)
