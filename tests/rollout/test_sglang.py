"""The rollout-server launcher: SGLang and vLLM command lines and environments (GPU and CPU), real
launches of ``lcr serve`` reference servers, including the ways a launch fails, and a real SGLang
server on CPU (when its venv exists: ``bash tools/engine_venv.sh sglang``).

The watchdog every server runs under is tested in test_watchdog.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.sglang import (
    engine_venv,
    CPU_STUBS_DIR,
    PACKAGE_PARENT,
    SGLangLaunchConfig,
    ServerStartError,
    launch_servers,
    reference_server_command,
    router_command,
    server_env,
    sglang_server_command,
    stop_servers,
    vllm_server_command,
)
from tests.distributed import REPO_ROOT
from tests.engine_envs import engine_python
from tests.tiny_hf import make_tiny_hf

TINY_BASE = REPO_ROOT / "examples" / "tiny" / "base"


SGLANG_PYTHON = engine_python("sglang")[0]


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
                             deterministic=True, extra_args=["--disable-radix-cache"], python="py", device="cuda")
    assert sglang_server_command(cfg, 31001) == [
        "py", "-m", "sglang.launch_server", "--model-path", "/ckpt/llama", "--tp-size", "2", "--host", "0.0.0.0",
        "--port", "31001", "--dtype", "bfloat16", "--mem-fraction-static", "0.7", "--api-key", "k",
        "--random-seed", "3", "--enable-deterministic-inference", "--disable-radix-cache"]
    assert cfg.server_urls() == ["http://0.0.0.0:31000", "http://0.0.0.0:31001"]
    minimal = SGLangLaunchConfig(model_path="/m", python="py", device="cuda")
    assert sglang_server_command(minimal, 30000) == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--tp-size", "1", "--host", "127.0.0.1",
        "--port", "30000", "--dtype", "auto"]


def test_each_server_gets_its_own_gpus():
    cfg = SGLangLaunchConfig(model_path="/m", num_servers=2, tp_size=2, device="cuda")
    assert [server_env(cfg, k, {})["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["0,1", "2,3"]
    assert [server_env(cfg, k, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] for k in range(2)] == [
        "4,5", "6,7"]  # ids index an inherited CUDA_VISIBLE_DEVICES (SLURM, containers)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=4,5 lists 2"):
        server_env(cfg, 1, {"CUDA_VISIBLE_DEVICES": "4,5"})
    cfg = SGLangLaunchConfig(model_path="/m", num_servers=2, gpu_ids=[6, 3], device="cuda")
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


def test_sglang_on_cpu_gets_cpu_flags_small_pools_and_the_import_stub():
    cfg = SGLangLaunchConfig(model_path="/m", python="py", device="cpu", num_servers=2)
    assert sglang_server_command(cfg, 7) == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--tp-size", "1", "--host", "127.0.0.1",
        "--port", "7", "--dtype", "float32", "--device", "cpu", "--attention-backend", "torch_native",
        "--max-total-tokens", "8192", "--max-running-requests", "8"]
    given = replace(cfg, dtype="bfloat16", context_length=2048, max_total_tokens=16384, max_running_requests=2)
    assert sglang_server_command(given, 7)[12:] == [
        "bfloat16", "--device", "cpu", "--attention-backend", "torch_native", "--context-length", "2048",
        "--max-total-tokens", "16384", "--max-running-requests", "2"]
    # On GPUs the sizes are SGLang's unless given.
    assert sglang_server_command(replace(cfg, device="cuda", context_length=4096), 7)[12:] == [
        "auto", "--context-length", "4096"]
    # The stub first on PYTHONPATH; an inherited SGLANG_USE_CPU_ENGINE dropped; GPUs left as inherited.
    inherited = {"PYTHONPATH": "/x", "SGLANG_USE_CPU_ENGINE": "1", "CUDA_VISIBLE_DEVICES": "3"}
    assert server_env(cfg, 1, inherited) == {"PYTHONPATH": f"{CPU_STUBS_DIR}{os.pathsep}/x",
                                             "CUDA_VISIBLE_DEVICES": "3"}
    own = replace(cfg, env={"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": "/mine"})  # asked for: kept
    assert server_env(own, 0, {}) == {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": f"{CPU_STUBS_DIR}{os.pathsep}/mine"}


def test_cpu_stub_satisfies_sglangs_import_and_refuses_to_run():
    # The import SGLang's rotary embedding makes on CPU, under the environment a CPU server gets.
    env = server_env(SGLangLaunchConfig(model_path="/m", device="cpu"), 0)
    code = "from vllm._custom_ops import rotary_embedding; rotary_embedding(None)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "RuntimeError: megatron_lcr's CPU stub of vllm._custom_ops.rotary_embedding was called" in proc.stderr


def test_engine_interpreter_is_this_one_or_the_engine_venv(tmp_path, monkeypatch):
    # This environment has neither engine: the launcher takes the venv tools/engine_venv.sh made ...
    monkeypatch.setenv("LCR_ENGINE_VENVS", str(tmp_path))
    venv = engine_venv("sglang")
    assert venv == tmp_path / "sglang-0.5.23"
    with pytest.raises(ValueError, match=r"has no sglang and .*sglang-0.5.23 does not exist; run `bash "
                                         r"tools/engine_venv.sh sglang` or set rollout.server.python"):
        SGLangLaunchConfig(backend="sglang", model_path="/m").interpreter()
    (venv / "bin").mkdir(parents=True)
    (venv / ".complete").touch()  # what engine_venv.sh leaves once the import check passed
    assert SGLangLaunchConfig(backend="sglang", model_path="/m").interpreter() == str(venv / "bin" / "python")
    # ... an explicit python wins, and lcr serve runs on this interpreter.
    assert SGLangLaunchConfig(backend="vllm", model_path="/m", python="py").interpreter() == "py"
    assert SGLangLaunchConfig(backend="reference", model_path="/m").interpreter() == sys.executable


def test_vllm_command_and_env():
    cpu = SGLangLaunchConfig(backend="vllm", model_path="/m", python="py", device="cpu", api_key="k", random_seed=5,
                             context_length=1024, extra_args=["--swap-space", "1"])
    assert vllm_server_command(cpu, 9) == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--host", "127.0.0.1", "--port", "9",
        "--dtype", "float32", "--api-key", "k", "--seed", "5", "--max-model-len", "1024", "--enforce-eager",
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", "megatron_lcr.rollout.vllm_worker.LCRWorkerExtension", "--swap-space", "1"]
    gpu = SGLangLaunchConfig(backend="vllm", model_path="/m", python="py", device="cuda", num_servers=2, tp_size=2,
                             dtype="bfloat16", mem_fraction_static=0.8, max_running_requests=64)
    assert vllm_server_command(gpu, 9) == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--host", "127.0.0.1", "--port", "9",
        "--dtype", "bfloat16", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8",
        "--max-num-seqs", "64", "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", "megatron_lcr.rollout.vllm_worker.LCRWorkerExtension"]
    assert server_env(cpu, 0, {"PYTHONPATH": "/x"}) == {
        "PYTHONPATH": f"{PACKAGE_PARENT}{os.pathsep}/x", "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert server_env(replace(cpu, env={"VLLM_CPU_KVCACHE_SPACE": "4"}), 0, {})["VLLM_CPU_KVCACHE_SPACE"] == "4"
    on_gpu = server_env(gpu, 1, {})
    assert on_gpu["CUDA_VISIBLE_DEVICES"] == "2,3" and "VLLM_CPU_KVCACHE_SPACE" not in on_gpu
    # That PYTHONPATH alone makes megatron_lcr importable (-S: no site-packages, no editable install).
    proc = subprocess.run([sys.executable, "-S", "-c", "import megatron_lcr.rollout; print(megatron_lcr.__file__)"],
                          env={"PYTHONPATH": server_env(cpu, 0, {})["PYTHONPATH"]}, cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == PACKAGE_PARENT / "megatron_lcr" / "__init__.py"


def test_auto_device_is_where_this_process_sees_gpus():
    assert SGLangLaunchConfig(model_path="/m").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert SGLangLaunchConfig(backend="reference").resolved_device() == "cpu"
    assert not SGLangLaunchConfig(backend="vllm", device="cpu").on_gpus
    assert SGLangLaunchConfig(device="cuda").on_gpus


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="trt"), "backend must be one of"),
    (dict(device="tpu"), "device must be one of"),
    (dict(context_length=0), "context_length must be >= 1"),
    (dict(backend="vllm", max_total_tokens=4096), r"max_total_tokens \(4096\) is an SGLang setting, but backend"),
    (dict(backend="reference", context_length=512), r"context_length \(512\)"),
    (dict(backend="vllm", deterministic=True), "but backend is 'vllm'"),
    (dict(device="cpu", deterministic=True), "needs SGLang on GPUs, but device is 'cpu'"),
    (dict(device="cpu", gpu_ids=[0]), r"gpu_ids \[0\] given, but device is 'cpu'"),
    (dict(backend="reference", device="cuda"), "runs on CPU, but device is 'cuda'"),
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


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())


@pytest.mark.skipif(SGLANG_PYTHON is None, reason="real SGLang needs its own venv: run `bash tools/engine_venv.sh "
                    "sglang` (~4 min, 11 GB) or set LCR_SGLANG_PYTHON")
def test_real_sglang_on_cpu_answers_token_ids_with_the_models_logprobs(tmp_path):
    """One real launch (~35 s, ~3.5 GB): the CPU flags, defaults and stub are what SGLang 0.5.23 needs."""
    from transformers import AutoModelForCausalLM

    cfg = SGLangLaunchConfig(backend="sglang", device="cpu", python=SGLANG_PYTHON, model_path=str(TINY_BASE),
                             base_port=0, log_dir=str(tmp_path), startup_timeout_s=600)
    (server,) = launch_servers(cfg)
    root = psutil.Process(server.process.pid)
    group = [root, *root.children(recursive=True)]
    try:
        info = json.loads(urllib.request.urlopen(server.url + "/server_info", timeout=30).read())
        assert (info["device"], info["attention_backend"], info["dtype"]) == ("cpu", "torch_native", "float32")
        assert (info["max_total_num_tokens"], info["max_running_requests"]) == (8192, 8)
        prompt = [(37 * i) % 1000 + 4 for i in range(40)]
        out = _post(server.url + "/generate", {
            "input_ids": prompt, "return_logprob": True,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}})
    finally:
        stop_servers([server])
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in group)
    assert not _port_listened(server.port)
    output = out["output_ids"]
    logprobs = out["meta_info"]["output_token_logprobs"]
    assert len(output) == 8 and [token for _, token, _ in logprobs] == output
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(output)[:, None])[:, 0]
    # fp32 on both sides (SGLang's torch_native attention vs HF's eager): ~1e-6 in practice.
    torch.testing.assert_close(torch.tensor([lp for lp, _, _ in logprobs]), expected, rtol=0, atol=1e-4)
