"""The rollout-server launcher: SGLang command lines (sglang is not installed here) and real launches of
``lcr serve`` reference servers, including the ways a launch fails."""

from __future__ import annotations

import socket

import pytest

from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.sglang import (
    SGLangLaunchConfig,
    ServerStartError,
    launch_servers,
    reference_server_command,
    router_command,
    server_env,
    sglang_server_command,
    stop_servers,
)
from tests.tiny_hf import make_tiny_hf


def _port_listened(port: int) -> bool:
    """Whether some process listens on the port (connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf("llama", tmp_path_factory.mktemp("model"))


def test_sglang_command_uses_server_args_flags():
    # Flags as ServerArgs fields in sglang's python/sglang/srt/server_args.py (field -> --field-name).
    cfg = SGLangLaunchConfig(model_path="/ckpt/llama", num_servers=2, tp_size=2, host="0.0.0.0", base_port=31000,
                             dtype="bfloat16", mem_fraction_static=0.7, api_key="k", random_seed=3,
                             deterministic=True, extra_args=["--disable-radix-cache"], python="py")
    assert sglang_server_command(cfg, 31001) == [
        "py", "-m", "sglang.launch_server", "--model-path", "/ckpt/llama", "--tp-size", "2", "--host", "0.0.0.0",
        "--port", "31001", "--dtype", "bfloat16", "--mem-fraction-static", "0.7", "--api-key", "k",
        "--random-seed", "3", "--enable-deterministic-inference", "--disable-radix-cache"]
    assert cfg.server_urls() == ["http://0.0.0.0:31000", "http://0.0.0.0:31001"]
    minimal = SGLangLaunchConfig(model_path="/m", python="py")
    assert sglang_server_command(minimal, 30000) == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--tp-size", "1", "--host", "127.0.0.1",
        "--port", "30000", "--dtype", "auto"]


def test_each_server_gets_its_own_gpus():
    cfg = SGLangLaunchConfig(model_path="/m", num_servers=2, tp_size=2)
    assert [server_env(cfg, k, {})["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["0,1", "2,3"]
    assert [server_env(cfg, k, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] for k in range(2)] == [
        "4,5", "6,7"]  # ids index an inherited CUDA_VISIBLE_DEVICES (SLURM, containers)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=4,5 lists 2"):
        server_env(cfg, 1, {"CUDA_VISIBLE_DEVICES": "4,5"})
    cfg = SGLangLaunchConfig(model_path="/m", num_servers=2, gpu_ids=[6, 3])
    assert [server_env(cfg, k, {})["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["6", "3"]
    ref = SGLangLaunchConfig(backend="reference", model_path="/m", env={"OMP_NUM_THREADS": "1"})
    assert server_env(ref, 0, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}


def test_router_and_reference_commands():
    cfg = SGLangLaunchConfig(model_path="/m", router=True, router_port=30100, router_policy="round_robin", python="py")
    assert router_command(cfg, ["http://a:1", "http://b:2"]) == [
        "py", "-m", "sglang_router.launch_router", "--worker-urls", "http://a:1", "http://b:2",
        "--host", "127.0.0.1", "--port", "30100", "--policy", "round_robin"]
    ref = SGLangLaunchConfig(backend="reference", model_path="/m", api_key="k", dtype="bfloat16", python="py")
    assert reference_server_command(ref, 5) == [
        "py", "-m", "megatron_lcr.cli", "serve", "--model", "/m", "--host", "127.0.0.1", "--port", "5",
        "--dtype", "bfloat16", "--api-key", "k"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_servers=2, ports=[1]), "ports lists 1"),
    (dict(num_servers=2, ports=[7, 7]), "distinct"),
    (dict(num_servers=2, tp_size=2, gpu_ids=[0, 1, 2]), "gpu_ids lists 3"),
    (dict(backend="reference", router=True), "router=True needs backend 'sglang'"),
    (dict(dtype="fp8"), "dtype"),
    (dict(mem_fraction_static=1.5), "mem_fraction_static"),
    (dict(router_policy="fastest"), "router_policy"),
])
def test_launch_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SGLangLaunchConfig(model_path="/m", **kwargs)


def test_launch_fails_with_log_tail_on_port_taken_and_bad_model(model_dir, tmp_path):
    """(Restarting a handle is tested with the client: tests/rollout/test_client.py kills and restarts one.)"""
    # A healthy server on the port must not be mistaken for the one we start there.
    port = free_port()
    cfg = dict(backend="reference", startup_timeout_s=120, ports=[port], env={"OMP_NUM_THREADS": "1"})
    (holder,) = launch_servers(SGLangLaunchConfig(model_path=str(model_dir), log_dir=str(tmp_path / "a"), **cfg))
    try:
        with pytest.raises(ServerStartError) as err:
            launch_servers(SGLangLaunchConfig(model_path=str(model_dir), log_dir=str(tmp_path / "b"), **cfg))
        message = str(err.value)
        assert "\n" not in message and "server0" in message and "exited with code" in message
        assert "address already in use" in message and str(tmp_path / "b" / "server0.log") in message
        # The holder is untouched; stop() frees the port and leaves no process behind.
        assert holder.alive() and holder.listening()
    finally:
        stop_servers([holder])
    assert not holder.alive() and not _port_listened(port)
    with pytest.raises(ServerStartError, match="does not exist") as err:
        launch_servers(SGLangLaunchConfig(model_path=str(tmp_path / "missing"), log_dir=str(tmp_path / "c"),
                                          backend="reference", ports=[free_port()]))
    assert "\n" not in str(err.value)
