"""One contract, three engines: ``lcr serve``, real SGLang (0.5.23, CPU) and real vLLM (CPU build).

Each engine runs as the trainer runs it: launched by the launcher, spoken to by the rollout client
through the per-engine API it detects, fed weights by the trainer's syncer (``train.engines.Engines``
in a one-process gloo group). References are independent: a Hugging Face model's own log-probs in
float32 (max abs diff <= 1e-4). What is checked, per engine: generation with log-probs, teacher
scoring, n samples, stop tokens, abort, pause/continue, flush, the weight version, every weight-sync
mode the engine supports, the API key, the engine and release it reports, a different model refused,
and the only server SIGKILLed in the middle of a batch: restarted, caught up to the trainer's weights,
every sample returned exactly once.

An engine whose environment is absent (``tools/engine_venv.sh``) is skipped with that reason; a
module-scoped fixture per engine keeps one server up at a time (SGLang on CPU takes ~3.5 GB).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.client import ClientConfig, RolloutClient, RolloutRequestError
from megatron_lcr.rollout.engine import GenerateRequest, SamplingParams
from megatron_lcr.rollout.sglang import SGLangLaunchConfig
from megatron_lcr.rollout.weight_sync import WeightSyncConfig
from megatron_lcr.rollout.engines import Engines, RolloutConfig, check_served_model
from tests.engine_envs import engine_python
from tests.tiny_hf import make_tiny_hf

KEY = "contract-key"
TOL = 1e-4
ENGINES = ("lcr-serve", "sglang", "vllm")
_BACKEND = {"lcr-serve": "reference", "sglang": "sglang", "vllm": "vllm"}
PROMPT = [5, 17, 33, 48, 71, 99, 120, 7]


@dataclass
class Harness:
    name: str
    engines: Engines
    model_dir: Path
    tmp: Path

    def run(self, coro):
        return self.engines.syncer.run(coro)

    @property
    def client(self) -> RolloutClient:
        return self.engines.syncer.client

    @property
    def url(self) -> str:
        return self.client.urls[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The served model (seed 0) and three others, one per weight-sync mode (head size 32: vLLM's CPU
    attention has no kernel for the default 8)."""
    root = tmp_path_factory.mktemp("contract_models")
    return {seed: make_tiny_hf("llama", root / f"m{seed}", seed=seed, head_dim=32) for seed in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM

    return {seed: AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
            for seed, path in models.items()}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, models, tmp_path_factory):
    python, reason = engine_python(request.param)
    if python is None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp(f"contract_{request.param}")
    owns_group = not torch.distributed.is_initialized()
    if owns_group:  # Engines runs on the trainer's ranks: here a world of one
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)
    server = SGLangLaunchConfig(backend=_BACKEND[request.param], python=python, base_port=0, api_key=KEY,
                                startup_timeout_s=600, env={"OMP_NUM_THREADS": "2"})
    cfg = RolloutConfig(server=server, revive_timeout_s=600,
                        sync=WeightSyncConfig(mode="distributed", disk_dir=str(tmp / "sync")))
    engines = Engines(cfg, model_path=str(models[0]), log_dir=str(tmp / "logs")).__enter__()
    try:
        yield Harness(request.param, engines, models[0], tmp)
    finally:
        engines.close()
        if owns_group:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- references


@torch.no_grad()
def hf_logprobs(model, ids: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """log p_T(ids[j] | ids[:j]) for j in [start, len(ids))."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(start, len(ids))]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def max_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def generate(h: Harness, prompt=PROMPT, *, n=1, **sampling):
    sampling.setdefault("max_new_tokens", 8)
    return h.engines.generate([GenerateRequest(input_ids=list(prompt), n=n, sampling=SamplingParams(**sampling))])


def weights_of(path: Path):
    return lambda: iter(load_file(str(path / "model.safetensors")).items())


# --------------------------------------------------------------------------- the contract


def test_reports_engine_and_release(engine):
    api = engine.run(engine.client.api(engine.url))
    assert api.engine == engine.name
    if engine.name in ("sglang", "lcr-serve"):
        assert api.version == "0.5.23"
    assert engine.run(engine.client.model_info())[engine.url].weight_version is not None


def test_sampled_tokens_logprobs_equal_the_hf_models(engine, hf):
    (c,) = generate(engine, temperature=0.7, seed=11, max_new_tokens=10, ignore_eos=True)
    assert len(c.output_ids) == 10 and c.finish_reason == "length"
    want = hf_logprobs(hf[0], PROMPT + c.output_ids, len(PROMPT), temperature=0.7)
    assert max_diff(c.output_logprobs, want) <= TOL


def test_greedy_equals_hf(engine, hf):
    (c,) = generate(engine, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    assert c.output_ids == hf_greedy(hf[0], PROMPT, 8)


def test_scoring_equals_hf(engine, hf):
    seq = PROMPT + [200, 999, 400]  # 999: the last vocabulary id, which SGLang reports back as 0
    (s,) = engine.run(engine.client.score([seq]))
    assert s.input_logprobs[0] is None and len(s.input_logprobs) == len(seq)
    assert max_diff(s.input_logprobs[1:], hf_logprobs(hf[0], seq, 1)) <= TOL


@torch.no_grad()
def test_top_k_scoring_equals_hf(engine, hf):
    """``top_k``: per position the engine's k most likely ids, in order, with HF's log-probs (ties aside:
    the tiny model's top-5 log-probs differ by far more than the tolerance)."""
    seq, k = PROMPT + [200, 999, 400], 5
    (s,) = engine.run(engine.client.score([seq], top_k=k))
    assert s.input_top_logprobs[0] is None and len(s.input_top_logprobs) == len(seq)
    logp = torch.log_softmax(hf[0](input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
    for j in range(1, len(seq)):
        want = torch.topk(logp[j - 1], k)
        assert [i for i, _ in s.input_top_logprobs[j]] == want.indices.tolist(), j
        assert max_diff([v for _, v in s.input_top_logprobs[j]], want.values.tolist()) <= TOL
    assert max_diff(s.input_logprobs[1:], hf_logprobs(hf[0], seq, 1)) <= TOL


def test_n_samples_each_with_its_own_seed_and_logprobs(engine, hf):
    out = generate(engine, n=4, temperature=1.0, seed=100, max_new_tokens=6, ignore_eos=True)
    assert [c.sample_index for c in out] == [0, 1, 2, 3] and len({c.rid for c in out}) == 4
    assert [c.seed for c in out] == [100, 101, 102, 103]
    assert len({tuple(c.output_ids) for c in out}) > 1  # distinct seeds, distinct samples
    for c in out:
        assert max_diff(c.output_logprobs, hf_logprobs(hf[0], PROMPT + c.output_ids, len(PROMPT))) <= TOL


def test_stop_token_ends_the_response(engine, hf):
    greedy = hf_greedy(hf[0], PROMPT, 8)
    stop = greedy[2]
    (c,) = generate(engine, temperature=0.0, max_new_tokens=8, stop_token_ids=[stop])
    assert c.finish_reason == "stop"
    assert c.output_ids == greedy[:greedy.index(stop) + 1]  # the matched stop token is returned
    (ignored,) = generate(engine, temperature=0.0, max_new_tokens=8, stop_token_ids=[stop], ignore_eos=True)
    assert (ignored.finish_reason, ignored.output_ids) == ("length", greedy)  # ignore_eos ignores stop ids too


def _slow_down(engine: Harness, seconds: float) -> None:
    """SGLang's test hook (and lcr serve's): sleep this long before every forward step."""
    request = urllib.request.Request(engine.url + "/slow_down", data=json.dumps({"forward_sleep_time": seconds}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def test_abort_ends_running_requests(engine):
    api = engine.run(engine.client.api(engine.url))
    if api.abort_call(None) is None:
        pytest.skip(f"{engine.name} has no abort endpoint")
    if engine.name != "vllm":
        _slow_down(engine, 0.05)  # 200 tokens take >= 10 s: the abort finds them running

    async def run():
        batch = asyncio.ensure_future(engine.client.generate([GenerateRequest(
            input_ids=PROMPT, n=4, sampling=SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=1.0))]))
        # vLLM (no /slow_down) may finish 200 tiny-model tokens within 0.3 s on an idle machine: abort at once.
        await asyncio.sleep(0.02 if engine.name == "vllm" else 0.3)
        while not batch.done():  # until every sample has ended: one abort may come before a sample starts
            await engine.client.abort()
            await asyncio.sleep(0.2)
        return await batch

    try:
        out = engine.run(run())
    finally:
        if engine.name != "vllm":
            _slow_down(engine, 0.0)
    # A sample may finish before the first abort reaches it (vLLM has no /slow_down); the rest end aborted.
    ends = [(c.finish_reason, len(c.output_ids)) for c in out]
    assert any(reason == "abort" for reason, _ in ends), ends
    assert all((reason == "abort" and n < 200) or (reason == "length" and n == 200) for reason, n in ends), ends


def test_pause_holds_new_requests_until_continue(engine):
    async def run():
        await engine.client.pause(mode="in_place")
        try:
            batch = asyncio.ensure_future(engine.client.generate([GenerateRequest(
                input_ids=PROMPT, sampling=SamplingParams(max_new_tokens=4, temperature=0.0))]))
            await asyncio.sleep(2.0)
            held = not batch.done()
        finally:
            await engine.client.resume()
        return held, await asyncio.wait_for(batch, 60)

    held, (c,) = engine.run(run())
    assert held and len(c.output_ids) == 4


def test_flush_cache_when_idle(engine):
    engine.run(engine.client.flush_cache())


def test_api_key_is_required(engine):
    async def run():
        async with RolloutClient(ClientConfig(urls=[engine.url], max_retries=0)) as keyless:
            await keyless.generate([GenerateRequest(input_ids=PROMPT, sampling=SamplingParams(max_new_tokens=2))])

    with pytest.raises(RolloutRequestError, match="401"):
        asyncio.run(run())


@pytest.mark.parametrize("mode, seed", [("distributed", 1), ("disk", 2), ("tensor", 3)])
def test_weight_sync_mode_makes_the_engine_the_new_model(engine, hf, models, mode, seed):
    engine.engines.syncer.cfg = dataclasses.replace(engine.engines.syncer.cfg, mode=mode)
    version = f"{mode}-{seed}"
    stats = engine.engines.sync_weights(weights_of(models[seed]), version)
    assert stats["weight_version"] == version and stats["bytes"] > 0
    assert engine.run(engine.client.weight_version()) == version
    (c,) = generate(engine, temperature=0.7, seed=5, max_new_tokens=8, ignore_eos=True)
    assert c.weight_version in (version, None)  # vLLM's answers carry no version; model_info does
    assert max_diff(c.output_logprobs, hf_logprobs(hf[seed], PROMPT + c.output_ids, len(PROMPT), 0.7)) <= TOL
    seq = PROMPT + c.output_ids
    (s,) = engine.run(engine.client.score([seq]))
    assert max_diff(s.input_logprobs[1:], hf_logprobs(hf[seed], seq, 1)) <= TOL


def test_a_different_model_is_refused_naming_the_url(engine, tmp_path):
    other = make_tiny_hf("qwen2", tmp_path / "qwen2", head_dim=32)
    infos = engine.run(engine.client.model_info())
    with pytest.raises(RolloutRequestError) as err:
        check_served_model(infos, str(other), launched=False)
    assert engine.url in str(err.value) and "Qwen2" in str(err.value) and "\n" not in str(err.value)


TOKENS = 200


def test_only_server_killed_mid_batch_is_restarted_caught_up_and_every_sample_returned_once(engine, hf, models):
    engine.engines.syncer.cfg = dataclasses.replace(engine.engines.syncer.cfg, mode="distributed")
    engine.engines.sync_weights(weights_of(models[1]), "7")
    handle = engine.engines._handles[0]
    old_group = handle.process.pid
    requests = [GenerateRequest(input_ids=PROMPT[:4] + [10 + i], rid=f"k{i}",
                                sampling=SamplingParams(temperature=0.7, seed=1000 + i, max_new_tokens=TOKENS,
                                                        ignore_eos=True))
                for i in range(16)]
    if engine.name != "vllm":
        _slow_down(engine, 0.02)  # the batch runs for seconds: the kill lands in the middle (a restart is fast)

    def kill_mid_batch():
        time.sleep(0.3)  # the requests are in; freeze them there, so the kill lands mid-batch on any engine
        engine.run(engine.client.pause(mode="in_place"))
        os.killpg(old_group, signal.SIGKILL)  # the server, its workers and its watchdog

    killer = threading.Thread(target=kill_mid_batch)
    killer.start()
    started = time.monotonic()
    out = engine.engines.generate(requests)
    killer.join()
    elapsed = time.monotonic() - started
    assert handle.process.pid != old_group, "the server was not restarted"
    assert sorted(c.rid for c in out) == sorted(f"k{i}-0" for i in range(16))  # each exactly once
    assert all(len(c.output_ids) == TOKENS for c in out)
    for c in out:  # drawn with the trainer's weights (model 1), never the restarted server's launch weights
        prompt = requests[c.prompt_index].input_ids
        assert max_diff(c.output_logprobs, hf_logprobs(hf[1], prompt + c.output_ids, len(prompt), 0.7)) <= TOL
    assert engine.run(engine.client.weight_version()) == "7"
    assert engine.client.healthy_urls() == [engine.url]
    print(f"{engine.name}: 16 requests, server killed mid-batch: done in {elapsed:.1f} s")
