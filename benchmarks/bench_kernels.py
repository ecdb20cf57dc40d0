"""Per-token log-prob + entropy from hidden states and the output weight: fused kernels vs baselines.

Every path computes ``logp[T]`` (and ``entropy[T]`` where it can) of ``softmax(hidden @ W.T / 0.7)``
and is differentiated with random per-token upstream gradients, rows masked with ``ignore_index``
(0% and 50%):

- ``naive``: materialised logits, ``log_softmax`` + ``gather``, entropy from the full softmax.
- ``chunked_torch``: ``megatron_lcr.kernels.logprob_entropy`` with ``impl="torch"``.
- ``triton``: the same op with ``impl="triton"`` (CUDA; on CPU only when ``TRITON_INTERPRET=1`` is set,
  which checks the path and the tile record at toy shapes: interpreter times mean nothing).
- ``liger_flce``: Liger-Kernel's fused linear cross-entropy, when installed (CUDA). It computes the
  gradients inside forward and scales them by a scalar in backward, so it takes no per-token upstream
  gradient: it runs with ``reduction="sum"`` (upstream gradient -1 on every kept log-prob), gated
  against the reference for that gradient. logp only.
- ``torch_linear_ce``: ``torch.nn.functional.linear_cross_entropy`` with its chunked
  ``LinearCrossEntropyOptions()`` (when this torch has it), ``reduction="none"``; logp only.

Correctness gates every timing: the first (untimed) call of each path is compared with a float64
reference (row-chunked autograd, never the path under test): ``max|a - ref| / max(1, max|ref|)``
must stay below 1e-3 (fp32) or 5e-2 (bf16) for logp, entropy, d_hidden and d_weight; a failing path
is reported without timings. Times: forward, backward and total per call, p20/p50/p80 over
``--repeats`` calls, the paths interleaved call by call (the machine may be shared: only ratios
within one run are meaningful). Peak memory: each (path, mask) in a fresh process, the peak above the
memory held after the inputs are built (inputs: hidden, W, labels, upstream gradients), so outputs,
gradients and all temporaries count. CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
after one warm-up call; without that, no warm-up); CUDA: ``torch.cuda.max_memory_allocated``.
TFLOP/s uses the nominal ``8 * T_kept * H * V`` FLOPs of a recomputing forward + backward, shown
also as a share of the machine's measured ``torch.mm`` rate (same dtype, ``[T, H] @ [H, V]``, one
call per timing round, p50). On a shared CPU, ``--threads 1`` avoids the collapse of multi-threaded
kernels when other jobs hold the cores.

Triton tiles: each case records, per Triton kernel, the tile (``BT, BV, BH, num_warps, num_stages``)
it ran with and where that came from: ``autotuned`` (CUDA: the fastest of ``triton_impl.TUNING_SPACE``
for this H, V and dtype, timed on the first call at that key) or the fixed tile (CPU: the interpreter's, which is
``KernelConfig``'s ``block_*`` fields; recorded even when the Triton path does not run). The memory
workers are separate processes and tune again; their pick is not recorded.

    python benchmarks/bench_kernels.py                    # CPU: T=4096, H=1024, V=32768, fp32
    python benchmarks/bench_kernels.py --device cuda      # H100: H=4096, V in {128256, 151936}, T in {4K, 16K}, bf16

Writes ``benchmarks/results/kernels_{cpu,cuda}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lcr.atomic import atomic_write_text  # noqa: E402
from megatron_lcr.kernels import KernelConfig, logprob_entropy  # noqa: E402
from megatron_lcr.kernels.config import triton_available, triton_interpreting  # noqa: E402

TEMPERATURE = 0.7
IGNORE = -100
RESULTS = os.path.join(REPO, "benchmarks", "results")
CPU_SHAPES = [(4096, 1024, 32768)]
CUDA_SHAPES = [(t, 4096, v) for v in (128256, 151936) for t in (4096, 16384)]
GATE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    tokens: int
    hidden: int
    vocab: int
    masked: float
    dtype: str
    device: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_inputs(case: Case, seed: int = 0) -> dict:
    """hidden, weight (leaves), labels with ``masked`` of the rows ignored, upstream gradients."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    kw = {"device": case.device, "generator": gen}
    hidden = torch.randn(case.tokens, case.hidden, **kw).to(case.torch_dtype)
    weight = (torch.randn(case.vocab, case.hidden, **kw) * (4.0 / case.hidden**0.5)).to(case.torch_dtype)
    labels = torch.randint(0, case.vocab, (case.tokens,), **kw)
    drop = torch.randperm(case.tokens, device=case.device, generator=gen)[: int(case.masked * case.tokens)]
    labels[drop] = IGNORE
    return {
        "hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "labels": labels,
        "g_logp": torch.randn(case.tokens, **kw), "g_entropy": torch.randn(case.tokens, **kw),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Paths: each returns (outputs, upstream gradients) for torch.autograd.backward, and which
# reference gradient they must match ("full": g_logp and g_entropy, "logp": g_logp only,
# "sum": -1 on every kept logp).


def path_naive(inp: dict):
    keep = inp["labels"] != IGNORE
    logits = (inp["hidden"] @ inp["weight"].t()).float() / TEMPERATURE
    log_p = logits.log_softmax(dim=-1)
    logp = log_p.gather(1, inp["labels"].clamp(min=0)[:, None])[:, 0] * keep
    entropy = -(log_p.exp() * log_p).sum(dim=-1) * keep
    return (logp, entropy), (inp["g_logp"], inp["g_entropy"])


def _fused(impl: str):
    def run(inp: dict):
        logp, entropy = logprob_entropy(inp["hidden"], inp["weight"], inp["labels"], temperature=TEMPERATURE,
                                        config=KernelConfig(impl=impl))  # fmt: skip
        return (logp, entropy), (inp["g_logp"], inp["g_entropy"])

    return run


def path_torch_linear_ce(inp: dict):
    ce = torch.nn.functional.linear_cross_entropy(
        inp["hidden"] / TEMPERATURE, inp["weight"], inp["labels"], reduction="none", ignore_index=IGNORE,
        options=torch.nn.LinearCrossEntropyOptions(),
    )  # fmt: skip
    return (-ce,), (inp["g_logp"],)


def path_liger(inp: dict):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(inp["hidden"] / TEMPERATURE, inp["weight"], inp["labels"],
                                           ignore_index=IGNORE, reduction="sum")  # fmt: skip
    loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return (loss,), (torch.ones_like(loss),)


def skipped_paths(device: str) -> dict:
    """Paths this machine cannot run, and why (reported under the table)."""
    skipped = {}
    if device != "cuda":
        if not (triton_available() and triton_interpreting()):
            skipped["triton"] = "needs CUDA (on CPU Triton runs only in its interpreter, which is for tests)"
        skipped["liger_flce"] = "Liger-Kernel's Triton kernels need CUDA"
    else:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            skipped["liger_flce"] = "liger-kernel is not installed"
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        skipped["torch_linear_ce"] = f"torch {torch.__version__} has no chunked linear_cross_entropy"
    return skipped


def available_paths(device: str) -> dict:
    """``name -> (function, gradient kind, semantics note)`` for the paths this machine can run."""
    paths = {
        "naive": (path_naive, "full", "logp + entropy"),
        "chunked_torch": (_fused("torch"), "full", "logp + entropy"),
    }
    if device == "cpu" and triton_available() and triton_interpreting():
        paths["triton"] = (_fused("triton"), "full", "logp + entropy (Triton interpreter: times mean nothing)")
    if device == "cuda":
        paths["triton"] = (_fused("triton"), "full", "logp + entropy")
        try:
            import liger_kernel  # noqa: F401

            paths["liger_flce"] = (path_liger, "sum", "logp only, reduction=sum (no per-token upstream grads)")
        except ImportError:
            pass
    if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        paths["torch_linear_ce"] = (path_torch_linear_ce, "logp", "logp only")
    return paths


# ---------------------------------------------------------------------------------------------
# Reference and gate


def reference(inp: dict, chunk: int = 256) -> dict:
    """float64 logp, entropy and the gradients of the three upstream-gradient kinds (row chunks)."""
    w64 = inp["weight"].detach().double()
    keep = inp["labels"] != IGNORE
    out = {"logp": [], "entropy": []}
    grads = {
        kind: [torch.zeros_like(inp["hidden"], dtype=torch.float64), torch.zeros_like(w64)]
        for kind in ("logp", "entropy", "sum")
    }
    w = w64.requires_grad_()  # a leaf; autograd.grad below returns gradients without accumulating
    for r0 in range(0, inp["hidden"].shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        x = inp["hidden"][rows].detach().double().requires_grad_()
        log_p = ((x @ w.t()) / TEMPERATURE).log_softmax(dim=-1)
        k = keep[rows]
        logp = log_p.gather(1, inp["labels"][rows].clamp(min=0)[:, None])[:, 0] * k
        entropy = -(log_p.exp() * log_p).sum(dim=-1) * k
        out["logp"].append(logp.detach())
        out["entropy"].append(entropy.detach())
        for kind, value, g in (
            ("logp", logp, inp["g_logp"][rows]),
            ("entropy", entropy, inp["g_entropy"][rows]),
            ("sum", logp, -k.double()),
        ):
            dx, dw = torch.autograd.grad(value, (x, w), g.double(), retain_graph=True)
            grads[kind][0][rows] += dx
            grads[kind][1] += dw
    ref = {name: torch.cat(parts) for name, parts in out.items()}
    ref["grads"] = {
        "full": [a + b for a, b in zip(grads["logp"], grads["entropy"], strict=False)],
        "logp": grads["logp"],
        "sum": grads["sum"],
    }
    return ref


def gate_error(outputs, grad_kind: str, inp: dict, ref: dict) -> dict:
    """Scaled max errors ``max|a - ref| / max(1, max|ref|)`` of one path's first call."""

    def err(a, b):
        return float((a.detach().double() - b).abs().max() / max(1.0, float(b.abs().max())))

    errors = {}
    if grad_kind != "sum":
        errors["logp"] = err(outputs[0], ref["logp"])
        if len(outputs) > 1:
            errors["entropy"] = err(outputs[1], ref["entropy"])
    else:
        errors["loss"] = err(outputs[0], -ref["logp"].sum()[None])
    d_hidden, d_weight = ref["grads"][grad_kind]
    errors["d_hidden"] = err(inp["hidden"].grad, d_hidden)
    errors["d_weight"] = err(inp["weight"].grad, d_weight)
    return errors


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(fn, inp: dict, device: str):
    """One forward + backward: ``(forward_s, backward_s, outputs)``; gradients reset first."""
    inp["hidden"].grad = inp["weight"].grad = None
    _sync(device)
    t0 = time.perf_counter()
    outputs, upstream = fn(inp)
    _sync(device)
    t1 = time.perf_counter()
    torch.autograd.backward(outputs, upstream)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, outputs


def percentiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"p20": q[1], "p50": statistics.median(values), "p80": q[7]}


def matmul_operands(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, H]`` and ``[H, V]`` in the case's dtype: the machine's reference matmul."""
    a = torch.randn(case.tokens, case.hidden, device=case.device).to(case.torch_dtype)
    return a, torch.randn(case.hidden, case.vocab, device=case.device).to(case.torch_dtype)


def timed_matmul(a: torch.Tensor, b: torch.Tensor, device: str) -> float:
    """Seconds of one ``torch.mm(a, b)``."""
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory_here(case: Case, path: str) -> dict:
    """Peak memory of one forward + backward of ``path``, above the inputs (run in a fresh process)."""
    fn = available_paths(case.device)[path][0]
    inp = make_inputs(case)
    if case.device == "cuda":
        timed_call(fn, inp, case.device)  # warm-up: kernels compiled, allocator primed
        inp["hidden"].grad = inp["weight"].grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed_call(fn, inp, case.device)
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "method": "cuda max_memory_allocated"}
    warm = _reset_peak_rss()
    if warm:
        timed_call(fn, inp, case.device)
        inp["hidden"].grad = inp["weight"].grad = None
        _reset_peak_rss()
    base = _rss_bytes()
    timed_call(fn, inp, case.device)
    return {
        "peak_bytes": _peak_rss_bytes() - base,
        "method": "VmHWM - RSS" + (" (after warm-up)" if warm else " (cold)"),
    }


def measure_memory(case: Case, path: str, threads: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        json.dumps(asdict(case)),
        path,
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"peak_bytes": None, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_case(case: Case, repeats: int, threads: int) -> tuple[dict, float]:
    """Gate, time and measure memory of every path for one case; also the matmul rate (TFLOP/s).

    Each timing round runs every path once and one reference matmul, so that load from other
    processes on a shared machine affects the paths and the rate alike.
    """
    paths = available_paths(case.device)
    inp = make_inputs(case)
    ref = reference(inp)
    tol = GATE[case.torch_dtype]
    rows = {}
    for name, (fn, grad_kind, note) in paths.items():
        row, outputs = {"semantics": note}, None
        try:
            _, _, outputs = timed_call(fn, inp, case.device)
            row["gate_errors"] = gate_error(outputs, grad_kind, inp, ref)
            row["gate_passed"] = max(row["gate_errors"].values()) <= tol
        except torch.OutOfMemoryError:  # a materialising path at a large shape
            row.update(gate_passed=False, error="out of memory")
            if case.device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # a baseline's API drift must not hide the other paths' results
            row.update(gate_passed=False, error=f"{type(exc).__name__}: {exc}"[:300])
        rows[name] = row
        del outputs
    timings = {name: {"forward": [], "backward": [], "total": []} for name, row in rows.items() if row["gate_passed"]}
    mm_a, mm_b = matmul_operands(case)
    timed_matmul(mm_a, mm_b, case.device)
    mm_times = []
    for _ in range(repeats):
        mm_times.append(timed_matmul(mm_a, mm_b, case.device))
        for name in timings:
            fwd, bwd, _ = timed_call(paths[name][0], inp, case.device)
            for key, value in (("forward", fwd), ("backward", bwd), ("total", fwd + bwd)):
                timings[name][key].append(value)
    inp = ref = mm_a = mm_b = None
    if case.device == "cuda":
        torch.cuda.empty_cache()  # the memory workers share the GPU with this process
    kept = case.tokens - int(case.masked * case.tokens)
    flops = 8 * kept * case.hidden * case.vocab
    for name, row in rows.items():
        if name in timings:
            row["seconds"] = {key: percentiles(values) for key, values in timings[name].items()}
            row["tflops"] = flops / row["seconds"]["total"]["p50"] / 1e12
        row["memory"] = measure_memory(case, name, threads)
    return rows, 2 * case.tokens * case.hidden * case.vocab / statistics.median(mm_times) / 1e12


def triton_tiles(case: Case, ran: bool) -> dict:
    """``kernel -> tile`` of the Triton path at this case's (H, V, dtype): the tiles its launches used
    (``ran``: the path was run), else the fixed tile the interpreter would use. Empty without Triton."""
    if not triton_available():
        return {}
    from megatron_lcr.kernels import triton_impl  # imported late: TRITON_INTERPRET is read at import

    if ran:  # a path that failed before its first launch records nothing
        return triton_impl.chosen_tiles(hidden=case.hidden, vocab=case.vocab, dtype=case.torch_dtype)
    tile = triton_impl.fixed_tile(KernelConfig())
    return {"all kernels": {**tile, "source": "fixed (interpreter's tile; the Triton path did not run)"}}


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # the table is still worth having without the driver version
            info["driver"] = f"unknown ({type(exc).__name__})"
    return info


def must_show(results: list[dict], device: str) -> list[dict]:
    """The issue's acceptance checks, computed from this run's numbers."""
    checks = []
    for entry in results:
        rows, case = entry["paths"], entry["case"]
        label = f"T={case['tokens']} H={case['hidden']} V={case['vocab']} masked={case['masked']:.0%}"
        fused = "chunked_torch" if device == "cpu" else "triton"
        f_row, n_row = rows.get(fused, {}), rows.get("naive", {})
        if device == "cpu" and "seconds" in f_row and "seconds" in n_row:
            mem = f_row["memory"]["peak_bytes"] / n_row["memory"]["peak_bytes"]
            speed = f_row["seconds"]["total"]["p50"] / n_row["seconds"]["total"]["p50"]
            checks.append(
                {
                    "case": label,
                    "check": "fused peak memory <= 1/8 of naive",
                    # A toy shape's fused peak can round to 0 pages of RSS.
                    "value": f"{mem:.3f}" + (f" (1/{1 / mem:.1f})" if mem else ""),
                    "met": mem <= 1 / 8,
                }
            )
            checks.append(
                {
                    "case": label,
                    "check": "fused time <= 1.3x naive (p50 total)",
                    "value": f"{speed:.2f}x",
                    "met": speed <= 1.3,
                }
            )
        if device == "cuda" and "seconds" in f_row:
            share = f_row["tflops"] / entry["matmul_tflops"]
            checks.append(
                {
                    "case": label,
                    "check": ">= 60% of measured bf16 matmul rate (fwd+bwd, 8THV)",
                    "value": f"{share:.0%}",
                    "met": share >= 0.6,
                }
            )
            l_row = rows.get("liger_flce", {})
            if "seconds" in l_row:
                speed = f_row["seconds"]["total"]["p50"] / l_row["seconds"]["total"]["p50"]
                mem = f_row["memory"]["peak_bytes"] / l_row["memory"]["peak_bytes"]
                checks.append(
                    {
                        "case": label,
                        "check": "at least Liger's speed (p50 total)",
                        "value": f"{speed:.2f}x Liger's time",
                        "met": speed <= 1.0,
                    }
                )
                checks.append(
                    {
                        "case": label,
                        "check": "at most half of Liger's peak memory",
                        "value": f"{mem:.2f}",
                        "met": mem <= 0.5,
                    }
                )
    return checks


def _ms(row: dict, key: str) -> str:
    s = row["seconds"][key]
    return f"{s['p20'] * 1e3:.0f} / {s['p50'] * 1e3:.0f} / {s['p80'] * 1e3:.0f}"


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        f"# Fused log-prob + entropy kernels ({report['device']})",
        "",
        f"{info.get('gpu') or info['cpu']}, {info['cores']} cores (torch intra-op threads: {info['torch_threads']}), "
        f"torch {info['torch']}, triton {info['triton']}, python {info['python']}"
        + (f", CUDA {info['cuda']}, driver {info['driver']}" if "driver" in info else "")
        + f", {info['date']}. Cases measured: {report.get('cases_done', 'all')}. "
        f"Temperature {TEMPERATURE}, random per-token upstream gradients, {report['repeats']} timed calls per path "
        "(interleaved), times in ms as p20 / p50 / p80. Peak memory: above the inputs, one forward + backward in a "
        "fresh process (method in the JSON). TFLOP/s: nominal 8 * T_kept * H * V for every path (the naive path "
        "does 6 * T * H * V, without recompute; shares above 100% mean the tiled matmuls ran faster than the one large "
        "reference matmul). Command: "
        f"`{report['command']}`.",
        "",
        "| shape | masked | path | computes | forward ms | backward ms | total ms | peak MB | TFLOP/s "
        "| % of mm rate | gate (max scaled err) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for entry in report["results"]:
        case = entry["case"]
        shape = f"T={case['tokens']} H={case['hidden']} V={case['vocab']} {case['dtype']}"
        for name, row in entry["paths"].items():
            peak = row["memory"].get("peak_bytes")
            peak_s = f"{peak / 2**20:.0f}" if peak is not None else row["memory"].get("error", "n/a")
            gate = f"{max(row['gate_errors'].values()):.1e}" if "gate_errors" in row else "-"
            gate = (
                gate + (" pass" if row["gate_passed"] else " FAIL") if "gate_errors" in row else row.get("error", "-")
            )
            if "seconds" in row:
                times = f"{_ms(row, 'forward')} | {_ms(row, 'backward')} | {_ms(row, 'total')}"
                rate = f"{row['tflops']:.3f} | {row['tflops'] / entry['matmul_tflops']:.0%}"
            else:
                times, rate = "- | - | -", "- | -"
            cells = [shape, f"{case['masked']:.0%}", name, row["semantics"], times, peak_s, rate, gate]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"Not run: `{name}`: {why}." for name, why in report["skipped"].items()]
    rates = [
        f"{e['matmul_tflops']:.3f} TFLOP/s (T={e['case']['tokens']}, V={e['case']['vocab']}, "
        f"masked={e['case']['masked']:.0%} run)"
        for e in report["results"]
    ]
    lines += ["", "Measured `torch.mm` rate (p50, timed in the same rounds as the paths): " + ", ".join(rates)]
    lines += ["", "## Triton tiles", "", "| shape | masked | kernel | BT | BV | BH | warps | stages | source |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for entry in report["results"]:
        case = entry["case"]
        shape = f"T={case['tokens']} H={case['hidden']} V={case['vocab']} {case['dtype']}"
        for kernel, t in entry.get("triton_tiles", {}).items():
            cells = [shape, f"{case['masked']:.0%}", kernel, *(str(t[k]) for k in ("BT", "BV", "BH")),
                     str(t["num_warps"]), str(t["num_stages"]), t["source"]]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    if not any(entry.get("triton_tiles") for entry in report["results"]):
        lines.append("| (none recorded: Triton is not installed, or the run predates tile records) |")
    lines += ["", "## Acceptance checks", ""]
    lines += ["| case | check | value | met |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {c['case']} | {c['check']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in report["checks"]
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", default=None, help="T,H,V;T,H,V... (default: the device's table)")
    parser.add_argument("--masks", default="0,0.5", help="fractions of rows with ignore_index")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="output prefix (default benchmarks/results/kernels_<device>)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("CASE_JSON", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(measure_memory_here(Case(**json.loads(args.memory_worker[0])), args.memory_worker[1])))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device on this machine (the GPU table needs one)")
    shapes = (
        [tuple(map(int, s.split(","))) for s in args.shapes.split(";")]
        if args.shapes
        else (CPU_SHAPES if args.device == "cpu" else CUDA_SHAPES)
    )
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    prefix = args.out or os.path.join(RESULTS, f"kernels_{args.device}")
    report = {"device": args.device, "repeats": args.repeats, "machine": machine_info(args.device),
              "command": "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "skipped": skipped_paths(args.device), "results": []}  # fmt: skip
    cases = [(shape, masked) for shape in shapes for masked in map(float, args.masks.split(","))]
    for (tokens, hidden, vocab), masked in cases:
        case = Case(tokens=tokens, hidden=hidden, vocab=vocab, masked=masked, dtype=dtype, device=args.device)
        print(case, flush=True)
        rows, rate = bench_case(case, args.repeats, torch.get_num_threads())
        tiles = triton_tiles(case, ran="triton" in rows)
        report["results"].append({"case": asdict(case), "matmul_tflops": rate, "paths": rows, "triton_tiles": tiles})
        print(json.dumps(report["results"][-1], indent=1, default=str), flush=True)
        # Written after every case: a run stopped by a time limit (a lent GPU's) keeps what it measured.
        report["checks"] = must_show(report["results"], args.device)
        report["cases_done"] = f"{len(report['results'])} of {len(cases)}"
        atomic_write_text(prefix + ".json", json.dumps(report, indent=1))
        atomic_write_text(prefix + ".md", markdown(report))
    print(markdown(report))

if __name__ == "__main__":
    main()
