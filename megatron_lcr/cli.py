"""The ``lcr`` command.

Subcommands (each has its own ``--help``):

  lcr train CONFIG --out DIR [key=value ...]   RL / DePO on Megatron with rollout servers (every rank runs this)
  lcr sft CONFIG --out DIR [key=value ...]     supervised fine-tuning on chosen answers; exports hf/
  lcr pretrain CONFIG --out DIR [...]          next-token training on synthetic sequences (stack smoke test)
  lcr pipeline CONFIG --out DIR [key=value ...]  the sparse-to-dense workflow: teacher RL, forward-KL warmup,
                                               OPD, student RL, as one resumable run of lcr train stages
  lcr convert hf-to-megatron --hf DIR --out DIR --tp N --pp N
  lcr convert megatron-to-hf --ckpt DIR --out DIR
  lcr config CONFIG [--kind K] [key=value ...] print the resolved config (or every key with --keys)
  lcr data longblocks --out FILE --num N [--seed S --short-tokens A --long-tokens B --long-noise P ...]
  lcr data contexts --source FILE --format musique|hotpotqa|2wiki|longbench|lcr --out FILE [...]
  lcr data stats FILE [FILE ...]
  lcr serve --model DIR --port P [--host H --api-key KEY ...]   CPU rollout server speaking SGLang's HTTP API
  lcr plot RUN [RUN ...] --out FILE [--metrics KEY ...]        training curves of runs side by side
  lcr profile CONFIG --steps N --out DIR [...]  step-time breakdown, tokens/s, FLOPs, MFU, GPU use (NVML)
  lcr eval --model DIR --data FILE [FILE ...] --out DIR          benchmark scores per dataset and context-length bucket
  lcr launch slurm CONFIG --out DIR [--nodes N --gpus-per-node G --rollout-nodes K ...] [--dry-run] [key=value ...]
                                               check, write and submit a SLURM job (requeues itself on preemption)

Errors in the input (config keys, model directories, checkpoints, layouts) end the command with one
line on stderr naming the file or key, and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from megatron_lcr import __version__


def config_class(command: str):
    """The run config of ``lcr train`` / ``sft`` / ``pretrain``."""
    if command == "sft":
        from megatron_lcr.train.sft.run import SFTRunConfig

        return SFTRunConfig
    if command == "pretrain":
        from megatron_lcr.train.pretrain.config import LMRunConfig

        return LMRunConfig
    if command == "pipeline":
        from megatron_lcr.pipeline.config import PipelineConfig

        return PipelineConfig
    from megatron_lcr.train.rl.config import RLRunConfig

    return RLRunConfig


def _run(args: argparse.Namespace) -> None:
    import json

    from megatron_lcr.config import load_config
    from megatron_lcr.startup import announce_backend, is_global_rank_zero, quiet_known_warnings

    quiet_known_warnings()  # before anything imports Megatron, which warns on import
    cfg = load_config(config_class(args.command), args.config, args.overrides)
    if args.command == "pipeline":
        from megatron_lcr.pipeline.run import run_pipeline

        run_pipeline(cfg, args.out)  # prints its table; each stage prints its own results
        return
    announce_backend(cfg.model)
    if args.command == "sft":
        from megatron_lcr.train.sft.run import run_sft as run
    elif args.command == "pretrain":
        from megatron_lcr.train.pretrain.run import run_lm_training as run
    else:
        from megatron_lcr.train.rl.run import run_rl as run
    results = run(cfg, args.out)
    if is_global_rank_zero():
        print(json.dumps(results, indent=2))


def _config(args: argparse.Namespace) -> None:
    import yaml

    from megatron_lcr.config import config_help, load_config, to_dict

    cls = config_class(args.kind)
    if args.keys:
        print(config_help(cls))
        return
    if not args.config:
        raise ValueError("lcr config needs a CONFIG file (or --keys)")
    cfg = load_config(cls, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _hf_to_megatron(args: argparse.Namespace) -> None:
    from megatron_lcr.models.convert import hf_to_megatron

    meta = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta.architecture}, TP={meta.tensor_model_parallel_size} "
          f"PP={meta.pipeline_model_parallel_size}, {meta.params_dtype}")


def _megatron_to_hf(args: argparse.Namespace) -> None:
    from megatron_lcr.models.convert import megatron_to_hf

    megatron_to_hf(args.ckpt, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    print(f"wrote {args.out}")


def _serve(args: argparse.Namespace) -> None:
    from megatron_lcr.rollout.reference.server import ServeConfig, serve

    serve(ServeConfig(model=args.model, port=args.port, host=args.host, api_key=args.api_key,
                      dtype=args.dtype, seed=args.seed, max_batch=args.max_batch))


def _rollout_servers(args: argparse.Namespace) -> None:
    from megatron_lcr.config import load_config
    from megatron_lcr.rollout.node import node_server_config, run_rollout_node
    from megatron_lcr.train.rl.config import RLRunConfig

    cfg = load_config(RLRunConfig, args.config, args.overrides)
    server = node_server_config(cfg.rollout.server, model_path=cfg.model.hf_path, host=args.host, log_dir=args.log_dir)
    run_rollout_node(server, urls_file=args.urls_file, advertise=args.advertise)


def _plot(args: argparse.Namespace) -> None:
    from megatron_lcr.profiling.plot import DEFAULT_METRICS, plot_runs

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError('lcr plot needs matplotlib: pip install -e ".[plot]"') from None
    plot_runs(args.runs, args.out, tuple(args.metrics or DEFAULT_METRICS))
    print(f"wrote {args.out}")


def _add_convert_parser(sub) -> None:
    """``lcr convert hf-to-megatron | megatron-to-hf``."""
    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron",
                             description="Checkpoint conversion; both directions stream tensor by tensor.")
    direction = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2m = direction.add_parser("hf-to-megatron", help="Hugging Face directory -> Megatron distributed checkpoint",
                               description="Write a Megatron dist checkpoint (loads at any TP/PP) from a HF model, "
                                           "one tensor at a time in this process.")
    h2m.add_argument("--hf", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory (must not exist, unless --overwrite)")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write at (default 1)")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write at (default 1)")
    h2m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="stored dtype; auto keeps the HF checkpoint's (default)")
    h2m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    h2m.set_defaults(func=_hf_to_megatron)
    m2h = direction.add_parser("megatron-to-hf", help="Megatron checkpoint -> Hugging Face directory",
                               description="Write sharded safetensors + index, config.json and tokenizer files, "
                                           "one tensor at a time (reads a checkpoint saved at any TP/PP).")
    m2h.add_argument("--ckpt", required=True, help="megatron_lcr checkpoint directory (converted or checkpoints/iter_N)")
    m2h.add_argument("--out", required=True, help="output Hugging Face directory")
    m2h.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB (default 5)")
    m2h.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m2h.set_defaults(func=_megatron_to_hf)


def _add_serve_parser(sub) -> None:
    """``lcr serve`` (the CPU reference rollout server)."""
    serve = sub.add_parser("serve", help="serve a HF model over SGLang's HTTP API on CPU (rollouts, weight sync)",
                           description="A CPU reference rollout server speaking SGLang's native HTTP API "
                                       "(/generate, weight updates, pause/abort). Prints 'lcr serve: ready on URL' "
                                       "to stderr when listening; stops on SIGINT/SIGTERM.")
    serve.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    serve.add_argument("--port", type=int, required=True, help="TCP port (0: the OS picks one; see the ready line)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health*")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="parameter dtype (default float32)")
    serve.add_argument("--seed", type=int, default=0, help="seeds requests without sampling_seed, with their rid (default 0)")
    serve.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together (default 64)")
    serve.set_defaults(func=_serve)


def _add_rollout_servers_parser(sub) -> None:
    """``lcr rollout-servers`` (a run's engines on a rollout node of their own)."""
    node = sub.add_parser("rollout-servers", help="start a run config's rollout servers on this node (rollout nodes)",
                          description="Launch the rollout.server section of an lcr train CONFIG here, write the "
                                      "servers' URLs to --urls-file once all are ready, restart any that dies, stop "
                                      "them on SIGTERM/SIGINT. The trainer gets the URLs as rollout.urls.")
    node.add_argument("config", help="lcr train YAML config")
    node.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for lcr train")
    node.add_argument("--host", default="0.0.0.0", help="address the servers bind (default 0.0.0.0: reachable "
                                                         "from the trainer's nodes)")
    node.add_argument("--advertise", default="", help="host name in the written URLs (default: this node's name)")
    node.add_argument("--urls-file", default=None, help="file to write the URLs to, one per line")
    node.add_argument("--log-dir", default="rollout_logs", help="directory of the servers' logs (default rollout_logs)")
    node.set_defaults(func=_rollout_servers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcr", description="megatron_lcr: long-context reasoning post-training on Megatron-Core."
    )
    parser.add_argument("--version", action="version", version=f"megatron_lcr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    runs = (
        ("train", "RL (GRPO/DAPO/GSPO/CISPO), DePO / DePO-IW, on-policy distillation, dGRPO or forward-KL "
         "warmup, rollouts from SGLang, vLLM or lcr serve",
         "examples/tiny/depo.yaml", "checkpoints/, metrics.jsonl, tensorboard/, results.json"),
        ("sft", "supervised fine-tuning on chosen answers (SFT baseline; makes the tiny base model)",
         "examples/tiny/sft_base.yaml", "checkpoints/, metrics.jsonl, hf/, results.json"),
        ("pretrain", "next-token training on synthetic sequences (a smoke test of the Megatron stack)",
         "examples/tiny/train_lm.yaml", "checkpoints/, metrics.jsonl, results.json"),
        ("pipeline", "the sparse-to-dense workflow (teacher RL, forward-KL warmup, OPD, student RL) as one "
         "resumable run of lcr train stages; rerun to resume", "examples/tiny/sparse_to_dense.yaml",
         "one lcr train run per stage, pipeline_state.json, results.json, results.md"),
    )
    for name, summary, example, outputs in runs:
        run = sub.add_parser(name, help=summary,
                             description=f"{summary}. " + ("Run it once; it launches the stages (pipeline.launcher)."
                                                           if name == "pipeline" else
                                                           "Under torchrun or srun every rank runs this command."))
        run.add_argument("config", help=f"YAML config (e.g. {example})")
        run.add_argument("--out", required=True, help=f"output directory: config.yaml, {outputs}")
        run.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides, e.g. optimizer.lr=1e-6 parallel.tp=2")
        run.set_defaults(func=_run)

    config = sub.add_parser("config", help="print a resolved config, or every config key",
                            description="Resolve CONFIG with overrides and print it as YAML, or list every key with --keys.")
    config.add_argument("config", nargs="?", help="YAML config")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    config.add_argument("--keys", action="store_true", help="list every key with its type, default and meaning")
    config.add_argument("--kind", choices=("train", "sft", "pretrain", "pipeline"), default="train",
                        help="which command's config (default: train)")
    config.set_defaults(func=_config)

    _add_convert_parser(sub)
    _add_serve_parser(sub)
    _add_rollout_servers_parser(sub)

    plot = sub.add_parser("plot", help="training curves of one or more runs, side by side",
                          description="One panel per metric, one line per run, from each run's metrics.jsonl; "
                                      "the format follows --out's suffix (.png, .svg, .pdf). Needs matplotlib.")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="output directories of lcr train/sft/pretrain")
    plot.add_argument("--out", required=True, help="image file to write")
    plot.add_argument("--metrics", nargs="+", metavar="KEY",
                      help="metrics.jsonl keys, one panel each (default: eval/short_em eval/long_em "
                           "rollout/reward_mean depo/kd_loss time/step_s)")
    plot.set_defaults(func=_plot)

    from megatron_lcr.data.commands import add_parser as add_data_parser

    add_data_parser(sub)
    from megatron_lcr.profiling.commands import add_parser as add_profile_parser

    add_profile_parser(sub)
    from megatron_lcr.eval.commands import add_parser as add_eval_parser

    add_eval_parser(sub)
    from megatron_lcr.launch.commands import add_parser as add_launch_parser

    add_launch_parser(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """A worker's exception arrives wrapped with its traceback; keep only the final message."""
    text = str(err).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a '*' positional at the first option, so overrides that follow an
    # option (`lcr train CFG --out DIR a.b=1`) arrive here; anything else is a real error.
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("lcr: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns errors into exit codes
        if os.environ.get("LCR_TRACEBACK"):
            traceback.print_exc()
        print(f"lcr: error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
