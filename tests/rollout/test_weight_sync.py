"""Trainer side of weight sync: gathering Megatron shards into full HF tensors, and bucketing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_lcr.rollout.weight_sync import WeightSyncConfig, buckets, resolve_sync_config
from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import make_tiny_hf


@pytest.mark.dist
@pytest.mark.parametrize("family, tp, pp, nproc", [("qwen2", 2, 2, 4), ("llama", 1, 1, 2)],
                         ids=["qwen2-tp2-pp2", "llama-dp2"])
def test_source_rank_receives_every_hf_tensor_exactly(tmp_path, family, tp, pp, nproc):
    # Qwen2 is tied (the last stage's embedding copy must not be sent twice) and has QKV bias; the
    # DP=2 case checks that the second replica stays silent.
    hf = make_tiny_hf(family, tmp_path / "hf")
    out = tmp_path / "gathered.json"
    run_torchrun(WORKERS / "sync_gather.py", nproc, [str(hf), str(tp), str(pp), str(out)])
    result = json.loads(out.read_text())
    assert sorted(result["names"]) == result["expected"]  # every tensor, none twice
    assert all(result["identical"].values()), [n for n, ok in result["identical"].items() if not ok]


def test_buckets_respect_the_byte_limit_and_keep_order():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 20, 5, 100, 1, 1])]
    # 4 bytes per element: sizes 40, 80, 20, 400, 4, 4 bytes; limit 100 -> [40], [80, 20], [400 alone], [4, 4]
    got = [[name for name, _ in bucket] for bucket in buckets(tensors, 100)]
    assert got == [["t0"], ["t1", "t2"], ["t3"], ["t4", "t5"]]
    assert [n for b in got for n in b] == [n for n, _ in tensors]
    assert list(buckets([], 100)) == []


def test_config_validation():
    with pytest.raises(ValueError, match="disk_dir"):
        WeightSyncConfig(mode="disk")
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1, got 0"):
        WeightSyncConfig(bucket_bytes=0)
    with pytest.raises(ValueError, match="tensor_format must be one of sglang, safetensors, got 'pickle'"):
        WeightSyncConfig(mode="tensor", tensor_format="pickle")
    with pytest.raises(ValueError, match="backend must be nccl or gloo .*, got 'mpi'"):
        WeightSyncConfig(backend="mpi")


@pytest.mark.parametrize(
    ("cuda", "gpu_engines", "backend", "tensor_format"),
    [(True, True, "nccl", "sglang"), (True, False, "gloo", None), (False, True, "gloo", None),
     (False, False, "gloo", None)],
)
def test_unset_transport_follows_where_trainer_and_engines_run(cuda, gpu_engines, backend, tensor_format):
    # NCCL and SGLang's CUDA-IPC payload only between GPU processes: a CPU reference server beside a
    # GPU trainer gets gloo, and the payload its engine reads (engine_tensor_format). Explicit choices are kept.
    got = resolve_sync_config(WeightSyncConfig(mode="tensor"), cuda=cuda, gpu_engines=gpu_engines)
    assert (got.backend, got.tensor_format) == (backend, tensor_format)
    kept = resolve_sync_config(WeightSyncConfig(backend="gloo", tensor_format="safetensors"), cuda=True, gpu_engines=True)
    assert (kept.backend, kept.tensor_format) == ("gloo", "safetensors")


def test_cpu_tensor_payload_is_the_one_each_engine_reads():
    from megatron_lcr.rollout.weight_sync import engine_tensor_format

    assert engine_tensor_format(["sglang", "sglang"]) == "sglang"  # SGLang unpickles only its own form
    assert engine_tensor_format(["lcr-serve"]) == engine_tensor_format(["vllm"]) == "safetensors"
    with pytest.raises(ValueError, match="one payload for every engine.*rollout.sync.tensor_format"):
        engine_tensor_format(["sglang", "lcr-serve"])


def test_engines_count_as_gpu_engines_where_their_device_says():
    import torch

    from megatron_lcr.rollout.sglang import SGLangLaunchConfig
    from megatron_lcr.train.engines import RolloutConfig

    assert not RolloutConfig().gpu_engines  # the default: launched `lcr serve` reference servers
    assert RolloutConfig(server=SGLangLaunchConfig(backend="sglang", device="cuda")).gpu_engines
    assert not RolloutConfig(server=SGLangLaunchConfig(backend="sglang", device="cpu")).gpu_engines
    auto = RolloutConfig(server=SGLangLaunchConfig(backend="vllm")).gpu_engines
    assert auto == torch.cuda.is_available()  # 'auto': where the launching process is
    assert RolloutConfig(urls=["http://127.0.0.1:30000"]).gpu_engines


@pytest.fixture
def two_reference_servers(tmp_path):
    """Two real `lcr serve` processes holding a *different* model (seed 1) than the trainer's."""
    from megatron_lcr.parallel.env import free_ports
    from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers

    other = make_tiny_hf("llama", tmp_path / "other", seed=1)
    cfg = SGLangLaunchConfig(backend="reference", model_path=str(other), num_servers=2, dtype="float32",
                             ports=free_ports(2), log_dir=str(tmp_path / "logs"), startup_timeout_s=120)
    handles = launch_servers(cfg)
    yield [h.url for h in handles]
    stop_servers(handles)


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["distributed", "tensor"])
def test_tp2_trainer_sync_into_two_servers_matches_logprobs_and_checksums(tmp_path, two_reference_servers, mode):
    # Mode 'tensor' on CPU sends the pickle-free safetensors payload (tensor_format picked automatically).
    hf = make_tiny_hf("llama", tmp_path / "trainer", seed=0)
    out = tmp_path / "sync.json"
    run_torchrun(WORKERS / "sync_servers.py", 2, [str(hf), ",".join(two_reference_servers), str(out), mode])
    result = json.loads(out.read_text())
    hf_bytes = sum(t.numel() * t.element_size() for t in load_file(str(hf / "model.safetensors")).values())
    for label, version in (("first", "1"), ("after_step", "2")):
        r = result[label]
        # fp32 on both sides, same maths, different kernels: ~1e-6 in practice.
        assert r["max_diff"] <= 1e-4 and r["max_diff_any_server"] <= 1e-4, r
        assert r["servers"] == sorted(two_reference_servers)  # both servers answered
        assert r["versions"] == [version]
        assert r["stats"]["checksum_mismatches"] == 0
        assert r["stats"]["bytes"] == hf_bytes  # every tensor, once
    # The optimizer step changed the weights and the servers followed.
    before, after = result["first"]["trainer_logprobs"], result["after_step"]["trainer_logprobs"]
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3
