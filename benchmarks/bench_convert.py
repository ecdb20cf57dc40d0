"""Benchmark: peak memory and time of `lcr convert` in both directions on a random bf16 Llama.

    python benchmarks/bench_convert.py [--size 0.8b] [--tp 2] [--pp 2] [--before-ref GIT_REF]
                                       [--out benchmarks/results] [--name convert_cpu]

A random-weight Llama is made with ``transformers`` from a config (``save_pretrained``, bfloat16, in a
temp dir; 1-D weights perturbed so that no two norms are equal). It is converted hf-to-megatron at
TP x PP, then megatron-to-hf back, each conversion in a fresh process, and the round trip must be
bit-identical: the same tensor names, and every tensor with the same dtype, shape and values
(``torch.equal``) as the original. ``--before-ref`` also runs the converter as it was at a git
revision (``git archive`` of its ``megatron_lcr/`` into a temp dir, imported instead of this checkout's)
in the same run, on the same model.

Peak RSS above overhead, the figure the memory bound is about: every process of a conversion (the
converting process, plus any worker processes it starts: the converter before streaming ran TP x PP
of them) reports its peak resident set size (``VmHWM``) when its conversion returns. The overhead is
the same sum for the same conversion of a tiny model of the same family and layout (0.4M
parameters): what the processes take whatever the model (interpreter, imported modules, pages of
libtorch the code path touches, Megatron's process groups). Peak RSS above overhead = sum of the
processes' peaks on the model - sum of their peaks on the tiny model. VmHWM counts every resident
page, file-backed pages of memory-mapped checkpoint files and libraries included (page cache that is
not mapped does not count); a sum of per-process peaks bounds the peak of the processes' summed RSS
from above. Seconds per GB are the conversion's wall time (imports excluded) over the model's bytes,
1 GB = 1e9 bytes.

``python benchmarks/bench_convert.py peak DIRECTION SRC OUT [--tp N --pp N] [--package-root DIR]`` is
the measured process itself (it prints one JSON line); tests/models/test_convert_memory.py uses it too.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Llama shapes: "0.8b" is TinyLlama's width and GQA at 16 layers (0.84B parameters, 1.57 GiB in bf16),
# the kind of model issue 16 measured; "small" is the CPU test's (16 thin layers, ~0.1B parameters);
# "tiny" (0.4M parameters) is the overhead run's. All divide by TP 2 and PP 2 (and 4).
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "0.8b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=4096),
}


# ---- the measured process ----------------------------------------------------------------------


def peak_rss() -> int:
    """This process's peak resident set size so far (VmHWM, bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _measured_worker(report_dir: str, worker_name: str, rank: int, *args) -> None:
    """A worker process of the converter (the one before streaming had them): run it, report its peak."""
    from megatron_lcr.models import convert

    getattr(convert, worker_name)(rank, *args)
    Path(report_dir, f"worker{rank}.json").write_text(json.dumps({"process": f"worker {rank}", "peak": peak_rss()}))


def run_peak(direction: str, src: str, out: str, *, tp: int, pp: int) -> dict:
    """Run one conversion in this process (and its workers, if any) and measure it."""
    from megatron_lcr.models import convert

    report_dir = tempfile.mkdtemp(prefix="peak-")
    for name in ("_hf_to_megatron_worker", "_megatron_to_hf_worker"):  # only the old converter has them
        if hasattr(convert, name):
            setattr(convert, name, functools.partial(_measured_worker, report_dir, name))
    start = time.perf_counter()
    if direction == "hf-to-megatron":
        convert.hf_to_megatron(src, out, tp=tp, pp=pp)
    else:
        convert.megatron_to_hf(src, out)
    seconds = time.perf_counter() - start
    processes = [{"process": "main", "peak": peak_rss()}]
    processes += [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("worker*.json"))]
    return {"direction": direction, "seconds": seconds, "processes": processes,
            "peak": sum(p["peak"] for p in processes)}


def peak_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_convert.py peak")
    parser.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--package-root", default=str(REPO), help="directory holding the megatron_lcr to measure")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.package_root)
    print(json.dumps(run_peak(args.direction, args.src, args.out, tp=args.tp, pp=args.pp)))


def measure(direction: str, src: Path, out: Path, *, tp: int = 1, pp: int = 1, package_root: Path = REPO) -> dict:
    """Run ``peak`` in a fresh process; its JSON report plus the process's whole wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "peak", direction, str(src), str(out),
           "--tp", str(tp), "--pp", str(pp), "--package-root", str(package_root)]
    env = {**os.environ, "PYTHONPATH": str(package_root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{direction} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}


def measure_above_overhead(direction: str, src: Path, out: Path, tiny_src: Path, tiny_out: Path, *, tp: int = 1,
                           pp: int = 1, package_root: Path = REPO) -> dict:
    """One conversion of the model and, first, the same conversion of the tiny model (its overhead)."""
    tiny = measure(direction, tiny_src, tiny_out, tp=tp, pp=pp, package_root=package_root)
    run = measure(direction, src, out, tp=tp, pp=pp, package_root=package_root)
    if len(run["processes"]) != len(tiny["processes"]):
        raise RuntimeError(f"{direction}: {len(run['processes'])} processes, {len(tiny['processes'])} on the tiny model")
    return {**run, "overhead_processes": tiny["processes"], "overhead": tiny["peak"],
            "peak_above_overhead": run["peak"] - tiny["peak"]}


# ---- the benchmark -----------------------------------------------------------------------------


def make_model(size: str, out: Path) -> None:
    """A random bf16 Llama of ``SIZES[size]`` saved with ``save_pretrained`` into ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # made in bf16: no fp32 copy
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # RMSNorm weights start as ones: make a swapped norm visible
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out, safe_serialization=True)


def model_bytes(hf_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of the tensors in a Hugging Face directory."""
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    params = nbytes = 0
    for name in reader.keys():
        tensor = reader.get(name)
        params += tensor.numel()
        nbytes += tensor.numel() * tensor.element_size()
    return params, nbytes


def round_trip_differences(original: Path, back: Path) -> list[str]:
    """How tensors differ: ``name: missing``, ``name: extra``, ``name: shape A -> B``, ``name: dtype A -> B``
    (with ``, values equal`` when they agree as float64) or ``name: values``; [] if bit-identical."""
    from megatron_lcr.models.hf_checkpoint import SafetensorsReader

    a, b = SafetensorsReader(original), SafetensorsReader(back)
    bad = [f"{name}: missing" for name in sorted(set(a.keys()) - set(b.keys()))]
    bad += [f"{name}: extra" for name in sorted(set(b.keys()) - set(a.keys()))]
    for name in sorted(set(a.keys()) & set(b.keys())):
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape:
            bad.append(f"{name}: shape {list(x.shape)} -> {list(y.shape)}")
        elif x.dtype != y.dtype:
            same = ", values equal" if torch.equal(x.double(), y.double()) else ""
            bad.append(f"{name}: dtype {x.dtype} -> {y.dtype}{same}")
        elif not torch.equal(x, y):
            bad.append(f"{name}: values")
    return bad


def summarize_differences(differences: list[str]) -> str:
    """One cell for the table: 'bit-identical', or the count and the distinct kinds of difference."""
    if not differences:
        return "bit-identical"
    kinds = sorted({d.split(": ", 1)[1] for d in differences})
    return f"{len(differences)} tensors differ: {'; '.join(kinds)} (e.g. {differences[0].split(':')[0]})"


def run_version(label: str, work: Path, nbytes: int, *, tp: int, pp: int, package_root: Path) -> dict:
    """Both directions with one version of the converter (model and tiny model), and the round-trip checks."""
    hf, tiny, out = work / "hf", work / "tiny-hf", work / label.split()[0]
    rows = [measure_above_overhead("hf-to-megatron", hf, out / "ckpt", tiny, out / "tiny-ckpt", tp=tp, pp=pp,
                                   package_root=package_root),
            measure_above_overhead("megatron-to-hf", out / "ckpt", out / "hf", out / "tiny-ckpt", out / "tiny-hf",
                                   package_root=package_root)]
    for row in rows:
        row["peak_over_model"] = row["peak_above_overhead"] / nbytes
        row["seconds_per_gb"] = row["seconds"] / (nbytes / 1e9)
        print(f"{label} {row['direction']}: {row['seconds']:.1f} s, peak above overhead "
              f"{row['peak_above_overhead'] / 2**20:.0f} MiB = {row['peak_over_model']:.3f} x model", flush=True)
    differences = round_trip_differences(hf, out / "hf") + round_trip_differences(tiny, out / "tiny-hf")
    return {"label": label, "rows": rows, "round_trip_identical": not differences,
            "round_trip": summarize_differences(differences), "round_trip_differences": differences}


def machine() -> dict:
    import megatron.core
    import safetensors
    import transformers

    with open("/proc/meminfo") as f:
        mem_total = int(f.readline().split()[1]) * 1024
    return {"python": platform.python_version(), "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(mem_total / 2**30, 1), "platform": platform.platform(),
            "date": datetime.date.today().isoformat(), "device": "CPU, no GPU"}


def git_snapshot(ref: str, dest: Path) -> str:
    """Extract ``megatron_lcr/`` as of ``ref`` into ``dest``; returns the full commit hash."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True, check=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "megatron_lcr"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


def write_results(result: dict, out_dir: Path, name: str) -> None:
    from megatron_lcr.atomic import atomic_write_bytes

    atomic_write_bytes(out_dir / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / f"{name}.md", markdown(result).encode())


def markdown(result: dict) -> str:
    m, model = result["machine"], result["model"]
    lines = [
        f"# Checkpoint conversion on {m['device']}: {m['platform']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}",
        "",
        f"python {m['python']}, torch {m['torch']}, megatron-core {m['megatron_core']}, transformers "
        f"{m['transformers']}, safetensors {m['safetensors']}. Command: `{result['command']}`.",
        f"Model: random Llama ({model['size']}: {model['config']}), {model['parameters']:,} parameters, "
        f"{model['bytes'] / 2**30:.2f} GiB of bf16 safetensors; hf-to-megatron at TP={result['tp']} PP={result['pp']}, "
        "then megatron-to-hf of that checkpoint. Load average (1 min) before / after: "
        f"{result['load_before']:.2f} / {result['load_after']:.2f}.",
        "",
        "Peak RSS above overhead = sum over the conversion's processes of their peak RSS (VmHWM, mapped file pages "
        "included) - the same sum for the same conversion of a tiny model of the same family and layout (the overhead, "
        f"{result['tiny']['parameters']:,} parameters). s/GB = conversion wall time (imports excluded) / model bytes "
        "(1e9); process s = the whole process, imports included. Round trip: every tensor of the model (and of the tiny "
        "model) back in Hugging Face format has the original's name, dtype, shape and values (torch.equal).",
        "",
        "| converter | direction | processes | peak above overhead MiB | x model | peak MiB (sum) | overhead MiB (sum) "
        "| s | s/GB | process s | round trip |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for version in result["versions"]:
        trip = version["round_trip"]
        for row in version["rows"]:
            lines.append(f"| {version['label']} | {row['direction']} | {len(row['processes'])} | "
                         f"{row['peak_above_overhead'] / 2**20:.0f} | {row['peak_over_model']:.3f} | "
                         f"{row['peak'] / 2**20:.0f} | {row['overhead'] / 2**20:.0f} | {row['seconds']:.1f} | "
                         f"{row['seconds_per_gb']:.1f} | {row['process_seconds']:.1f} | {trip} |")
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.8b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--before-ref", help="also measure the converter at this git revision")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="convert_cpu", help="results file stem")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        make_model(args.size, work / "hf")
        make_model("tiny", work / "tiny-hf")
        params, nbytes = model_bytes(work / "hf")
        print(f"model: {params:,} parameters, {nbytes / 2**30:.2f} GiB", flush=True)
        tiny_params, tiny_bytes = model_bytes(work / "tiny-hf")
        result = {"command": "python benchmarks/bench_convert.py " + " ".join(argv), "machine": machine(),
                  "tp": args.tp, "pp": args.pp, "load_before": os.getloadavg()[0],
                  "model": {"size": args.size, "config": SIZES[args.size], "parameters": params, "bytes": nbytes},
                  "tiny": {"config": SIZES["tiny"], "parameters": tiny_params, "bytes": tiny_bytes},
                  "versions": []}
        if args.before_ref:
            commit = git_snapshot(args.before_ref, work / "before-package")
            result["before_commit"] = commit
            result["versions"].append(run_version(f"before ({commit[:7]})", work, nbytes, tp=args.tp, pp=args.pp,
                                                  package_root=work / "before-package"))
        result["versions"].append(run_version("streaming", work, nbytes, tp=args.tp, pp=args.pp, package_root=REPO))
        result["load_after"] = os.getloadavg()[0]
        result["notes"] = [
            f"The machine ({os.cpu_count()} cores) is shared with other jobs (load average above): seconds are rough; "
            "peaks are per process and do not depend on the load.",
            "Conversion processes run with torch's default thread count; the streaming converter is one process.",
        ]
    write_results(result, Path(args.out), args.name)
    print(markdown(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["peak"]:
        peak_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
