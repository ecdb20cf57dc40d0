"""``lcr profile CONFIG --steps N --out DIR``: run N steps of a run config and report where the time goes.

The run is the real one: ``lcr train`` (or ``sft`` / ``pretrain``, ``--kind``) in a child process,
through ``--launcher`` (e.g. ``torchrun --nproc_per_node=8``; default: this Python, one process), with
``trainer.steps=N`` and ``LCR_PROFILE`` asking its step timers for per-step phase spans and, for
``--trace-steps``, torch profiler traces. Meanwhile this process samples the node's GPUs through NVML.
Then it writes into DIR, next to the run's own outputs:

- ``profile.json`` and ``profile.md``: the step-time breakdown (mean seconds per phase and share of the
  step), tokens per second, model FLOPs per token, MFU, GPU utilisation / memory / power;
- ``step_breakdown.png`` (stacked phase bars per step) and ``timeline.png`` (the median measured step's
  phases against time, with GPU utilisation when NVML is there); needs matplotlib;
- ``profile_spans.jsonl``, ``nvml_samples.jsonl`` (the raw data) and ``traces/step<N>.rank<R>.json``.

What each command reports: ``train`` every phase of an RL step (generation, reward, old / ref log-probs,
teacher, forward/backward, optimizer, sync, eval, checkpoint, other), prompt and response tokens per
second, trained tokens per second and MFU; ``sft`` and ``pretrain`` forward/backward, optimizer,
checkpoint and other, trained tokens per second and MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("train", "sft", "pretrain")


def add_parser(sub) -> None:
    """``lcr profile``."""
    prof = sub.add_parser("profile", help="run N steps of a run config and report the step-time breakdown, "
                                           "tokens/s, FLOPs, MFU and GPU use",
                          description="Runs N steps of lcr train (or sft / pretrain: --kind) into DIR, then writes "
                                      "DIR/profile.json, profile.md, step_breakdown.png and timeline.png: seconds per "
                                      "phase, tokens per second, model FLOPs per token, MFU, and GPU utilisation, "
                                      "memory and power sampled through NVML (without NVIDIA GPUs: one line saying so).")
    prof.add_argument("config", help="YAML run config (e.g. examples/tiny/depo.yaml)")
    prof.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for the run command")
    prof.add_argument("--steps", type=int, required=True, help="training steps to run (sets trainer.steps)")
    prof.add_argument("--out", required=True, help="new or empty output directory (the run's outputs and the report)")
    prof.add_argument("--kind", choices=KINDS, default="train", help="which command CONFIG is for (default: train)")
    prof.add_argument("--launcher", default="", help='command that starts the run, e.g. "torchrun --nproc_per_node=8" '
                                                      "(default: this Python, one process)")
    prof.add_argument("--warmup", type=int, default=None,
                      help="first steps left out of the means (default: 1 when --steps > 1, else 0)")
    prof.add_argument("--peak-tflops", type=float, default=None,
                      help="peak dense TFLOP/s per GPU for MFU (default: from the GPU model's datasheet figure)")
    prof.add_argument("--trace-steps", default="", metavar="N,M", help="steps to record a torch profiler trace of")
    prof.add_argument("--nvml-interval", type=float, default=0.5, help="seconds between NVML samples (default 0.5)")
    prof.set_defaults(func=profile_command)


def _trace_steps(text: str, steps: int, warmup: int) -> tuple[int, ...]:
    try:
        chosen = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--trace-steps {text!r}: expected comma-separated step numbers, e.g. 2,3") from None
    if any(not 1 <= s <= steps for s in chosen):
        raise ValueError(f"--trace-steps {text!r}: steps must be between 1 and --steps ({steps})")
    if not set(range(warmup + 1, steps + 1)) - set(chosen):
        raise ValueError(f"--trace-steps {text!r} traces every step after the {warmup} warm-up step(s): none would "
                         "be left to measure (traced steps run slower); add steps or trace fewer")
    return tuple(chosen)


def _check_args(args: argparse.Namespace) -> int:
    """Validate the options; returns the warm-up step count."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    warmup = (1 if args.steps > 1 else 0) if args.warmup is None else args.warmup
    if not 0 <= warmup < args.steps:
        raise ValueError(f"--warmup {warmup} must be >= 0 and below --steps ({args.steps})")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if any(o.split("=", 1)[0] == "trainer.steps" for o in args.overrides):
        raise ValueError("set the number of steps with --steps, not trainer.steps=")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: lcr profile needs a fresh run directory "
                              "(a run there would resume from its checkpoints)")
    return warmup


def _model(args: argparse.Namespace):
    """The validated run config, its model's dims and the peak-FLOP/s precision of its matmuls."""
    from megatron_lcr.cli import config_class
    from megatron_lcr.config import load_config
    from megatron_lcr.models.families import hf_arch
    from megatron_lcr.models.hf_checkpoint import load_hf_config
    from megatron_lcr.models.megatron_checkpoint import config_dir
    from megatron_lcr.profiling.flops import TransformerDims
    from megatron_lcr.profiling.peak import precision_of

    cfg = load_config(config_class(args.kind), args.config, [*args.overrides, f"trainer.steps={args.steps}"])
    arch = hf_arch(load_hf_config(config_dir(cfg.model.hf_path, cfg.trainer.load)))
    return TransformerDims.from_arch(arch), precision_of(cfg.model.params_dtype, cfg.model.fp8)


def _command_line(args: argparse.Namespace) -> str:
    """The ``lcr profile`` command that made the report (options as given, defaults left out)."""
    words = ["lcr", "profile", args.config, *args.overrides, "--steps", str(args.steps), "--out", args.out]
    for option, value, default in (("--kind", args.kind, "train"), ("--launcher", args.launcher, ""),
                                   ("--warmup", args.warmup, None), ("--peak-tflops", args.peak_tflops, None),
                                   ("--trace-steps", args.trace_steps, ""), ("--nvml-interval", args.nvml_interval, 0.5)):
        if value != default:
            words += [option, str(value)]
    return shlex.join(words)


def _run_child(args: argparse.Namespace, out: Path, request) -> tuple[int, float, list[str]]:
    """The run, as the user would start it; its stdout goes to our stderr (ours carries the report)."""
    import megatron_lcr
    from megatron_lcr.profiling.timers import PROFILE_ENV

    command = [*(shlex.split(args.launcher) or [sys.executable]), "-m", "megatron_lcr.cli", args.kind, args.config,
               *args.overrides, f"trainer.steps={args.steps}", "--out", str(out)]
    root = str(Path(megatron_lcr.__file__).resolve().parents[1])  # a checkout run without installing
    env = {**os.environ, PROFILE_ENV: request.to_env(),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    print(f"lcr profile: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    child = subprocess.Popen(command, env=env, stdout=sys.stderr.fileno())
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        raise
    return code, time.monotonic() - started, command


def _spans(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return {line["step"]: line for line in map(json.loads, path.read_text().splitlines())}


def _peak(override: float | None, gpus: list, precision: str, unavailable: str | None):
    """``((TFLOPS, source) or None, why there is none)``."""
    from megatron_lcr.profiling.peak import peak_tflops

    if override is not None:
        return (override, "--peak-tflops"), ""
    if not gpus:
        return None, f"no NVIDIA GPU to look up a peak for ({unavailable or 'NVML sees no GPU'}); pass --peak-tflops"
    found = peak_tflops(gpus[0].name, precision)
    return found, "" if found else f"'{gpus[0].name}' has no {precision} peak in the table; pass --peak-tflops"


def _write_outputs(out: Path, report: dict, spans: dict[int, dict], sampler) -> list[str]:
    """profile.json, profile.md, nvml_samples.jsonl and the two figures; returns notes on what was skipped."""
    from megatron_lcr.atomic import atomic_write_text
    from megatron_lcr.profiling.report import render_markdown

    atomic_write_text(out / "profile.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "profile.md", render_markdown(report))
    samples = sampler.to_json()["samples"]
    if samples:
        atomic_write_text(out / "nvml_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ['figures skipped: matplotlib is not installed (pip install -e ".[plot]")']
    from megatron_lcr.profiling.profile_plots import plot_step_breakdown, plot_timeline

    plot_step_breakdown(report, out / "step_breakdown.png")
    measured = [s for s in report["steps"] if s["measured"] and s["step"] in spans]
    if not measured:
        return ["timeline skipped: the run wrote no phase spans"]
    median = statistics.median_low(s["step_s"] for s in measured)
    chosen = spans[next(s["step"] for s in measured if s["step_s"] == median)]
    window = (chosen["wall_start"], chosen["wall_start"] + chosen["step_s"])
    plot_timeline(chosen, out / "timeline.png", [s for s in samples if window[0] <= s["time"] <= window[1]])
    return []


def profile_command(args: argparse.Namespace) -> None:
    from megatron_lcr.profiling.nvml import GpuSampler, summarise
    from megatron_lcr.profiling.plot import read_metrics
    from megatron_lcr.profiling.report import build_report
    from megatron_lcr.profiling.timers import ProfileRequest

    load_at_start = os.getloadavg()[0]  # other work on the machine skews every timing: the report says how much
    warmup = _check_args(args)
    trace_steps = _trace_steps(args.trace_steps, args.steps, warmup)
    dims, precision = _model(args)  # a bad config fails here, before anything runs or is written
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    request = ProfileRequest(spans=str(out / "profile_spans.jsonl"), trace_steps=trace_steps,
                             trace_dir=str(out / "traces") if trace_steps else None)
    with GpuSampler(args.nvml_interval) as sampler:
        print(sampler.status_line(), file=sys.stderr, flush=True)
        code, wall_s, command = _run_child(args, out, request)
    if code:
        raise RuntimeError(f"the lcr {args.kind} run failed (exit status {code}; its output is above): no report")
    spans = _spans(out / "profile_spans.jsonl")
    measured = [spans[s] for s in sorted(spans)[warmup:] if s not in trace_steps]  # GPU readings of these steps
    windows = [(s["wall_start"], s["wall_start"] + s["step_s"]) for s in measured] if measured else None
    peak, why_no_peak = _peak(args.peak_tflops, sampler.gpus, precision, sampler.unavailable)
    nvml = {"available": sampler.unavailable is None, "line": sampler.status_line(), "interval_s": args.nvml_interval,
            "gpus": summarise(sampler.samples, sampler.gpus, windows)}
    run = {"command": args.kind, "config": args.config, "overrides": args.overrides, "steps": args.steps,
           "precision": precision, "argv": _command_line(args), "child": shlex.join(command), "run_wall_s": wall_s,
           "load_average_at_start": load_at_start,
           "traces": [f"traces/step{s}.rank*.json" for s in trace_steps]}
    report = build_report(read_metrics(out), warmup=warmup, dims=dims, peak=peak, why_no_peak=why_no_peak,
                          nvml=nvml, run=run, traced=trace_steps)
    notes = _write_outputs(out, report, spans, sampler)
    for note in notes:
        print(f"lcr profile: {note}", file=sys.stderr)
    print((out / "profile.md").read_text(), end="")
