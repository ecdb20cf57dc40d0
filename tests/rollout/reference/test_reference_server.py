"""The CPU reference server (`lcr serve`) as a real subprocess on loopback, against the HF model itself.

One server per module (with an API key, so every call below also exercises auth). Tests that change
the weights restore the original checkpoint before they end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.checksum import tensor_checksum
from megatron_lcr.rollout.tensor_payload import LCR_SAFETENSORS, serialize_bucket
from tests.tiny_hf import make_tiny_hf

KEY = "test-key"
READY = "lcr serve: ready on http://"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, stderr: list[str]) -> None:
        self.proc, self.url, self.stderr = proc, url, stderr

    def call(self, path: str, body: dict | None = None, *, method: str | None = None, key: str | None = KEY,
             timeout: float = 60) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode()

    def ok(self, path: str, body: dict | None = None, **kw) -> object:
        status, out = self.call(path, body, **kw)
        assert status == 200, (path, status, out)
        return out


def _start(args: list[str], timeout: float = 90) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lcr.cli", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"server exited ({proc.wait()}): {''.join(lines)}")
        lines.append(line)
        if line.startswith(READY):
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, line[len("lcr serve: ready on "):].strip(), lines
    proc.kill()
    raise AssertionError(f"no ready line within {timeout}s: {''.join(lines)}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf("llama", tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url, lines = _start(["--model", str(model_dir), "--port", "0", "--api-key", KEY, "--max-batch", "16"])
    yield Server(proc, url, lines)
    proc.terminate()
    assert proc.wait(timeout=30) == 0


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):  # full forward every step: no KV cache in the reference
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def hf_token_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p_T(ids[j] | ids[:j]) for j >= 1: ``[len(ids) - 1]``."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def gen(server: Server, prompt, **sampling) -> dict:
    body = {"input_ids": prompt, "sampling_params": sampling, "return_logprob": True}
    return server.ok("/generate", body)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41], [100, 200, 300, 400, 500]]


# -- generation ------------------------------------------------------------------------------------


def test_greedy_equals_hf_token_by_token(server, hf):
    out = gen(server, PROMPTS[0], temperature=0, max_new_tokens=12, ignore_eos=True)
    assert out["output_ids"] == hf_greedy(hf, PROMPTS[0], 12)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["prompt_tokens"] == 8 and meta["completion_tokens"] == 12
    assert meta["weight_version"] == "default"
    # Greedy log-probs are log_softmax(logits) (SGLang turns T=0 into T=1, top_k=1).
    ref = hf_token_logprobs(hf, PROMPTS[0] + out["output_ids"])[len(PROMPTS[0]) - 1:]
    got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
    assert (got - ref).abs().max() <= 1e-5
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert meta["input_token_logprobs"] == [[None, PROMPTS[0][-1], None]]  # logprob_start_len -1


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_output_logprobs_equal_hf_after_temperature(server, hf, temperature):
    out = gen(server, PROMPTS[2], temperature=temperature, top_p=0.9, top_k=50, max_new_tokens=16,
              ignore_eos=True, sampling_seed=11)
    ids = PROMPTS[2] + out["output_ids"]
    ref = hf_token_logprobs(hf, ids, temperature)[len(PROMPTS[2]) - 1:]
    got = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
    assert len(got) == 16
    assert (got - ref).abs().max() <= 1e-5


def test_scoring_returns_input_logprobs_and_no_output(server, hf):
    prompt = PROMPTS[0]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0, "temperature": 0.7},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    out = server.ok("/generate", body)
    assert out["output_ids"] == [] and out["text"] == ""
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    entries = meta["input_token_logprobs"]
    assert [t for _, t, _ in entries] == prompt and entries[0][0] is None
    # Input log-probs carry no temperature (SGLang's default), whatever the sampling temperature.
    got = torch.tensor([lp for lp, _, _ in entries[1:]])
    assert (got - hf_token_logprobs(hf, prompt)).abs().max() <= 1e-5
    top = meta["input_top_logprobs"]
    assert top[0] is None and len(top) == len(prompt) and all(len(row) == 3 for row in top[1:])
    # from position 3: entries for prompt[3:], the first null
    body["logprob_start_len"] = 3
    entries = server.ok("/generate", body)["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in entries] == prompt[3:] and entries[0][0] is None
    got = torch.tensor([lp for lp, _, _ in entries[1:]])
    assert (got - hf_token_logprobs(hf, prompt)[3:]).abs().max() <= 1e-5


def test_batch_equals_one_by_one(server):
    """Left padding + KV cache: a batch of different lengths gives each prompt's own answer."""
    params = [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 3},
              {"temperature": 0.7, "sampling_seed": 4}]
    for p in params:
        p.update(max_new_tokens=10, ignore_eos=True)
    body = {"input_ids": PROMPTS, "sampling_params": params, "return_logprob": True}
    batch = server.ok("/generate", body)
    assert isinstance(batch, list) and len(batch) == 3
    with ThreadPoolExecutor(3) as pool:  # concurrent single requests: batched by the server's queue
        singles = list(pool.map(lambda i: gen(server, PROMPTS[i], **params[i]), range(3)))
    for b, s in zip(batch, singles):
        assert b["output_ids"] == s["output_ids"]
        diff = [x[0] - y[0] for x, y in zip(b["meta_info"]["output_token_logprobs"],
                                            s["meta_info"]["output_token_logprobs"])]
        assert max(abs(d) for d in diff) <= 1e-5


def test_seeds(server):
    def sample(seed):
        return gen(server, PROMPTS[1], temperature=1.0, max_new_tokens=24, ignore_eos=True,
                   sampling_seed=seed)["output_ids"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # Without sampling_seed the server seed and the rid seed the stream.
    body = {"input_ids": PROMPTS[1], "rid": "fixed-rid",
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True}}
    assert server.ok("/generate", body)["output_ids"] == server.ok("/generate", body)["output_ids"]


def test_parallel_sampling_order_and_rids(server):
    body = {"input_ids": [PROMPTS[1], PROMPTS[0]],
            "sampling_params": {"n": 2, "temperature": 1.0, "max_new_tokens": 8, "sampling_seed": 5}}
    out = server.ok("/generate", body)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [2, 2, 8, 8]  # prompt-major, as SGLang
    assert out[0]["output_ids"] != out[1]["output_ids"]  # each copy samples its own stream
    assert len({o["meta_info"]["id"] for o in out}) == 4
    single = server.ok("/generate", {"input_ids": PROMPTS[1], "sampling_params": {"n": 3, "max_new_tokens": 2}})
    assert isinstance(single, list) and len(single) == 3


def test_top_k_one_is_greedy(server):
    greedy = gen(server, PROMPTS[2], temperature=0, max_new_tokens=10, ignore_eos=True)["output_ids"]
    top1 = gen(server, PROMPTS[2], temperature=1.0, top_k=1, max_new_tokens=10, ignore_eos=True)["output_ids"]
    assert top1 == greedy


def test_stop_token_ids(server, hf, tok):
    ref = hf_greedy(hf, PROMPTS[0], 10)
    stop = ref[3]
    end = ref.index(stop) + 1
    out = gen(server, PROMPTS[0], temperature=0, max_new_tokens=10, stop_token_ids=[stop])
    assert out["output_ids"] == ref[:end]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == tok.decode(ref[:end - 1], skip_special_tokens=True)  # the stop token is trimmed
    kept = gen(server, PROMPTS[0], temperature=0, max_new_tokens=10, stop_token_ids=[stop], no_stop_trim=True,
               skip_special_tokens=False)
    assert kept["text"] == tok.decode(ref[:end], skip_special_tokens=False)


def test_stop_strings(server, hf, tok):
    ref = hf_greedy(hf, PROMPTS[0], 10)
    stop = tok.decode([next(t for t in ref[3:] if t >= 4)])  # a word, not a special token

    def text(i):
        return tok.decode(ref[:i], skip_special_tokens=True)

    end = next(i for i in range(1, 11) if stop in text(i))
    out = gen(server, PROMPTS[0], temperature=0, max_new_tokens=10, stop=[stop, "zzz"])
    assert out["output_ids"] == ref[:end]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text(end)[:text(end).find(stop)]
    kept = gen(server, PROMPTS[0], temperature=0, max_new_tokens=10, stop=stop, no_stop_trim=True)
    assert kept["text"] == text(end)[:text(end).find(stop) + len(stop)]


def test_max_new_tokens_and_text_input(server):
    for n in (1, 7):
        out = gen(server, PROMPTS[1], temperature=1.0, max_new_tokens=n, ignore_eos=True)
        assert len(out["output_ids"]) == n and out["meta_info"]["finish_reason"] == {"type": "length", "length": n}
    greedy = {"temperature": 0, "max_new_tokens": 4}
    by_text = server.ok("/generate", {"text": "w5 w6 w7", "sampling_params": greedy})
    by_ids = server.ok("/generate", {"input_ids": [5, 6, 7], "sampling_params": greedy})
    assert by_text["output_ids"] == by_ids["output_ids"] and by_text["text"] == by_ids["text"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [5], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [5], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"input_ids": [5], "sampling_params": {"bogus": 1}}, "bogus"),
        ({"input_ids": [5, 6], "return_logprob": True, "logprob_start_len": 2}, "logprob_start_len"),
        ({"input_ids": [5], "stream": True}, "stream"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": [5000]}, "token ids"),
        ({"sampling_params": {}}, "input_ids"),
    ],
)
def test_bad_generate_requests(server, body, message):
    status, out = server.call("/generate", body)
    assert status == 400 and message in out["error"]["message"]


# -- control -----------------------------------------------------------------------------------------


def _wait_running(server: Server, count: int = 1) -> None:
    for _ in range(500):
        if server.ok("/get_server_info")["internal_states"][0]["num_running_reqs"] >= count:
            return
        time.sleep(0.01)
    raise AssertionError("the request never started")


def test_pause_abort_flush_continue(server):
    assert server.call("/flush_cache")[0] == 200
    long = {"temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        server.ok("/slow_down", {"forward_sleep_time": 0.02})
        try:
            running = pool.submit(server.ok, "/generate",
                                  {"input_ids": PROMPTS[1], "rid": "r1", "sampling_params": long})
            _wait_running(server)
            assert server.call("/flush_cache")[0] == 400  # SGLang: not while requests run
            assert server.ok("/pause_generation", {"mode": "in_place"})["status"] == "ok"
            frozen = server.ok("/get_server_info")["internal_states"][0]
            time.sleep(0.2)
            assert not running.done() and frozen["paused"] and frozen["num_running_reqs"] == 1
            # New requests wait while paused.
            waiting = pool.submit(server.ok, "/generate", {"input_ids": PROMPTS[0], "rid": "r2",
                                                          "sampling_params": {"max_new_tokens": 3}})
            time.sleep(0.2)
            assert not waiting.done()
            server.ok("/abort_request", {"rid": "r1"})
            aborted = running.result(timeout=30)  # answered while still paused
            assert server.ok("/get_server_info")["internal_states"][0]["paused"]
            assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
            assert 0 < aborted["meta_info"]["completion_tokens"] < 200
            assert len(aborted["output_ids"]) == aborted["meta_info"]["completion_tokens"]
            server.ok("/continue_generation", {})
            assert waiting.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "length"
            # Pause in abort mode (SGLang's default) ends running requests with an abort.
            running = pool.submit(server.ok, "/generate", {"input_ids": PROMPTS[1], "sampling_params": long})
            _wait_running(server)
            server.ok("/pause_generation", {})
            assert running.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "abort"
            server.ok("/continue_generation", {})
            running = pool.submit(server.ok, "/generate", {"input_ids": PROMPTS[1], "sampling_params": long})
            _wait_running(server)
            server.ok("/abort_request", {"abort_all": True})
            assert running.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "abort"
        finally:
            server.ok("/slow_down", {"forward_sleep_time": None})
            server.ok("/continue_generation", {})
    assert server.call("/flush_cache")[0] == 200


def test_release_and_resume_memory(server):
    assert server.call("/health_generate", key=None)[0] == 200
    server.ok("/release_memory_occupation", {"tags": ["weights"]})
    status, out = server.call("/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
    assert status == 400 and "released" in out["error"]["message"]
    assert server.call("/health_generate", key=None)[0] == 503
    server.ok("/resume_memory_occupation", {"tags": ["weights"]})
    assert server.call("/health_generate", key=None)[0] == 200
    gen(server, [5], max_new_tokens=1)


# -- security and startup ------------------------------------------------------------------------------


def test_api_key(server):
    for path in ("/get_model_info", "/lcr/weights_checksum", "/flush_cache"):
        assert server.call(path, key=None) == (401, {"error": "Unauthorized"})
        assert server.call(path, key="wrong")[0] == 401
    assert server.call("/generate", {"input_ids": [5]}, key=None)[0] == 401
    assert server.call("/update_weights_from_disk", {"model_path": "/x"}, key="wrong")[0] == 401
    assert server.call("/get_model_info")[0] == 200
    assert server.call("/health", key=None)[0] == 200  # health probes need no key, as in SGLang


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_binds_loopback_only(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.ok("/get_server_info")["host"] == "127.0.0.1"
    ip = _non_loopback_ip()
    if ip is not None:
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lcr.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


def test_startup_errors_are_one_line(server, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(_run_cli, "--model", str(tmp_path), "--port", port)
        missing = pool.submit(_run_cli, "--model", str(tmp_path / "nope"), "--port", "0")
    for result, needle in ((busy.result(), "address already in use"), (missing.result(), "does not exist")):
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lcr: error:") and needle in lines[0], result.stderr


# -- weights -------------------------------------------------------------------------------------------


def _file_checksums(model_dir) -> dict[str, str]:
    return {k: tensor_checksum(v) for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _restore(server: Server, model_dir) -> None:
    out = server.ok("/update_weights_from_disk", {"model_path": str(model_dir), "weight_version": "default"})
    assert out["success"]
    assert server.ok("/lcr/weights_checksum")["checksums"] == _file_checksums(model_dir)


def test_checksums_match_the_checkpoint(server, model_dir):
    got = server.ok("/lcr/weights_checksum")
    assert got["weight_version"] == "default" and got["checksums"] == _file_checksums(model_dir)


def test_update_weights_from_disk(server, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    new_dir = make_tiny_hf("llama", tmp_path / "new", seed=1)
    before = gen(server, PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)["output_ids"]
    try:
        out = server.ok("/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "v1"})
        assert out["success"] and "v1" in out["message"] and out["num_paused_requests"] == 0
        assert server.ok("/model_info")["weight_version"] == "v1"
        new_checksums = _file_checksums(new_dir)
        info = server.ok("/get_model_info")
        assert info["weight_version"] == "v1" and info["model_path"] == str(new_dir)
        assert server.ok("/lcr/weights_checksum") == {"weight_version": "v1", "checksums": new_checksums}
        after = gen(server, PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)
        new_hf = AutoModelForCausalLM.from_pretrained(str(new_dir), dtype=torch.float32).eval()
        assert after["output_ids"] == hf_greedy(new_hf, PROMPTS[0], 8) != before
        assert after["meta_info"]["weight_version"] == "v1"
        # A checkpoint with a wrong shape is refused as a whole: the model keeps the v1 weights.
        from safetensors.torch import save_file

        bad = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        bad["model.norm.weight"] = torch.zeros(3)
        (tmp_path / "bad").mkdir()
        save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
        status, out = server.call("/update_weights_from_disk",
                                  {"model_path": str(tmp_path / "bad"), "weight_version": "x"})
        assert status == 400 and not out["success"] and "model.norm.weight" in out["message"]
        assert server.ok("/lcr/weights_checksum") == {"weight_version": "v1", "checksums": new_checksums}
    finally:
        _restore(server, model_dir)


def _trainer_update(server: Server, pg, named: dict[str, torch.Tensor], version: str) -> tuple[int, dict]:
    """POST the update in a thread while this process (rank 0) broadcasts each tensor in order."""
    from megatron_lcr.rollout.update_group import broadcast_from_source

    body = {"names": list(named), "dtypes": [str(t.dtype).removeprefix("torch.") for t in named.values()],
            "shapes": [list(t.shape) for t in named.values()], "group_name": "g", "weight_version": version}
    with ThreadPoolExecutor(1) as pool, update_session(server):
        reply = pool.submit(server.call, "/update_weights_from_distributed", body)
        for tensor in named.values():
            broadcast_from_source(pg, tensor.clone())
        return reply.result(timeout=60)


def test_update_weights_from_distributed(server, hf, model_dir):
    from megatron_lcr.rollout.update_group import join_update_group

    port = free_port()
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "g", "backend": "gloo"}
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(server.ok, "/init_weights_update_group", body)
        pg = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=2, rank=0,
                               group_name="g", timeout_s=60)
        assert joined.result(timeout=60)["success"]
    original = _file_checksums(model_dir)
    score = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
             "logprob_start_len": 0}
    before = [e[0] for e in server.ok("/generate", score)["meta_info"]["input_token_logprobs"][1:]]
    params = dict(hf.named_parameters())
    gen_ = torch.Generator().manual_seed(0)
    names = ["model.norm.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    modified = {n: params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=gen_) for n in names}
    try:
        # An unknown name, after a valid tensor: refused as a whole, nothing copied.
        bad = {names[0]: modified[names[0]], "model.nope.weight": torch.zeros(2)}
        status, out = _trainer_update(server, pg, bad, "bad")
        assert status == 400 and not out["success"] and "model.nope.weight" in out["message"]
        assert server.ok("/lcr/weights_checksum") == {"weight_version": "default", "checksums": original}

        status, out = _trainer_update(server, pg, modified, "v2")
        assert status == 200 and out["success"], out
        got = server.ok("/lcr/weights_checksum")
        assert got["weight_version"] == "v2"
        assert got["checksums"] == {**original, **{n: tensor_checksum(t) for n, t in modified.items()}}
        after = server.ok("/generate", score)["meta_info"]
        assert after["weight_version"] == "v2"
        after_lp = torch.tensor([e[0] for e in after["input_token_logprobs"][1:]])
        assert (after_lp - torch.tensor(before)).abs().max() > 1e-3
        with torch.no_grad():  # the HF model with the same modified weights gives the same log-probs
            saved = {n: params[n].detach().clone() for n in names}
            for n in names:
                params[n].copy_(modified[n])
            ref = hf_token_logprobs(hf, PROMPTS[0])
            for n in names:
                params[n].copy_(saved[n])
        assert (after_lp - ref).abs().max() <= 1e-5
    finally:
        assert server.ok("/destroy_weights_update_group", {"group_name": "g"})["success"]
        _restore(server, model_dir)
    assert server.call("/destroy_weights_update_group", {"group_name": "g"})[0] == 400


@contextlib.contextmanager
def update_session(server: Server):
    """SGLang 0.5.21+'s weight-update session around tensor and distributed updates."""
    server.ok("/begin_weight_update", {})
    try:
        yield
    finally:
        server.ok("/end_weight_update", {})


def test_tensor_and_distributed_updates_need_a_session_as_in_sglang_0_5_21(server):
    body = {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "none"}
    for path in ("/update_weights_from_distributed", "/update_weights_from_tensor"):
        status, out = server.call(path, body)
        assert status == 400 and not out["success"]
        assert "must run between begin_weight_update() and end_weight_update()" in out["message"]
    status, out = server.call("/end_weight_update", {})
    assert status == 400 and "no weight-update session is open" in out["message"]
    server.ok("/begin_weight_update", {})
    try:
        status, out = server.call("/begin_weight_update", {})
        assert status == 400 and "already open" in out["message"]
    finally:
        server.ok("/end_weight_update", {})
    assert server.call("/begin_weight_update", {}, key=None)[0] == 401


def test_update_weight_group_errors(server):
    server.ok("/begin_weight_update", {})
    try:
        _group_errors(server)
    finally:
        server.ok("/end_weight_update", {})


def _group_errors(server: Server) -> None:
    status, out = server.call("/update_weights_from_distributed",
                              {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "none"})
    assert status == 400 and not out["success"] and "does not exist" in out["message"]
    status, out = server.call("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                             "rank_offset": 1, "world_size": 2, "backend": "nccl"})
    assert status == 400 and "gloo" in out["message"]
    status, out = server.call("/update_weights_from_tensor", {"serialized_named_tensors": ["x"]})
    assert status == 400 and not out["success"] and "never unpickles" in out["message"]
    status, out = server.call("/update_weights_from_tensor", {"serialized_named_tensors": "x",
                                                              "load_format": LCR_SAFETENSORS})
    assert status == 400 and "must be a list of base64 strings" in out["message"]


def _tensor_update(server: Server, named: dict[str, torch.Tensor], version: str, **kw) -> tuple[int, dict]:
    entries, load_format = serialize_bucket(list(named.items()), "safetensors", tp_size=1)
    body = {"serialized_named_tensors": entries, "load_format": load_format, "weight_version": version}
    with update_session(server):
        return server.call("/update_weights_from_tensor", body, **kw)


def test_update_weights_from_tensor(server, hf, model_dir, tmp_path):
    original = _file_checksums(model_dir)
    params = dict(hf.named_parameters())
    gen_ = torch.Generator().manual_seed(1)
    names = ["model.norm.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"]
    modified = {n: params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=gen_) for n in names}
    before = gen(server, PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)
    try:
        assert _tensor_update(server, modified, "t1", key=None)[0] == 401
        status, out = _tensor_update(server, modified, "t1")
        assert status == 200 and out["success"] and "t1" in out["message"], out
        assert server.ok("/model_info")["weight_version"] == "t1"
        assert server.ok("/lcr/weights_checksum") == {
            "weight_version": "t1", "checksums": {**original, **{n: tensor_checksum(t) for n, t in modified.items()}}}
        after = gen(server, PROMPTS[0], temperature=0, max_new_tokens=8, ignore_eos=True)
        assert after["meta_info"]["weight_version"] == "t1"
        with torch.no_grad():  # the HF model with the same modified weights generates the same tokens
            saved = {n: params[n].detach().clone() for n in names}
            for n in names:
                params[n].copy_(modified[n])
            expected = hf_greedy(hf, PROMPTS[0], 8)
            for n in names:
                params[n].copy_(saved[n])
        assert after["output_ids"] == expected != before["output_ids"]

        # Refused as a whole, naming the tensor; the model keeps the t1 weights.
        t1 = server.ok("/lcr/weights_checksum")
        good = {names[0]: modified[names[0]] * 2}
        for bad, needle in (({**good, "model.nope.weight": torch.zeros(2)}, "'model.nope.weight'"),
                            ({**good, names[1]: torch.zeros(3, 3)}, f"{names[1]!r} has shape"),
                            ({**good, names[2]: modified[names[2]].double()}, f"{names[2]!r} has dtype")):
            status, out = _tensor_update(server, bad, "bad")
            assert status == 400 and not out["success"] and needle in out["message"], out
            assert server.ok("/lcr/weights_checksum") == t1

        # SGLang's own load formats carry pickles: refused without unpickling anything.
        marker = tmp_path / "unpickled"

        class Payload:
            def __reduce__(self):
                return open, (str(marker), "w")

        entry = base64.b64encode(pickle.dumps([("model.norm.weight", Payload())])).decode()
        for load_format in (None, "direct", "flattened_bucket", LCR_SAFETENSORS):
            body = {"serialized_named_tensors": [entry], "load_format": load_format, "weight_version": "x"}
            with update_session(server):
                status, out = server.call("/update_weights_from_tensor", body)
            assert status == 400 and not out["success"], out
            assert ("never unpickles" if load_format != LCR_SAFETENSORS else "not safetensors") in out["message"]
        assert not marker.exists()
        assert server.ok("/lcr/weights_checksum") == t1
    finally:
        _restore(server, model_dir)


def test_weight_update_waits_for_running_requests_unless_paused(server, hf, model_dir, tmp_path):
    """SGLang's writer lock: an update waits for running requests; while paused it goes ahead."""
    new_dir = make_tiny_hf("llama", tmp_path / "new", seed=2)
    greedy = {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}}
    done_at: dict[str, float] = {}

    def timed(name, path, body):
        out = server.ok(path, body)
        done_at[name] = time.monotonic()
        return out

    server.ok("/slow_down", {"forward_sleep_time": 0.02})
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(timed, "generate", "/generate", greedy)
            _wait_running(server)
            update = pool.submit(timed, "update", "/update_weights_from_disk",
                                 {"model_path": str(new_dir), "weight_version": "v9"})
            out = running.result(timeout=60)
            assert update.result(timeout=60)["success"]
        # Client-side clocks of two responses: the update waited for the ~0.6 s generation (a few ms of
        # HTTP delivery order between the two threads is noise, seen in CI).
        assert done_at["update"] >= done_at["generate"] - 0.05
        assert out["meta_info"]["weight_version"] == "default"
        assert out["output_ids"] == hf_greedy(hf, PROMPTS[0], 30)  # all from the old weights
        _restore(server, model_dir)

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(timed, "generate", "/generate", greedy)
            _wait_running(server)
            server.ok("/pause_generation", {"mode": "in_place"})
            assert server.ok("/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "v9"})["success"]
            assert not running.done()  # frozen, not aborted
            server.ok("/continue_generation", {})
            out = running.result(timeout=60)
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert out["meta_info"]["weight_version"] == "v9"
    finally:
        server.ok("/slow_down", {"forward_sleep_time": 0})
        server.ok("/continue_generation", {})
        _restore(server, model_dir)


def test_client_disconnect_aborts_its_request(server):
    server.ok("/slow_down", {"forward_sleep_time": 0.02})
    try:
        body = json.dumps({"input_ids": PROMPTS[1], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}})
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall((f"POST /generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
            _wait_running(server)
        for _ in range(200):  # 200 tokens would take 4 s; the abort frees the server at the next step
            if server.ok("/get_server_info")["internal_states"][0]["num_running_reqs"] == 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the disconnected request kept running")
    finally:
        server.ok("/slow_down", {"forward_sleep_time": 0})


def test_reports_the_sglang_release_it_speaks(server):
    info = server.ok("/server_info")
    assert (info["version"], info["engine"]) == ("0.5.23", "lcr-serve")
    assert server.ok("/get_server_info")["version"] == "0.5.23"  # the deprecated alias, as in SGLang
    assert server.ok("/model_info")["weight_version"] == server.ok("/get_model_info")["weight_version"]
    assert server.call("/get_weight_version")[0] == 404  # gone from SGLang 0.5.8 on
