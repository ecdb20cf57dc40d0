"""Benchmark: weight sync into real reference servers vs the raw gloo broadcast rate, same run.

    python benchmarks/bench_weight_sync.py [--servers 2] [--sizes tiny 1b] [--repeats 3] [--bucket-mb 512]

For each model size a random Llama-shaped Hugging Face model is written to a temp directory, N
``lcr serve`` processes load it, and this process (the sync source) pushes a fresh set of tensors
with ``WeightSyncer.sync_tensors`` (mode distributed: pause, bucketed update requests + gloo
broadcasts, flush, continue). Then N receiver processes join a plain gloo group of the same size
and this process broadcasts the same tensors' bytes, one broadcast per tensor as the sync does:
the transport's ceiling on this machine, so sync / raw is the share of time that is transfer. Results go to benchmarks/results/weight_sync.{json,md} with machine info.
CPU only: no GPU figure is measured here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_lcr.parallel.env import free_port  # noqa: E402
from megatron_lcr.rollout.client import ClientConfig, SGLangClient  # noqa: E402
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers  # noqa: E402
from megatron_lcr.rollout.update_group import broadcast_from_source, join_update_group  # noqa: E402
from megatron_lcr.rollout.weight_sync import WeightSyncConfig, WeightSyncer  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, dtype)
    "tiny": (128, 352, 4, 4, 2, 128, torch.float32),
    "1b": (2048, 5632, 20, 16, 4, 32000, torch.bfloat16),
}


def make_model(size: str, out: Path) -> tuple[dict[str, torch.Tensor], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, dtype = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=gen) * 0.02).to(dtype) for name, p in model.state_dict().items()}
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(state)
    model.save_pretrained(out)
    params = sum(t.numel() for t in state.values())
    return state, params


def raw_broadcast_seconds(sizes: list[int], receivers: int, port: int) -> float:
    """Seconds to broadcast byte buffers of ``sizes`` (the model's tensors, in order) to
    ``receivers`` processes over plain gloo: the same transfers as a sync, without HTTP, pausing,
    flushing or loading into a model."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_receiver, args=(port, i + 1, receivers + 1, sizes)) for i in range(receivers)]
    for p in procs:
        p.start()
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                              world_size=receivers + 1, rank=0, group_name="raw", timeout_s=600)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    broadcast_from_source(group, torch.empty(1, dtype=torch.uint8))  # warm-up: every receiver connected
    started = time.perf_counter()
    for buffer in buffers:
        broadcast_from_source(group, buffer)
    seconds = time.perf_counter() - started
    for p in procs:
        p.join()
    return seconds


def _receiver(port: int, rank: int, world: int, sizes: list[int]) -> None:
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=world,
                              rank=rank, group_name="raw", timeout_s=600)
    broadcast_from_source(group, torch.empty(1, dtype=torch.uint8))
    for buffer in [torch.empty(n, dtype=torch.uint8) for n in sizes]:
        broadcast_from_source(group, buffer)


def bench_size(size: str, servers: int, repeats: int, bucket_bytes: int, root: Path) -> dict:
    model_dir = root / size
    state, params = make_model(size, model_dir)
    total = sum(t.numel() * t.element_size() for t in state.values())
    launch = SGLangLaunchConfig(backend="reference", model_path=str(model_dir), num_servers=servers,
                                dtype=str(SIZES[size][6]).removeprefix("torch."), base_port=free_port(),
                                log_dir=str(root / f"logs-{size}"), startup_timeout_s=600)
    handles = launch_servers(launch)
    try:
        client = SGLangClient(ClientConfig(urls=[h.url for h in handles]))
        syncer = WeightSyncer(WeightSyncConfig(bucket_bytes=bucket_bytes, checksum=size == "tiny"), client)
        syncer.connect()
        runs = []
        for r in range(repeats):
            fresh = {name: t + 1e-3 * (r + 1) for name, t in state.items()}
            runs.append(syncer.sync_tensors(fresh.items(), str(r + 1)))
        syncer.close()
    finally:
        stop_servers(handles)
    sizes = [t.numel() * t.element_size() for t in state.values()]
    raw = [raw_broadcast_seconds(sizes, servers, free_port()) for _ in range(repeats)]
    sync_s = statistics.median(run["seconds"] for run in runs)
    raw_s = statistics.median(raw)
    return {
        "size": size, "parameters": params, "bytes": total, "servers": servers, "bucket_bytes": bucket_bytes,
        "sync_seconds": [run["seconds"] for run in runs], "raw_broadcast_seconds": raw,
        "sync_GBps": total / sync_s / 1e9, "raw_GBps": total / raw_s / 1e9, "sync_vs_raw": raw_s / sync_s,
        "checksum_mismatches": runs[-1].get("checksum_mismatches"),
    }


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": torch.get_num_threads(), "platform": platform.platform(),
            "date": datetime.date.today().isoformat(), "device": "CPU (no GPU)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1b"], choices=sorted(SIZES))
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "weight_sync"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(size, args.servers, args.repeats, args.bucket_mb * 2**20, Path(tmp)) for size in args.sizes]
    result = {"machine": machine(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Weight sync on {result['machine']['device']}, {result['machine']['platform']}",
             f"python {result['machine']['python']}, torch {result['machine']['torch']}, {result['machine']['date']}",
             "", "| model | params | MB | servers | sync s (median) | sync GB/s | raw gloo GB/s | sync speed / raw speed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['parameters']:,} | {r['bytes'] / 2**20:.0f} | {r['servers']} | "
                     f"{statistics.median(r['sync_seconds']):.3f} | {r['sync_GBps']:.3f} | {r['raw_GBps']:.3f} | "
                     f"{r['sync_vs_raw']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
