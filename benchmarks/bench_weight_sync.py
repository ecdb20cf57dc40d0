"""Benchmark: weight sync into real reference servers vs the raw gloo broadcast rate, same run.

    python benchmarks/bench_weight_sync.py [--servers 2] [--sizes tiny 1b] [--modes distributed tensor]
                                           [--repeats 3] [--bucket-mb 512]

For each model size a random Llama-shaped Hugging Face model is written to a temp directory, N
``lcr serve`` processes load it, and this process (the sync source) pushes a fresh set of tensors
with ``WeightSyncer.sync_tensors`` in each mode: ``distributed`` (pause, bucketed update requests +
gloo broadcasts, flush, continue) and ``tensor`` (pause, one ``/update_weights_from_tensor`` request
per bucket and server carrying base64 safetensors, the CPU format, flush, continue). Then N receiver
processes join a plain gloo group of the same size and this process broadcasts the same tensors'
bytes, one broadcast per tensor as the distributed sync does: that transport's ceiling on this
machine, so sync / raw is the share of time that is transfer (for ``tensor``, a comparison with the
same ceiling). Results go to benchmarks/results/weight_sync.{json,md} with machine info.
CPU only: no GPU figure (NCCL, CUDA IPC) is measured here.
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

from megatron_lcr.parallel.env import free_port, free_ports  # noqa: E402
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
    # Group names are process-wide in torch: one per measurement (the port is unique).
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port,
                              world_size=receivers + 1, rank=0, group_name=f"raw-{port}", timeout_s=600)
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
                              rank=rank, group_name=f"raw-{port}", timeout_s=600)
    broadcast_from_source(group, torch.empty(1, dtype=torch.uint8))
    for buffer in [torch.empty(n, dtype=torch.uint8) for n in sizes]:
        broadcast_from_source(group, buffer)


def sync_runs(urls: list[str], state: dict[str, torch.Tensor], mode: str, repeats: int, bucket_bytes: int,
              checksum: bool) -> list[dict]:
    """``repeats`` syncs of freshly perturbed copies of ``state`` in ``mode``; the syncer's stats of each."""
    client = SGLangClient(ClientConfig(urls=urls))
    # Group names are process-wide in torch: one per set of servers.
    cfg = WeightSyncConfig(mode=mode, bucket_bytes=bucket_bytes, checksum=checksum, tensor_format="safetensors",
                           group_name=f"bench-{urls[0].rsplit(':', 1)[1]}")
    syncer = WeightSyncer(cfg, client)
    syncer.connect()
    runs = []
    try:
        for r in range(repeats):
            fresh = {name: t + 1e-3 * (r + 1) for name, t in state.items()}
            runs.append(syncer.sync_tensors(fresh.items(), f"{mode}-{r + 1}"))
            del fresh
    finally:
        syncer.close()
    return runs


def bench_size(size: str, servers: int, modes: list[str], repeats: int, bucket_bytes: int, root: Path) -> list[dict]:
    model_dir = root / size
    state, params = make_model(size, model_dir)
    total = sum(t.numel() * t.element_size() for t in state.values())
    launch = SGLangLaunchConfig(backend="reference", model_path=str(model_dir), num_servers=servers,
                                dtype=str(SIZES[size][6]).removeprefix("torch."), ports=free_ports(servers),
                                log_dir=str(root / f"logs-{size}"), startup_timeout_s=600)
    handles = launch_servers(launch)
    try:
        runs = {mode: sync_runs([h.url for h in handles], state, mode, repeats, bucket_bytes, size == "tiny")
                for mode in modes}
    finally:
        stop_servers(handles)
    sizes = [t.numel() * t.element_size() for t in state.values()]
    raw = [raw_broadcast_seconds(sizes, servers, free_port()) for _ in range(repeats)]
    raw_s = statistics.median(raw)
    rows = []
    for mode, mode_runs in runs.items():
        sync_s = statistics.median(run["seconds"] for run in mode_runs)
        rows.append({
            "size": size, "mode": mode, "parameters": params, "bytes": total, "servers": servers,
            "bucket_bytes": bucket_bytes, "sync_seconds": [run["seconds"] for run in mode_runs],
            "raw_broadcast_seconds": raw, "sync_GBps": total / sync_s / 1e9, "raw_GBps": total / raw_s / 1e9,
            "sync_vs_raw": raw_s / sync_s, "checksum_mismatches": mode_runs[-1].get("checksum_mismatches"),
        })
    return rows


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": torch.get_num_threads(), "platform": platform.platform(),
            "date": datetime.date.today().isoformat(), "device": "CPU (no GPU)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1b"], choices=sorted(SIZES))
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["distributed", "tensor"], choices=["distributed", "tensor"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "weight_sync"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for size in args.sizes
                for row in bench_size(size, args.servers, args.modes, args.repeats, args.bucket_mb * 2**20, Path(tmp))]
    result = {"machine": machine(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Weight sync on {result['machine']['device']}, {result['machine']['platform']}",
             f"python {result['machine']['python']}, torch {result['machine']['torch']}, {result['machine']['date']}",
             "", "| model | mode | params | MB | servers | sync s (median) | sync GB/s | raw gloo GB/s "
             "| sync speed / raw speed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['mode']} | {r['parameters']:,} | {r['bytes'] / 2**20:.0f} | {r['servers']} | "
                     f"{statistics.median(r['sync_seconds']):.3f} | {r['sync_GBps']:.3f} | {r['raw_GBps']:.3f} | "
                     f"{r['sync_vs_raw']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
