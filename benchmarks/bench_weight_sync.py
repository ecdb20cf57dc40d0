"""Benchmark: weight sync into real rollout servers (``lcr serve`` and SGLang) vs the raw gloo broadcast rate.

    python benchmarks/bench_weight_sync.py [--engines reference sglang] [--sizes tiny 1b]
                                           [--modes distributed tensor disk] [--servers 1]
                                           [--repeats 3] [--bucket-mb 512]

For each model size a random Llama-shaped Hugging Face model is written to a temp directory. Per engine,
N servers load it, started by the launcher (``rollout.sglang.launch_servers``): ``reference`` is ``lcr
serve``; ``sglang`` is ``sglang.launch_server`` run by the interpreter in env ``LCR_SGLANG_PYTHON``, else
``~/.cache/megatron_lcr/venvs/sglang-0.5.23/bin/python`` (on CPU the launcher adds ``--device cpu
--attention-backend torch_native`` and its import stub). One engine's servers run at a time. This process,
the sync source, pushes freshly perturbed copies of the tensors with ``WeightSyncer.sync_tensors`` in each
mode: ``distributed`` (pause, per bucket one update request and one gloo broadcast per tensor, flush,
continue), ``tensor`` (one ``/update_weights_from_tensor`` request per bucket and server, in the payload the
syncer picks per engine: base64 safetensors for lcr serve, SGLang's pickle of shared-memory CPU tensors
for SGLang) and ``disk`` (safetensors shards in a temp dir, then ``/update_weights_from_disk``; the shards
are still in the page cache when the server reads them).

Every sync is verified outside its timing: the servers must report the weight_version just pushed, and
their log-probs of a scored sequence must differ from those they gave with the launch weights. On the tiny
size these log-probs must also equal a float32 Hugging Face model's holding the pushed weights, and lcr
serve compares per-tensor checksums with the trainer's (computed inside the timed sync, so not on larger
sizes; SGLang has none). On every size SGLang's log-probs are set beside lcr serve's after the same syncs.

Then N receiver processes join a plain gloo group and this process broadcasts the same tensors' bytes, one
broadcast per tensor as the distributed sync does, twice, timing the second pass (warm buffers and
connections, as in every sync after a server's first): that transport's ceiling on this machine, so
sync / raw is the share of time that is transfer (for ``tensor`` and ``disk``, a comparison with the same
ceiling). Results go to benchmarks/results/weight_sync.{json,md} with machine info: the trainer's python
and torch, SGLang's release and torch. CPU only: no GPU figure (NCCL, CUDA IPC) is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_lcr.parallel.env import free_port  # noqa: E402
from megatron_lcr.rollout.client import ClientConfig, RolloutClient  # noqa: E402
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers  # noqa: E402
from megatron_lcr.rollout.update_group import broadcast_from_source, join_update_group  # noqa: E402
from megatron_lcr.rollout.weight_sync import WeightSyncConfig, WeightSyncer  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, dtype)
    "tiny": (128, 352, 4, 4, 2, 128, torch.float32),
    "1b": (2048, 5632, 20, 16, 4, 32000, torch.bfloat16),
}
ENGINES = ("reference", "sglang")
MODES = ("distributed", "tensor", "disk")
SGLANG_VENV_PYTHON = Path.home() / ".cache" / "megatron_lcr" / "venvs" / "sglang-0.5.23" / "bin" / "python"
# Sizes whose scored log-probs are also compared with a Hugging Face model's: a float32 HF copy of the pushed
# weights per sync is cheap only for small models (1b: 4 GB more).
HF_CHECKED_SIZES = ("tiny",)
PROBE = [5, 17, 33, 48, 71, 99, 120, 7, 64, 3]
"""Token ids the servers score after every sync (< the tiny vocabulary of 128)."""
RAW_PASSES = 2
"""Passes of the raw broadcast over the same buffers; the last is timed (see raw_broadcast_seconds)."""
LOGPROB_TOL = 1e-4
"""Largest |engine - HF| log-prob accepted on the float32 tiny model (the engine contract tests' bound); the
smallest change from the launch weights' log-probs that shows a sync took effect."""


def llama_config(size: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab, _ = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def make_model(size: str, out: Path) -> tuple[dict[str, torch.Tensor], int]:
    from transformers import LlamaForCausalLM

    dtype = SIZES[size][6]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    gen = torch.Generator().manual_seed(0)
    # Matrices at HF's initializer_range; norm weights near 1 (at 0.02 they would shrink the logits to ~0,
    # and every weight set would give the same log-probs: the scoring check would prove nothing).
    state = {name: (torch.randn(p.shape, generator=gen) * 0.02 + (p.dim() == 1)).to(dtype)
             for name, p in model.state_dict().items()}
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(state)
    model.save_pretrained(out)
    params = sum(t.numel() for t in state.values())
    return state, params


@torch.no_grad()
def hf_logprobs(size: str, weights: dict[str, torch.Tensor]) -> list[float]:
    """log p(PROBE[j] | PROBE[:j]) for j >= 1 under a float32 Hugging Face model holding ``weights``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(size)).eval()
    model.load_state_dict({name: t.float() for name, t in weights.items()})
    logp = torch.log_softmax(model(input_ids=torch.tensor([PROBE])).logits[0].float(), dim=-1)
    return [float(logp[j - 1, PROBE[j]]) for j in range(1, len(PROBE))]


def sglang_python() -> str:
    return os.environ.get("LCR_SGLANG_PYTHON") or str(SGLANG_VENV_PYTHON)


def launch_config(engine: str, size: str, model_dir: Path, servers: int, log_dir: Path) -> SGLangLaunchConfig:
    """Servers of ``engine`` serving ``model_dir`` in the size's dtype, on ports the OS reports free."""
    dtype = str(SIZES[size][6]).removeprefix("torch.")
    if engine == "reference":
        return SGLangLaunchConfig(backend="reference", model_path=str(model_dir), num_servers=servers, dtype=dtype,
                                  base_port=0, log_dir=str(log_dir), startup_timeout_s=600)
    # The model directory has no tokenizer: token ids in, token ids out.
    return SGLangLaunchConfig(backend="sglang", python=sglang_python(), model_path=str(model_dir),
                              num_servers=servers, dtype=dtype, base_port=0, log_dir=str(log_dir),
                              startup_timeout_s=600, skip_tokenizer_init=True)


def raw_broadcast_seconds(sizes: list[int], receivers: int, port: int) -> float:
    """Seconds to broadcast byte buffers of ``sizes`` (the model's tensors, in order) to
    ``receivers`` processes over plain gloo: the same transfers as a sync, without HTTP, pausing,
    flushing or loading into a model. The second of two passes over the same buffers is timed: the
    first pays for first-touch page faults of fresh buffers and for connection warm-up, which a
    long-lived server pays once (its first sync), not every sync."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_receiver, args=(port, i + 1, receivers + 1, sizes)) for i in range(receivers)]
    for p in procs:
        p.start()
    # Group names are process-wide in torch: one per measurement (the port is unique).
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                              world_size=receivers + 1, rank=0, group_name=f"raw-{port}", timeout_s=600)
    buffers = [torch.ones(n, dtype=torch.uint8) for n in sizes]
    for _ in range(RAW_PASSES - 1):
        for buffer in buffers:
            broadcast_from_source(group, buffer)
    started = time.perf_counter()
    for buffer in buffers:
        broadcast_from_source(group, buffer)
    seconds = time.perf_counter() - started
    torch.distributed.destroy_process_group(group)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"raw broadcast receivers exited with {[p.exitcode for p in procs]}")
    return seconds


def _receiver(port: int, rank: int, world: int, sizes: list[int]) -> None:
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=world,
                              rank=rank, group_name=f"raw-{port}", timeout_s=600)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    for _ in range(RAW_PASSES):
        for buffer in buffers:
            broadcast_from_source(group, buffer)
    # Left alive, the group's gloo threads abort the process at exit ("terminate called without an active exception").
    torch.distributed.destroy_process_group(group)


async def launch_scores(urls: list[str]) -> list[float]:
    """A server's log-probs of PROBE[1:] with the weights it was launched with (before any sync)."""
    async with RolloutClient(ClientConfig(urls=urls)) as client:
        (scored,) = await client.score([PROBE])
    return scored.input_logprobs[1:]


def scored_logprobs(syncer: WeightSyncer) -> list[list[float]]:
    """The servers' log-probs of PROBE[1:], one list per request (as many requests as servers)."""
    return [s.input_logprobs[1:] for s in syncer.run(syncer.client.score([PROBE] * len(syncer.client.urls)))]


def max_diff(got: list[list[float]], want: list[float]) -> float:
    return max(abs(g - w) for lps in got for g, w in zip(lps, want, strict=True))


def verify(syncer: WeightSyncer, size: str, pushed: dict[str, torch.Tensor], launch_logprobs: list[float]) -> dict:
    """What the servers hold after a sync of ``pushed`` (outside the timed sync): the version they
    report, their log-probs of PROBE and how far these are from the launch weights' (and, on
    HF_CHECKED_SIZES, from a Hugging Face model's with the pushed weights)."""
    got = scored_logprobs(syncer)
    check = {"reported_version": syncer.run(syncer.client.weight_version()), "logprobs": got,
             "logprob_diff_to_launch_weights": max_diff(got, launch_logprobs)}
    if size in HF_CHECKED_SIZES:
        check["logprob_max_abs_diff"] = max_diff(got, hf_logprobs(size, pushed))
    return check


def sync_runs(engine: str, urls: list[str], state: dict[str, torch.Tensor], size: str, mode: str, repeats: int,
              bucket_bytes: int, disk_dir: Path, launch_logprobs: list[float]) -> list[dict]:
    """``repeats`` syncs of freshly perturbed copies of ``state`` in ``mode``: the syncer's stats and the
    verification of each."""
    client = RolloutClient(ClientConfig(urls=urls))
    # Checksums exist on lcr serve only, and are computed inside the timed sync: on the tiny size only.
    # tensor_format unset: the syncer picks the payload the engine reads. Group names are process-wide
    # in torch: one per set of servers.
    cfg = WeightSyncConfig(mode=mode, bucket_bytes=bucket_bytes, checksum=engine == "reference" and size == "tiny",
                           disk_dir=str(disk_dir), group_name=f"bench-{urls[0].rsplit(':', 1)[1]}")
    syncer = WeightSyncer(cfg, client)
    syncer.connect()
    runs = []
    try:
        for r in range(repeats):
            version = f"{mode}-{r + 1}"
            fresh = {name: t + 1e-3 * (r + 1) for name, t in state.items()}
            stats = syncer.sync_tensors(fresh.items(), version)
            stats.update(verify(syncer, size, fresh, launch_logprobs))
            runs.append(stats)
            del fresh
            shutil.rmtree(disk_dir / f"weights-{version}", ignore_errors=True)  # mode disk: 2 GB a sync at 1b
    finally:
        syncer.close()
    return runs


def bench_engine(engine: str, size: str, state: dict[str, torch.Tensor], model_dir: Path, args,
                 root: Path) -> dict[str, list[dict]]:
    """Start ``engine``'s servers on the size's model, run every mode on them, stop them."""
    handles = launch_servers(launch_config(engine, size, model_dir, args.servers, root / f"logs-{engine}-{size}"))
    urls = [h.url for h in handles]
    try:
        launch_logprobs = asyncio.run(launch_scores(urls))
        return {mode: sync_runs(engine, urls, state, size, mode, args.repeats, args.bucket_mb * 2**20,
                                root / f"disk-{engine}-{size}", launch_logprobs)
                for mode in args.modes}
    finally:
        stop_servers(handles)


def summary(engine: str, size: str, mode: str, runs: list[dict], params: int, total: int, raw: list[float],
            args) -> dict:
    """One result row: timings, rates and the verification of ``runs``."""
    sync_s, raw_s = statistics.median(run["seconds"] for run in runs), statistics.median(raw)
    versions_ok = sum(run["reported_version"] == run["weight_version"] for run in runs)
    row = {
        "engine": engine, "mode": mode, "size": size, "dtype": str(SIZES[size][6]).removeprefix("torch."),
        "parameters": params, "bytes": total, "servers": args.servers, "bucket_bytes": args.bucket_mb * 2**20,
        "sync_seconds": [run["seconds"] for run in runs], "sync_seconds_median": sync_s,
        "raw_broadcast_seconds": raw, "sync_GBps": total / sync_s / 1e9, "raw_GBps": total / raw_s / 1e9,
        "sync_vs_raw": raw_s / sync_s, "versions_reported_correctly": versions_ok,
        "runs": runs, "logprob_min_diff_to_launch_weights": min(run["logprob_diff_to_launch_weights"] for run in runs),
    }
    verified = versions_ok == len(runs) and row["logprob_min_diff_to_launch_weights"] > LOGPROB_TOL
    if "checksum_mismatches" in runs[0]:
        row["checksum_mismatches"] = sum(run["checksum_mismatches"] for run in runs)
        verified &= row["checksum_mismatches"] == 0
    if "logprob_max_abs_diff" in runs[0]:
        row["logprob_max_abs_diff"] = max(run["logprob_max_abs_diff"] for run in runs)
        verified &= row["logprob_max_abs_diff"] <= LOGPROB_TOL
    row["verified"] = verified
    return row


def add_cross_engine_diffs(rows: list[dict]) -> None:
    """On each SGLang row with an lcr serve row of the same size and mode: the largest |SGLang - lcr serve|
    log-prob of PROBE over the same syncs (the same pushed weights: they depend on mode and repeat only)."""
    reference = {(r["size"], r["mode"]): r for r in rows if r["engine"] == "reference"}
    for r in rows:
        ref = reference.get((r["size"], r["mode"]))
        if r["engine"] == "sglang" and ref is not None:
            r["logprob_max_abs_diff_vs_lcr_serve"] = max(
                max_diff(a["logprobs"], b["logprobs"][0]) for a, b in zip(r["runs"], ref["runs"], strict=True))


def bench_size(size: str, args, root: Path) -> list[dict]:
    model_dir = root / size
    state, params = make_model(size, model_dir)
    total = sum(t.numel() * t.element_size() for t in state.values())
    runs = {engine: bench_engine(engine, size, state, model_dir, args, root) for engine in args.engines}
    sizes = [t.numel() * t.element_size() for t in state.values()]
    del state
    raw = [raw_broadcast_seconds(sizes, args.servers, free_port()) for _ in range(args.repeats)]
    rows = [summary(engine, size, mode, mode_runs, params, total, raw, args)
            for engine, by_mode in runs.items() for mode, mode_runs in by_mode.items()]
    add_cross_engine_diffs(rows)
    return rows


def engine_versions(python: str) -> dict:
    """sglang's and torch's release in the SGLang interpreter."""
    code = "import importlib.metadata as m; print(m.version('sglang'), m.version('torch'))"
    sglang, torch_version = subprocess.run([python, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.split()
    return {"python": python, "sglang": sglang, "torch": torch_version}


def machine(engines: list[str]) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "date": datetime.date.today().isoformat(), "device": "CPU, no GPU"}
    if "sglang" in engines:
        info["sglang"] = engine_versions(sglang_python())
    return info


def verification_text(r: dict) -> str:
    parts = [f"version {r['versions_reported_correctly']}/{len(r['sync_seconds'])}"]
    if "checksum_mismatches" in r:
        parts.append(f"checksum mismatches {r['checksum_mismatches']}")
    if "logprob_max_abs_diff" in r:
        parts.append(f"logp vs HF {r['logprob_max_abs_diff']:.1e}")
    if "logprob_max_abs_diff_vs_lcr_serve" in r:
        parts.append(f"logp vs lcr serve {r['logprob_max_abs_diff_vs_lcr_serve']:.1e}")
    parts.append(f"vs launch weights >= {r['logprob_min_diff_to_launch_weights']:.1e}")
    return ", ".join(parts) + ("" if r["verified"] else " **FAILED**")


def markdown(result: dict) -> str:
    m, rows = result["machine"], result["results"]
    engines = f"SGLang {m['sglang']['sglang']} (its own venv: torch {m['sglang']['torch']})" if "sglang" in m else ""
    lines = [
        f"# Weight sync on {m['device']}: {m['platform']}, {m['cores']} cores, {m['date']}", "",
        f"Trainer (sync source): python {m['python']}, torch {m['torch']}. Engines: lcr serve (this python)"
        + (f"; {engines}" if engines else "") + ".",
        f"{rows[0]['servers']} server(s) per engine, one engine up at a time; bucket {rows[0]['bucket_bytes'] // 2**20}"
        f" MiB; median of {len(rows[0]['sync_seconds'])} syncs; wall time {result['wall_seconds'] / 60:.1f} min.",
        "Raw gloo: the same tensors' bytes broadcast to as many receiver processes as servers (second pass over "
        "the same buffers timed). "
        "Tensor payload: base64 safetensors for lcr serve, SGLang's pickle of shared-memory CPU tensors for SGLang. "
        "Disk: safetensors shards in a temp dir, read back from the page cache.",
        "Verified after every sync (untimed): the weight_version the servers report; the servers' log-probs of a "
        f"scored {len(PROBE)}-token sequence, which must differ by > {LOGPROB_TOL:g} from what the server scored with "
        "its launch weights; on tiny also lcr serve's per-tensor checksums and the log-probs vs a float32 HF model "
        f"holding the pushed weights (<= {LOGPROB_TOL:g}). 'logp vs lcr serve': largest |SGLang - lcr serve| "
        "log-prob after the same syncs (same weights; reported, not checked).", "",
        "| engine | mode | model | dtype | params | MB | servers | sync s (median) | sync GB/s | raw gloo GB/s "
        "| sync speed / raw speed | verified |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['mode']} | {r['size']} | {r['dtype']} | {r['parameters']:,} | "
                     f"{r['bytes'] / 2**20:.0f} | {r['servers']} | {r['sync_seconds_median']:.3f} | "
                     f"{r['sync_GBps']:.3f} | {r['raw_GBps']:.3f} | {r['sync_vs_raw']:.2f} | {verification_text(r)} |")
    return "\n".join(lines + [""] + result.get("notes", [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1b"], choices=sorted(SIZES))
    parser.add_argument("--servers", type=int, default=1, help="servers per engine (SGLang on CPU: ~3.5 GB each)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--note", action="append", default=[], help="a line appended to the markdown (repeatable)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "weight_sync"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for size in args.sizes for row in bench_size(size, args, Path(tmp))]
    result = {"machine": machine(args.engines), "command": " ".join(sys.argv[1:]),
              "wall_seconds": time.perf_counter() - started, "results": rows, "notes": args.note}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    Path(args.out + ".md").write_text(text)
    print(text)
    if not all(r["verified"] for r in rows):
        sys.exit("some syncs were not verified: see the 'verified' column")


if __name__ == "__main__":
    main()
