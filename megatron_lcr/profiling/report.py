"""``lcr profile``'s report: where a step's seconds go, tokens/s, model FLOPs and MFU, GPU readings.

Built from what a run leaves in its directory: ``metrics.jsonl`` (every training step's
``time/<phase>_s``, ``time/other_s``, ``time/step_s``, token counts and model FLOPs: see
:mod:`.timers` and :mod:`.flops`), optionally the per-step phase spans ``lcr profile`` asks the timer
for, and the NVML samples taken while it ran. The first ``warmup`` steps (start-up costs: kernel
compilation, allocator growth, first connections) are shown per step but left out of the means.

MFU (PaLM's definition): the model FLOPs the trainer did per second, per trainer process, over the
GPU's peak. Whole-step MFU counts the policy's forward + backward passes of the update and its
forward scoring passes (old and reference log-probs) over the whole step, generation and sync
included; forward/backward MFU divides the update's FLOPs by the ``forward_backward`` phase alone.
Rollout generation on the engines is not in the numerator (another program on, possibly, other GPUs).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict

from megatron_lcr.profiling.flops import TransformerDims, matmul_params, param_count

# Display order; phases a run has beyond these follow in name order, "other" last.
PHASES = ("generation", "reward", "old_logprob", "ref_logprob", "teacher", "forward_backward", "optimizer", "sync",
          "eval", "checkpoint")
_TIME = "time/"


def training_steps(records: list[dict]) -> list[dict]:
    """The step lines of a metrics.jsonl (those with ``time/step_s``; evaluation-only lines are not)."""
    return sorted((r for r in records if isinstance(r.get("time/step_s"), (int, float))), key=lambda r: r["step"])


def phases_of(record: dict) -> dict[str, float]:
    """``{phase: seconds}`` of a step line, ``other`` included, ``step`` not."""
    return {k[len(_TIME):-2]: float(v) for k, v in record.items()
            if k.startswith(_TIME) and k.endswith("_s") and k != "time/step_s"}


def phase_order(names) -> list[str]:
    names = set(names)
    return [p for p in PHASES if p in names] + sorted(names - set(PHASES) - {"other"}) + (["other"] if "other" in names else [])


def _total(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if isinstance(s.get(key), (int, float))]
    return float(sum(values)) if values else None


def _rate(numerator: float | None, seconds: float | None) -> float | None:
    return numerator / seconds if numerator is not None and seconds else None


def phase_table(steps: list[dict]) -> list[dict]:
    """Per phase: mean seconds per step and share of the total step time (shares sum to 1)."""
    total = sum(s["time/step_s"] for s in steps)
    sums: dict[str, float] = {}
    for step in steps:
        for name, seconds in phases_of(step).items():
            sums[name] = sums.get(name, 0.0) + seconds
    return [{"phase": name, "mean_s": sums[name] / len(steps), "share": sums[name] / total if total else math.nan}
            for name in phase_order(sums)]


def flops_summary(steps: list[dict], dims: TransformerDims | None) -> dict:
    """Model size and FLOPs per token: the matmul part from the config, the whole from the run's lengths."""
    out: dict = {}
    if dims is not None:
        out.update(dims=asdict(dims), params=param_count(dims), matmul_params=matmul_params(dims),
                   matmul_forward_flops_per_token=2.0 * matmul_params(dims))
    update, tokens = _total(steps, "perf/update_flops"), _total(steps, "train/tokens")
    if update and tokens:
        out["training_flops_per_token"] = update / tokens  # 3x forward, attention at this run's lengths
        out["forward_flops_per_token"] = update / tokens / 3
    logprob = _total(steps, "perf/logprob_flops") or 0.0
    if update is not None:
        out["model_flops_per_step"] = (update + logprob) / len(steps)
    return out


def mfu_summary(steps: list[dict], peak: tuple[float, str] | None, why_no_peak: str) -> dict:
    """MFU over the whole step and over the forward/backward phase, or why there is none."""
    update, logprob = _total(steps, "perf/update_flops"), _total(steps, "perf/logprob_flops") or 0.0
    ranks = max((s.get("perf/ranks", 1.0) for s in steps), default=1.0)
    step_s, fb_s = _total(steps, "time/step_s"), _total(steps, "time/forward_backward_s")
    out = {"ranks": ranks, "achieved_tflops_per_rank": None, "value": None, "forward_backward": None,
           "peak_tflops": peak[0] if peak else None, "peak_source": peak[1] if peak else None, "note": None}
    if update is None:
        out["note"] = "n/a: the run logged no model FLOPs (perf/update_flops)"
        return out
    out["achieved_tflops_per_rank"] = (update + logprob) / step_s / ranks / 1e12
    if peak is None:
        out["note"] = f"n/a: {why_no_peak}"
        return out
    out["value"] = out["achieved_tflops_per_rank"] / peak[0]
    if fb_s:
        out["forward_backward"] = update / fb_s / ranks / 1e12 / peak[0]
    return out


def throughput(steps: list[dict]) -> dict:
    """Tokens per second of step time (and response tokens per second of generation)."""
    seconds = _total(steps, "time/step_s")
    return {"prompt_tokens_per_s": _rate(_total(steps, "rollout/prompt_tokens"), seconds),
            "response_tokens_per_s": _rate(_total(steps, "rollout/response_tokens"), seconds),
            "train_tokens_per_s": _rate(_total(steps, "train/tokens"), seconds),
            "generation_response_tokens_per_s": _rate(_total(steps, "rollout/response_tokens"),
                                                      _total(steps, "time/generation_s"))}


def machine_info(gpus: list[dict]) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch_version, "gpus": [g["name"] for g in gpus]}


def build_report(records: list[dict], *, warmup: int, dims: TransformerDims | None, peak: tuple[float, str] | None,
                 why_no_peak: str, nvml: dict, run: dict, traced: tuple[int, ...] = ()) -> dict:
    """The profile of a run's step lines; ``nvml``: ``{"line": ..., "gpus": [per-GPU summary]}``. The means
    leave out the first ``warmup`` steps and the ``traced`` ones (the torch profiler slows them down)."""
    steps = training_steps(records)
    if not steps:
        raise ValueError("the run logged no training step (no line with time/step_s in metrics.jsonl)")
    measured = [s for s in steps[warmup:] if s["step"] not in traced]
    if not measured:
        raise ValueError(f"no step to measure: the run logged {len(steps)} step(s), the first {warmup} are warm-up "
                         f"and steps {list(traced)} are traced")
    counted = {s["step"] for s in measured}
    per_step = [{"step": s["step"], "step_s": s["time/step_s"], "phases": phases_of(s),
                 "phase_sum_error_s": abs(sum(phases_of(s).values()) - s["time/step_s"]), "warmup": i < warmup,
                 "traced": s["step"] in traced, "measured": s["step"] in counted} for i, s in enumerate(steps)]
    times = [s["time/step_s"] for s in measured]
    return {
        "run": {**run, "warmup_steps": [s["step"] for s in steps[:warmup]], "traced_steps": list(traced),
                "measured_steps": [s["step"] for s in measured]},
        "machine": machine_info(nvml.get("gpus", [])),
        "step_time": {"mean_s": sum(times) / len(times), "min_s": min(times), "max_s": max(times)},
        "phases": phase_table(measured),
        "other_max_share": max(s["phases"].get("other", 0.0) / s["step_s"] for s in per_step if s["measured"]),
        "throughput": throughput(measured),
        "flops": flops_summary(measured, dims),
        "mfu": mfu_summary(measured, peak, why_no_peak),
        "nvml": nvml,
        "steps": per_step,
    }


def _num(value, fmt: str = "{:.3g}", none: str = "n/a") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _load(run: dict) -> str:
    start = run.get("load_average_at_start")
    return "" if start is None else f"{start:.1f} at the start, "


def render_markdown(report: dict) -> str:
    """The report as a markdown page: run, phase table, throughput, FLOPs, MFU, GPUs."""
    run, machine, mfu, flops, rate = report["run"], report["machine"], report["mfu"], report["flops"], report["throughput"]
    lines = [f"# lcr profile: {run['command']} {run['config']}", "",
             f"- command: `{run['argv']}`",
             f"- machine: {machine['cpu']} ({machine['cores']} cores; 1-min load average {_load(run)}"
             f"{machine['load_average_1min']:.1f} at the end), {machine['platform']}, python {machine['python']}, "
             f"torch {machine['torch']}; GPUs: {', '.join(machine['gpus']) or 'none'}",
             f"- steps measured: {run['measured_steps']} (shown per step only: warm-up {run['warmup_steps'] or 'none'}, "
             f"traced {run['traced_steps'] or 'none'}); step time mean {report['step_time']['mean_s']:.3f} s "
             f"(min {report['step_time']['min_s']:.3f}, max {report['step_time']['max_s']:.3f})", "",
             "| phase | mean s / step | % of step |", "| --- | ---: | ---: |"]
    lines += [f"| {p['phase']} | {p['mean_s']:.3f} | {100 * p['share']:.1f} |" for p in report["phases"]]
    lines += [f"| **step** | **{report['step_time']['mean_s']:.3f}** | **100.0** |", "",
              "| throughput | tokens / s |", "| --- | ---: |"]
    names = {"prompt_tokens_per_s": "prompt tokens (rollouts) per step second",
             "response_tokens_per_s": "response tokens (rollouts) per step second",
             "generation_response_tokens_per_s": "response tokens per generation second",
             "train_tokens_per_s": "trained tokens (forward + backward) per step second"}
    lines += [f"| {label} | {_num(rate[key], '{:,.1f}')} |" for key, label in names.items() if rate[key] is not None]
    lines += ["", "| model FLOPs | value |", "| --- | ---: |"]
    if "params" in flops:
        lines += [f"| parameters | {flops['params']:,} |",
                  f"| forward FLOPs / token, matmuls (2 x {flops['matmul_params']:,}) | "
                  f"{flops['matmul_forward_flops_per_token']:.4g} |"]
    if "forward_flops_per_token" in flops:
        lines += [f"| forward FLOPs / token, with attention at this run's lengths | {flops['forward_flops_per_token']:.4g} |",
                  f"| training FLOPs / token (3 x forward) | {flops['training_flops_per_token']:.4g} |"]
    if "model_flops_per_step" in flops:
        lines.append(f"| model FLOPs / step (update + log-prob scoring) | {flops['model_flops_per_step']:.4g} |")
    lines.append(f"| achieved TFLOP/s per rank ({mfu['ranks']:g} ranks) | {_num(mfu['achieved_tflops_per_rank'], '{:.4g}')} |")
    peak = f"{mfu['peak_tflops']:g} TFLOP/s, {mfu['peak_source']}" if mfu["peak_tflops"] else "none"
    lines += [f"| peak | {peak} |",
              f"| MFU, whole step | {_num(mfu['value'], '{:.2%}', mfu['note'] or 'n/a')} |",
              f"| MFU, forward/backward phase | {_num(mfu['forward_backward'], '{:.2%}', mfu['note'] or 'n/a')} |", ""]
    nvml = report["nvml"]
    lines.append(nvml["line"])
    if nvml.get("gpus"):
        lines += ["", "| GPU | name | util mean % | util max % | memory max / total GiB | power mean / max W |",
                  "| ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {g['index']} | {g['name']} | {_num(g['util_mean_pct'], '{:.0f}')} | {_num(g['util_max_pct'], '{:.0f}')} | "
                  f"{_num(g['memory_max_gib'], '{:.1f}')} / {g['memory_total_gib']:.1f} | "
                  f"{_num(g['power_mean_w'], '{:.0f}')} / {_num(g['power_max_w'], '{:.0f}')} |" for g in nvml["gpus"]]
    lines += ["", "Per step (s; * warm-up, t traced: not in the means):", "",
              "| step | step s | " + " | ".join(p["phase"] for p in report["phases"]) + " |",
              "| ---: | ---: | " + " | ".join("---:" for _ in report["phases"]) + " |"]
    for s in report["steps"]:
        cells = [_num(s["phases"].get(p["phase"]), "{:.3f}", "") for p in report["phases"]]
        mark = ("*" if s["warmup"] else "") + ("t" if s["traced"] else "")
        lines.append(f"| {s['step']}{mark} | {s['step_s']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
