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
    from megatron_lcr.rollout.engines import RolloutConfig

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


# ---- the update group's address (issue 13, item 5) ----------------------------------------------


def test_config_validation_of_retention_and_timeout():
    with pytest.raises(ValueError, match="disk_keep must be >= 1 .*, got 0"):
        WeightSyncConfig(mode="disk", disk_dir="/w", disk_keep=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        WeightSyncConfig(timeout_s=0)


@pytest.mark.parametrize("urls", [["http://127.0.0.1:30000"],
                                  ["http://localhost:30000", "http://[::1]:30001", "http://0.0.0.0:30002"]])
def test_address_is_loopback_while_every_engine_is_on_this_host(urls):
    from megatron_lcr.rollout.weight_sync import update_group_address

    # MASTER_ADDR names this node for the trainer's peers; local engines need none of it.
    assert update_group_address("", urls, {"MASTER_ADDR": "gpu07-ib"})[0] == "127.0.0.1"
    assert update_group_address("10.0.0.3", urls, {}) == ("10.0.0.3", "rollout.sync.master_address")


def test_address_for_remote_engines_is_the_configured_one_then_master_addr():
    from megatron_lcr.rollout.weight_sync import update_group_address

    remote = ["http://127.0.0.1:30000", "http://10.0.0.5:30000"]
    assert update_group_address("10.0.0.3", remote, {"MASTER_ADDR": "gpu07-ib"})[0] == "10.0.0.3"
    assert update_group_address("", remote, {"MASTER_ADDR": "gpu07-ib"}) == ("gpu07-ib", "MASTER_ADDR")


def test_address_for_remote_engines_without_master_addr_is_this_hosts_on_the_route():
    from megatron_lcr.parallel.env import free_port, is_loopback, routable_address
    from megatron_lcr.rollout.weight_sync import update_group_address

    # A loopback MASTER_ADDR (single node, or unset) is skipped; the route to the engine picks the
    # interface (a UDP connect: no packet leaves). Documentation addresses: nothing is contacted.
    address, origin = update_group_address("", ["http://192.0.2.10:30000"], {"MASTER_ADDR": "127.0.0.1"})
    if routable_address("192.0.2.10") is None:
        pytest.skip("no route to 192.0.2.10 on this machine (the host-name fallback is tested below)")
    assert origin == "the route to 192.0.2.10" and not is_loopback(address)
    assert free_port(address) > 0  # an address of this host: the engines find the store there


def test_address_without_a_route_falls_back_to_the_host_name_and_a_loopback_one_is_refused():
    import socket

    from megatron_lcr.parallel.env import is_loopback
    from megatron_lcr.rollout.weight_sync import check_update_group_address, update_group_address

    urls = ["http://255.255.255.255:30000"]  # a UDP connect there is refused: no route to learn from
    address, origin = update_group_address("", urls, {})
    name = socket.gethostname()
    assert (address, origin) == (socket.gethostbyname(name), f"host name {name!r}")
    if is_loopback(address):  # e.g. Debian's /etc/hosts maps the host name to 127.0.1.1
        with pytest.raises(ValueError, match=rf"'{address}' \(auto: host name '{name}'\) is loopback but engine "):
            check_update_group_address(address, urls, origin)
    else:
        check_update_group_address(address, urls, origin)


def test_loopback_address_with_a_remote_engine_is_a_one_line_error_naming_both():
    from megatron_lcr.rollout.weight_sync import check_update_group_address

    urls = ["http://127.0.0.1:30000", "http://10.0.0.5:30000"]
    with pytest.raises(ValueError) as err:
        check_update_group_address("127.0.0.1", urls)
    assert str(err.value) == ("rollout.sync.master_address '127.0.0.1' is loopback but engine http://10.0.0.5:30000 "
                              "is on another host: set it to this node's routable address")
    for address in ("localhost", "::1", "0.0.0.0"):
        with pytest.raises(ValueError, match="is loopback but engine http://10.0.0.5:30000"):
            check_update_group_address(address, urls)
    with pytest.raises(ValueError, match="engine http://node05:30000 is on another host"):
        check_update_group_address("127.0.0.1", ["http://node05:30000"])  # a name may be anywhere
    check_update_group_address("127.0.0.1", ["http://127.0.0.1:30000", "http://localhost:30001"])
    check_update_group_address("10.0.0.3", urls)
    check_update_group_address("", urls)  # auto: resolved, then checked, when the group is formed


# ---- limits (issue 13, item 4) -------------------------------------------------------------------


def test_event_loop_runs_without_a_limit_unless_given_and_cancels_at_one():
    import asyncio
    import threading

    from megatron_lcr.rollout.weight_sync import EventLoopThread

    loop = EventLoopThread()
    cancelled = threading.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        with pytest.raises(TimeoutError):
            loop.run(slow(), timeout=0.05)
        assert cancelled.wait(5), "the coroutine kept running after its limit"
        assert loop.run(asyncio.sleep(0.2, result=7)) == 7
    finally:
        loop.close()


# ---- disk copies (issue 13, item 6) --------------------------------------------------------------


@pytest.mark.parametrize("keep, left", [(1, ["weights-11"]), (2, ["weights-10", "weights-11"]),
                                        (4, ["weights-10", "weights-11", "weights-2", "weights-9"])])
def test_prune_keeps_the_newest_copies_by_write_order_not_by_name(tmp_path, keep, left):
    import os

    from megatron_lcr.rollout.weight_sync import prune_weight_copies

    names = ["weights-2", "weights-0", "weights-9", "weights-10", "weights-11", ".weights-12.tmp-ab_3x",
             ".weights-5.old-q9", "notes"]
    for age, name in enumerate(names):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    (tmp_path / "weights-1.txt").write_text("a file, not a copy")
    # This run wrote 9, 10, 11 ('10' < '9' as strings); weights-2 is an earlier run's; the engines
    # were launched from weights-0; the dot-directories are atomic_dir's leftovers of a crashed write.
    written = [tmp_path / "weights-9", tmp_path / "weights-10", tmp_path / "weights-11"]
    deleted = prune_weight_copies(tmp_path, written, keep, protected=[str(tmp_path / "weights-0")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(left + ["notes", "weights-0", "weights-1.txt"])
    assert {p.name for p in deleted} == set(names) - set(left) - {"notes", "weights-0"}


@pytest.fixture
def disk_server(tmp_path):
    """A real `lcr serve`, launched from a directory inside the sync directory (which pruning must spare)."""
    from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers

    root = tmp_path
    launch = make_tiny_hf("llama", root / "sync" / "weights-0", seed=1)
    cfg = SGLangLaunchConfig(backend="reference", model_path=str(launch), dtype="float32", base_port=0,
                             log_dir=str(root / "logs"), startup_timeout_s=120)
    handles = launch_servers(cfg)
    yield handles[0].url, root / "sync", make_tiny_hf("llama", root / "trainer", seed=0)
    stop_servers(handles)


@pytest.mark.parametrize("keep", [1, 2])
def test_disk_mode_leaves_at_most_disk_keep_copies_and_the_engine_holds_the_last(disk_server, keep):
    from megatron_lcr.rollout.client import ClientConfig, RolloutClient
    from megatron_lcr.rollout.weight_sync import WeightSyncer

    url, disk_dir, trainer = disk_server
    for stale in ("weights-3", ".weights-4.tmp-crash"):  # an earlier run's copy, a crashed write
        (disk_dir / stale).mkdir()
    base = load_file(str(trainer / "model.safetensors"))
    cfg = WeightSyncConfig(mode="disk", disk_dir=str(disk_dir), disk_keep=keep, checksum=True, bucket_bytes=2**16)
    syncer = WeightSyncer(cfg, RolloutClient(ClientConfig(urls=[url])), gpu_engines=False)
    try:
        syncer.connect()
        start = {1: 8, 2: 98}[keep]  # versions cross a digit: '10' sorts before '9', '100' before '98'
        versions = [str(start + step) for step in range(4)]
        for step, version in enumerate(versions):
            weights = {name: t * (1 + 0.01 * step) for name, t in base.items()}  # each step's own weights
            stats = syncer.sync_tensors(iter(weights.items()), version)
            assert stats["checksum_mismatches"] == 0  # the engine holds exactly this step's tensors
            copies = {p.name for p in disk_dir.iterdir() if p.name != "weights-0"}
            newest = {f"weights-{v}" for v in versions[max(0, step + 1 - keep):step + 1]}
            assert len(copies) <= keep and newest <= copies, (step, copies)  # older ones: an earlier run's
        assert copies == {f"weights-{v}" for v in versions[-keep:]}
        assert syncer.run(syncer.client.weight_version()) == versions[-1]
        assert (disk_dir / "weights-0" / "model.safetensors").is_file()  # the launch directory is spared
    finally:
        syncer.close()


def test_distributed_sync_reaches_an_engine_at_this_hosts_routable_address(tmp_path, monkeypatch):
    # The engine is addressed by a non-loopback URL, as one on another node would be: the syncer picks
    # this host's address on the route to it, and the engine finds the group's store there.
    from megatron_lcr.parallel.env import is_loopback, routable_address
    from megatron_lcr.rollout.client import ClientConfig, RolloutClient
    from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers
    from megatron_lcr.rollout.weight_sync import WeightSyncer

    own = routable_address("192.0.2.10")
    if own is None or is_loopback(own):
        pytest.skip("this machine has no non-loopback interface with a route")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    served, trainer = make_tiny_hf("llama", tmp_path / "served", seed=1), make_tiny_hf("llama", tmp_path / "t", seed=0)
    handles = launch_servers(SGLangLaunchConfig(backend="reference", model_path=str(served), host=own, dtype="float32",
                                                base_port=0, log_dir=str(tmp_path / "logs"), startup_timeout_s=120))
    syncer = WeightSyncer(WeightSyncConfig(mode="distributed", checksum=True, timeout_s=60),
                          RolloutClient(ClientConfig(urls=[handles[0].url])), gpu_engines=False)
    try:
        syncer.connect()
        assert syncer.master_address == own
        stats = syncer.sync_tensors(iter(load_file(str(trainer / "model.safetensors")).items()), "1")
        assert stats["checksum_mismatches"] == 0
        assert syncer.run(syncer.client.weight_version()) == "1"
        # An address of another host (TEST-NET-3) could never host the store: refused before any join.
        elsewhere = WeightSyncer(WeightSyncConfig(mode="distributed", master_address="203.0.113.9", timeout_s=60),
                                 RolloutClient(ClientConfig(urls=[handles[0].url])), gpu_engines=False)
        try:
            with pytest.raises(ValueError, match="master_address '203.0.113.9' is not an address of this host"):
                elsewhere.connect()
        finally:
            elsewhere.close()
    finally:
        syncer.close()
        stop_servers(handles)
