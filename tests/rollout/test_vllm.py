"""vLLM as a rollout backend: the requests and answers of :class:`VLLMServerAPI`, and a real vLLM server.

The unit tests feed the translation functions answers shaped like vLLM 0.32.0's (copied from a running
server). The real-server tests start vLLM's CPU build (``bash tools/engine_venv.sh vllm``; 30-90 s to
health here, ~2.9 GB RSS) with our worker extension and speak to it with plain HTTP built from the API's
:class:`Call` objects. Each weight transport loads a new weight set and must then give the log-probs of
a Hugging Face model holding those weights (fp32 on both sides, max abs diff <= 1e-4), for sampled
tokens after temperature, for a prompt whose prefix the server cached before the update, and for scoring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megatron_lcr.models.hf_checkpoint import ShardedSafetensorsWriter, finalize_shards
from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.engine import GenerateRequest, SamplingParams, expand_samples
from megatron_lcr.rollout.server_api import Call, UnsupportedServerError, detect_server_api
from megatron_lcr.rollout.tensor_payload import LCR_SAFETENSORS, serialize_bucket
from megatron_lcr.rollout.update_group import broadcast_from_source, join_update_group
from megatron_lcr.rollout.vllm import (
    SERVER_ARGS,
    SERVER_ENV,
    VLLMServerAPI,
    completion_from_answer,
    completion_request,
    model_info_from_results,
    score_from_answer,
    score_request,
    vllm_api_from_version,
)
from megatron_lcr.rollout.weight_sync import dtype_name
from tests.distributed import REPO_ROOT
from tests.engine_envs import engine_python

TINY_BASE = REPO_ROOT / "examples" / "tiny" / "base"
API = VLLMServerAPI()


def _spec(return_logprob: bool = True, **sampling):
    request = GenerateRequest(input_ids=[5, 6, 7], rid="q", sampling=SamplingParams(**sampling),
                              return_logprob=return_logprob)
    return expand_samples([request])[0]


# --------------------------------------------------------------------------- requests


def test_generate_request_sends_token_ids_seed_and_neutral_penalties():
    spec = _spec(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop=["\n\n"], stop_token_ids=[2], seed=9)
    assert completion_request(spec, "q-0.retry1") == {
        "prompt": [5, 6, 7], "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 9,
        "ignore_eos": False, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "return_token_ids": True, "return_tokens_as_token_ids": True,
        "request_id": "q-0.retry1", "stop": ["\n\n"], "stop_token_ids": [2], "logprobs": 0}
    plain = completion_request(_spec(return_logprob=False, seed=1), "q-0")
    assert "logprobs" not in plain and "stop" not in plain and "stop_token_ids" not in plain
    assert plain["ignore_eos"] is False and plain["top_k"] == -1
    # Our ignore_eos stops at no token (SGLang's rule); vLLM's would still stop at stop_token_ids.
    endless = completion_request(_spec(ignore_eos=True, stop_token_ids=[2], stop=["x"]), "q-0")
    assert endless["ignore_eos"] is True and "stop_token_ids" not in endless and endless["stop"] == ["x"]
    with pytest.raises(ValueError, match="at least one token; max_new_tokens is 0"):
        completion_request(_spec(max_new_tokens=0), "q-0")


def test_score_request_asks_for_prompt_logprobs_and_one_greedy_token():
    assert score_request([4, 5, 6], "s-1") == {"prompt": [4, 5, 6], "max_tokens": 1, "temperature": 0.0,
                                               "prompt_logprobs": 0, "return_token_ids": True, "request_id": "s-1"}


def test_control_calls():
    def rpc(method, **kwargs):
        return Call("POST", "/collective_rpc", {"method": method, "kwargs": kwargs})

    assert API.model_info_call() == rpc("lcr_model_info")
    assert API.begin_update_calls() == [rpc("lcr_begin_update")]
    # The weights change when the session ends; the flush follows at once.
    assert API.end_update_calls() == [rpc("lcr_end_update"),
                                      Call("POST", "/reset_prefix_cache?reset_running_requests=true")]
    assert API.flush_call() == Call("POST", "/reset_prefix_cache?reset_running_requests=true")
    assert API.init_group_call(master_address="h", master_port=5, rank_offset=3, world_size=5, group_name="g",
                               backend="gloo") == rpc("lcr_init_group", master_address="h", master_port=5,
                                                      rank_offset=3, world_size=5, group_name="g", backend="gloo")
    assert API.update_distributed_call(names=["a"], dtypes=["bfloat16"], shapes=[(2, 3)], group_name="g",
                                       weight_version="7", flush_cache=True) == rpc(
        "lcr_update_from_group", names=["a"], dtypes=["bfloat16"], shapes=[[2, 3]], group_name="g", weight_version="7")
    assert API.destroy_group_call("g") == rpc("lcr_destroy_group", group_name="g")
    assert API.update_disk_call("/w", weight_version="3", load_format=None) == rpc(
        "lcr_update_from_disk", model_path="/w", weight_version="3")
    assert API.update_tensor_call(serialized_named_tensors=["AAA", "AAA"], load_format=LCR_SAFETENSORS,
                                  weight_version="4", flush_cache=False) == rpc(
        "lcr_update_from_tensors", payload="AAA", weight_version="4")
    assert API.abort_call("q-0") == Call("POST", "/abort_requests", {"request_ids": ["cmpl-q-0-0"]})
    assert API.abort_call(None) == Call("POST", "/abort_requests", {})
    assert [API.pause_call(m).path for m in (None, "abort", "in_place")] == [
        "/pause?mode=abort", "/pause?mode=abort", "/pause?mode=keep"]
    assert API.resume_call() == Call("POST", "/resume")
    assert API.release_memory_call(None) == API.release_memory_call(["kv_cache", "weights"]) == Call(
        "POST", "/sleep?level=1")
    assert API.resume_memory_call(None) == Call("POST", "/wake_up")
    assert API.resume_memory_call(["weights", "kv_cache"]) == Call("POST", "/wake_up?tags=weights&tags=kv_cache")
    assert (API.engine, API.version, API.has_checksums) == ("vllm", "0.32.0", False)


@pytest.mark.parametrize("make, message", [
    (lambda: API.pause_call("retract"), "not 'retract'"),
    (lambda: API.release_memory_call(["kv_cache"]), "together"),
    (lambda: API.resume_memory_call(["cuda_graph"]), "not \\['cuda_graph'\\]"),
    (lambda: API.update_disk_call("/w", weight_version=None, load_format="dummy"), "load_format 'dummy'"),
    (lambda: API.update_tensor_call(serialized_named_tensors=["x"], load_format=None, weight_version=None,
                                    flush_cache=True), "tensor_format 'safetensors'"),
])
def test_what_vllm_cannot_do_is_refused_by_name(make, message):
    with pytest.raises(UnsupportedServerError, match=message):
        make()


def test_version_detection():
    assert vllm_api_from_version({"version": "0.32.0"}, "http://s") == VLLMServerAPI(release=(0, 32, 0))
    assert vllm_api_from_version({"version": "0.32.0+cpu"}, "http://s").version == "0.32.0"
    with pytest.raises(UnsupportedServerError, match="runs vLLM 0.31.2; supported: 0.32.0 to 0.32.0"):
        vllm_api_from_version({"version": "0.31.2"}, "http://s")
    with pytest.raises(UnsupportedServerError, match="allow_untested_engine"):
        vllm_api_from_version({"version": "0.33.0"}, "http://s")
    assert vllm_api_from_version({"version": "0.33.0"}, "http://s", allow_newer=True).version == "0.32.0"
    with pytest.raises(UnsupportedServerError, match="no 'version' field"):
        vllm_api_from_version({"vllm_config": "..."}, "http://s")


# --------------------------------------------------------------------------- answers


def _answer(rid="q-0", token_ids=(12, 2), logprobs=(-2.5, -0.25), tokens=None, finish="stop"):
    """A /v1/completions answer as vLLM 0.32.0 writes it (return_token_ids, return_tokens_as_token_ids)."""
    tokens = [f"token_id:{t}" for t in token_ids] if tokens is None else tokens
    lp = None if logprobs is None else {"text_offset": [0] * len(token_ids), "token_logprobs": list(logprobs),
                                        "tokens": tokens, "top_logprobs": [{t: v} for t, v in zip(tokens, logprobs)]}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "model": "/m",
            "choices": [{"index": 0, "text": "", "logprobs": lp, "finish_reason": finish, "stop_reason": None,
                         "token_ids": list(token_ids), "prompt_logprobs": None, "prompt_token_ids": [5, 6, 7]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3 + len(token_ids), "completion_tokens": len(token_ids)}}


def test_completion_from_answer():
    c = completion_from_answer(_answer(), _spec(seed=4), "q-0", "http://s")
    assert (c.rid, c.output_ids, c.output_logprobs, c.finish_reason, c.prompt_tokens, c.seed, c.engine_url) == (
        "q-0", [12, 2], [-2.5, -0.25], "stop", 3, 4, "http://s")
    assert c.weight_version is None  # vLLM's completions carry none
    plain = completion_from_answer(_answer(logprobs=None, finish="length"), _spec(False), "q-0", "http://s")
    assert (plain.output_logprobs, plain.finish_reason) == ([], "length")


@pytest.mark.parametrize("answer, message", [
    (_answer(rid="other"), "belongs to request 'cmpl-other'"),
    ({"id": "cmpl-q-0", "choices": []}, "one choice"),
    ({**_answer(), "choices": [{**_answer()["choices"][0], "token_ids": None}]}, "no token_ids"),
    (_answer(logprobs=(-2.5,), tokens=["token_id:12"]), "2 token_ids but log-probs"),
    (_answer(tokens=["token_id:12", "token_id:3"]), "differ from token_ids"),
    (_answer(logprobs=(-1.0, None)), "null log-prob"),
    (_answer(logprobs=None), "2 token_ids but log-probs None"),
])
def test_completion_answer_is_refused_when_it_does_not_fit(answer, message):
    with pytest.raises(ValueError, match=message):
        completion_from_answer(answer, _spec(), "q-0", "http://s")


def test_score_from_answer():
    entries = [None, {"6": {"logprob": -3.0, "rank": 7, "decoded_token": "w6"}},
               {"7": {"logprob": -1.5, "rank": 1, "decoded_token": "w7"}}]
    body = _answer(rid="s-0", logprobs=None)
    body["choices"][0]["prompt_logprobs"] = entries
    assert score_from_answer(body, [5, 6, 7], "s-0", "http://s").input_logprobs == [None, -3.0, -1.5]
    with pytest.raises(ValueError, match="scored 4 tokens but prompt_logprobs has 3"):
        score_from_answer(body, [5, 6, 7, 8], "s-0", "http://s")
    with pytest.raises(ValueError, match=r"prompt_logprobs\[2\] has no log-prob for token 9"):
        score_from_answer(body, [5, 6, 9], "s-0", "http://s")


def _worker(**over):
    return {"model_path": "/m", "weight_version": "3", "logprobs_mode": "processed_logprobs", "model_type": "llama",
            "architectures": ["LlamaForCausalLM"], "update_open": False, **over}


def test_model_info_from_every_worker():
    info = model_info_from_results({"results": [_worker(), _worker(update_open=True)]})
    assert (info.model_path, info.weight_version, info.model_type, info.architectures) == (
        "/m", "3", "llama", ["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="disagree on weight_version: \\['3', '2'\\]"):
        model_info_from_results({"results": [_worker(), _worker(weight_version="2")]})
    with pytest.raises(UnsupportedServerError, match="--logprobs-mode raw_logprobs"):
        model_info_from_results({"results": [_worker(logprobs_mode="raw_logprobs")]})
    with pytest.raises(ValueError, match="no worker results"):
        model_info_from_results({"results": []})


def test_check_answer_raises_on_a_failed_reset():
    API.check_answer({"success": True}, "http://s", "/reset_prefix_cache")
    API.check_answer({"results": [None]}, "http://s", "/collective_rpc")
    with pytest.raises(RuntimeError, match="http://s/reset_prefix_cache failed"):
        API.check_answer({"success": False}, "http://s", "/reset_prefix_cache")


def test_worker_extension_imports_only_what_vllms_environment_has():
    """vLLM's venv has torch, safetensors and vllm but none of our other dependencies."""
    code = ("import json, sys, torch, safetensors.torch; before = set(sys.modules); "
            "import megatron_lcr.rollout.vllm_worker, megatron_lcr.rollout.update_group, "
            "megatron_lcr.rollout.tensor_payload; print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    ours = {"megatron_lcr", "megatron_lcr.rollout", "megatron_lcr.rollout.vllm_worker",
            "megatron_lcr.rollout.update_group", "megatron_lcr.rollout.tensor_payload"}
    foreign = [m for m in json.loads(out.stdout) if m not in ours and m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] != "torch"]
    assert foreign == []


# --------------------------------------------------------------------------- a real vLLM server (CPU build)


VLLM_PYTHON, NO_VLLM = engine_python("vllm")
real_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason=NO_VLLM)

PROMPT = [(37 * i) % 990 + 10 for i in range(40)]
LONG_PROMPT = [(53 * i + 7) % 990 + 10 for i in range(300)]  # > one KV block: its prefix gets cached


class HTTPFailed(Exception):
    """A non-200 answer: status and body text."""


def _send(url: str, call: Call, timeout: float = 300) -> object:
    data = None if call.payload is None else json.dumps(call.payload).encode()
    request = urllib.request.Request(url + call.path, data=data, method=call.method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as err:
        raise HTTPFailed(f"{err.code} {err.read().decode()[:1000]}") from None
    answer = json.loads(text) if text.strip() else None
    API.check_answer(answer, url, call.path)
    return answer


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server, engine core, worker), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def _tied_qwen2(out: Path) -> Path:
    """A tiny Qwen2 with tied embeddings and QKV biases. (tests/tiny_hf.py's models have head_dim 8 or 16;
    vLLM's CPU attention takes head_dim 32, 64, 80, ...)"""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.tiny_hf import save_tiny_tokenizer

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # HF initialises norms to ones and biases to zeros: move them
            for param in model.parameters():
                param.add_(torch.randn_like(param) * (0.02 if param.dim() > 1 else 0.1))
    model.save_pretrained(str(out))
    save_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def vllm_server(request, tmp_path_factory):
    """``(url, model_dir)`` of a vLLM server of examples/tiny/base, or of the model an indirect parameter
    names ('qwen2-tied'). One server at a time: pytest ends one parameter's server before the next starts."""
    work = tmp_path_factory.mktemp("vllm")
    model_dir = _tied_qwen2(work / "model") if getattr(request, "param", None) == "qwen2-tied" else TINY_BASE
    port = free_port()
    log = work / "server.log"
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", *SERVER_ARGS]
    env = {**os.environ, **SERVER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with code {process.returncode}: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM not healthy after 300 s: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, model_dir
    finally:
        _stop(process)


@pytest.fixture
def vllm_url(vllm_server):
    return vllm_server[0]


def _hf_model(model_dir: Path, seed: int | None):
    """The model in fp32, or a new weight set: every parameter moved by seeded noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if seed is not None:
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=noise) * (0.02 if param.dim() > 1 else 0.1))
    return model.eval()


@torch.no_grad()
def _hf_logprobs(model, ids: list[int], temperature: float) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) at ``temperature`` for t >= 1: ``[len(ids) - 1]`` (float64)."""
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _generate(url: str, prompt: list[int], rid: str, *, seed: int = 3, max_new_tokens: int = 8,
              temperature: float = 0.7):
    sampling = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, ignore_eos=True)
    spec = expand_samples([GenerateRequest(input_ids=prompt, rid=rid, sampling=sampling)])[0]
    return API.parse_generate(_send(url, API.generate_call(spec, spec.rid)), spec, spec.rid, url)


def _score(url: str, sequence: list[int], rid: str) -> list[float | None]:
    return API.parse_score(_send(url, API.score_call(sequence, rid)), sequence, rid, url).input_logprobs


def _assert_serves(url: str, model, tag: str) -> None:
    """The server's sample log-probs (T=0.7, a short and a prefix-cached long prompt) and scores (T=1)
    are those of ``model``."""
    for i, prompt in enumerate((PROMPT, LONG_PROMPT)):
        sample = _generate(url, prompt, f"{tag}-gen{i}")
        expected = _hf_logprobs(model, prompt + sample.output_ids, 0.7)[len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(sample.output_logprobs, dtype=torch.float64), expected,
                                   rtol=0, atol=1e-4)
    scores = _score(url, PROMPT, f"{tag}-score")
    assert scores[0] is None
    torch.testing.assert_close(torch.tensor(scores[1:], dtype=torch.float64), _hf_logprobs(model, PROMPT, 1.0),
                               rtol=0, atol=1e-4)


def _model_info(url: str):
    return API.parse_model_info(_send(url, API.model_info_call()))


def _new_weights(server: tuple[str, Path], seed: int):
    """A weight set that gives other log-probs than the launch weights; the server's prefix cache is primed
    with the long prompt under its current weights (a missing flush would show)."""
    url, model_dir = server
    model = _hf_model(model_dir, seed)
    _generate(url, LONG_PROMPT, f"prime-{seed}")
    launched = _hf_model(model_dir, None)
    assert (_hf_logprobs(model, PROMPT, 1.0) - _hf_logprobs(launched, PROMPT, 1.0)).abs().max() > 0.1
    return model


def _tensor_update(url: str, model, version: str) -> None:
    """A tensor sync with one tensor per bucket: q/k/v (qkv_proj) and gate/up (gate_up_proj) arrive in
    separate requests."""
    for call in API.begin_update_calls():
        _send(url, call)
    for name, tensor in model.state_dict().items():
        entries, load_format = serialize_bucket([(name, tensor)], "safetensors", tp_size=1)
        _send(url, API.update_tensor_call(serialized_named_tensors=entries, load_format=load_format,
                                          weight_version=version, flush_cache=False))
    assert _model_info(url).weight_version != version  # current only once the session ends
    for call in API.end_update_calls():
        _send(url, call)


@real_vllm
def test_real_server_serves_the_models_logprobs_and_reports_itself(vllm_url):
    info = _model_info(vllm_url)
    assert (info.model_path, info.weight_version, info.model_type, info.architectures) == (
        str(TINY_BASE), "default", "llama", ["LlamaForCausalLM"])
    assert vllm_api_from_version(_send(vllm_url, Call("GET", "/version")), vllm_url) == API
    _assert_serves(vllm_url, _hf_model(TINY_BASE, None), "base")
    # Per-sample seeds: the same seed samples the same tokens, another seed others.
    same = [_generate(vllm_url, PROMPT, f"seed-{k}", seed=5, max_new_tokens=16).output_ids for k in range(2)]
    other = _generate(vllm_url, PROMPT, "seed-other", seed=6, max_new_tokens=16).output_ids
    assert same[0] == same[1] != other


@real_vllm
def test_real_server_is_detected_as_vllm(vllm_url):
    import asyncio

    async def get(path: str):
        return await asyncio.to_thread(_send, vllm_url, Call("GET", path))

    assert asyncio.run(detect_server_api(get, vllm_url)) == API


@real_vllm
def test_tensor_update_in_buckets_that_split_fused_layers(vllm_server):
    model = _new_weights(vllm_server, seed=11)
    _tensor_update(vllm_server[0], model, "tensor-11")
    assert _model_info(vllm_server[0]).weight_version == "tensor-11"
    _assert_serves(vllm_server[0], model, "tensor")


@real_vllm
def test_distributed_update_from_the_trainers_group(vllm_server):
    """The test process is the trainer's rank 0 (gloo), the server's worker joins as rank 1."""
    vllm_url = vllm_server[0]
    model = _new_weights(vllm_server, seed=12)
    named = list(model.state_dict().items())
    buckets = [named[i:i + 5] for i in range(0, len(named), 5)]
    port, name = free_port(), "lcr_test_update"
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(_send, vllm_url, API.init_group_call(
            master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2, group_name=name,
            backend="gloo"))
        group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=2,
                                  rank=0, group_name=name, timeout_s=120)
        joined.result(120)
        for call in API.begin_update_calls():
            _send(vllm_url, call)
        for bucket in buckets:
            received = pool.submit(_send, vllm_url, API.update_distributed_call(
                names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for _, t in bucket],
                shapes=[list(t.shape) for _, t in bucket], group_name=name, weight_version="dist-12",
                flush_cache=False))
            for _, tensor in bucket:
                broadcast_from_source(group, tensor.contiguous())
            received.result(120)
        for call in API.end_update_calls():
            _send(vllm_url, call)
        _send(vllm_url, API.destroy_group_call(name))
    assert _model_info(vllm_url).weight_version == "dist-12"
    _assert_serves(vllm_url, model, "dist")


@real_vllm
def test_disk_update_from_our_sharded_checkpoint(vllm_server, tmp_path):
    """The directory the syncer's disk mode writes: shards + index, no config.json; then the syncer's flush."""
    vllm_url = vllm_server[0]
    model = _new_weights(vllm_server, seed=13)
    out = tmp_path / "weights-disk-13"
    out.mkdir()
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=2 * 2**20)
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    writer.close()
    finalize_shards(out, [writer.part])
    assert len(list(out.glob("*.safetensors"))) > 1
    _send(vllm_url, API.update_disk_call(str(out), weight_version="disk-13", load_format=None))
    _send(vllm_url, API.flush_call())
    info = _model_info(vllm_url)
    assert (info.model_path, info.weight_version) == (str(out), "disk-13")
    _assert_serves(vllm_url, model, "disk")


@real_vllm
def test_session_rules(vllm_url):
    begin, (end, flush) = API.begin_update_calls()[0], API.end_update_calls()
    entries, load_format = serialize_bucket([("model.norm.weight", torch.ones(192))], "safetensors", tp_size=1)
    bucket = API.update_tensor_call(serialized_named_tensors=entries, load_format=load_format,
                                    weight_version="never", flush_cache=False)
    version = _model_info(vllm_url).weight_version
    with pytest.raises(HTTPFailed, match="no weight-update session is open"):
        _send(vllm_url, bucket)
    with pytest.raises(HTTPFailed, match="no weight-update session is open"):
        _send(vllm_url, end)
    _send(vllm_url, begin)
    try:
        # The client closes a stale session when begin answers "already open".
        with pytest.raises(HTTPFailed, match="already open"):
            _send(vllm_url, begin)
        with pytest.raises(HTTPFailed, match="end it before a directory update"):
            _send(vllm_url, API.update_disk_call(str(TINY_BASE), weight_version="x", load_format=None))
    finally:
        _send(vllm_url, end)
        _send(vllm_url, flush)
    # A session that loaded nothing changes nothing.
    assert _model_info(vllm_url).weight_version == version


def _generate_in_background(url: str, rid: str) -> tuple[threading.Thread, list]:
    """A 900-token sample (~5 s on this CPU) running in a thread; its Completion lands in the list."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(
        _generate(url, PROMPT, rid, seed=1, max_new_tokens=900, temperature=1.0)))
    thread.start()
    return thread, box


def _until_it_ends(thread: threading.Thread, stop, undo=None) -> None:
    """``stop()`` until the running sample ends: a stop that reaches the server before the sample (a
    no-op abort; a pause the sample then waits out) is retried, after ``undo()``."""
    for attempt in range(20):
        time.sleep(0.1 if attempt == 0 else 0.5)  # early: a fast server may finish the sample first
        stop()
        thread.join(2.0)
        if not thread.is_alive():
            return
        if undo is not None:
            undo()
    pytest.fail("the sample did not end")


@real_vllm
def test_abort_pause_resume_and_sleep(vllm_url):
    thread, box = _generate_in_background(vllm_url, "long-a")
    _until_it_ends(thread, lambda: _send(vllm_url, API.abort_call("long-a-0")))
    assert box[0].finish_reason == "abort" and len(box[0].output_ids) < 900
    assert len(box[0].output_logprobs) == len(box[0].output_ids)

    thread, box = _generate_in_background(vllm_url, "long-all")
    _until_it_ends(thread, lambda: _send(vllm_url, API.abort_call(None)))
    assert box[0].finish_reason == "abort" and len(box[0].output_ids) < 900

    thread, box = _generate_in_background(vllm_url, "long-p")
    _until_it_ends(thread, lambda: _send(vllm_url, API.pause_call(None)), lambda: _send(vllm_url, API.resume_call()))
    assert box[0].finish_reason == "abort" and len(box[0].output_ids) < 900
    assert _send(vllm_url, Call("GET", "/is_paused")) == {"is_paused": True}
    _send(vllm_url, API.resume_call())
    assert _send(vllm_url, Call("GET", "/is_paused")) == {"is_paused": False}

    _send(vllm_url, API.release_memory_call(None))
    assert _send(vllm_url, Call("GET", "/is_sleeping")) == {"is_sleeping": True}
    _send(vllm_url, API.resume_memory_call(None))
    assert _send(vllm_url, Call("GET", "/is_sleeping")) == {"is_sleeping": False}
    assert len(_generate(vllm_url, PROMPT, "after-sleep").output_ids) == 8


@real_vllm
@pytest.mark.parametrize("vllm_server", ["qwen2-tied"], indirect=True)
def test_tied_embeddings_and_biases_reload(vllm_server):
    """lm_head shares embed_tokens' weight (vLLM's reload notes tied parameters as a limitation)."""
    url, model_dir = vllm_server
    _assert_serves(url, _hf_model(model_dir, None), "tied-launch")
    model = _new_weights(vllm_server, seed=14)
    _tensor_update(url, model, "tied-14")
    _assert_serves(url, model, "tied")
