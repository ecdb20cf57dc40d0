"""The rollout engine data types and the SGLang HTTP client, against real ``lcr serve`` processes.

Unit tests cover sample expansion and the translation of SGLang's ``/generate`` answers. The rest
runs reference servers (SGLang's native API on CPU) on loopback: sampling, scoring against the
Hugging Face model itself, the API key, a tensor weight update of every server, /flush_cache retries,
abort on close, a server SIGKILLed in the middle of a 64-request batch, and a hung (SIGSTOPped) server.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
import urllib.request

import pytest
import torch

from megatron_lcr.rollout.client import (
    ClientClosedError,
    ClientConfig,
    NoHealthyServerError,
    RolloutRequestError,
    RolloutClient,
)
from megatron_lcr.rollout.checksum import tensor_checksum
from megatron_lcr.rollout.engine import GenerateRequest, RolloutEngine, SamplingParams, expand_samples
from megatron_lcr.parallel.env import free_ports
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, restart_callback, stop_servers
from megatron_lcr.rollout.tensor_payload import serialize_bucket
from tests.tiny_hf import hf_logits, make_tiny_hf

API_KEY = "test-key"


def _post(url: str, path: str, body: dict, api_key: str | None = API_KEY) -> None:
    """A raw SGLang call the client has no method for (``/slow_down``, a test hook of SGLang's)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def _launch(model_dir, tmp_dir, n: int, **kw):
    cfg = SGLangLaunchConfig(backend="reference", model_path=str(model_dir), num_servers=n, ports=free_ports(n),
                             log_dir=str(tmp_dir), startup_timeout_s=120,
                             env={"OMP_NUM_THREADS": "1"},  # two servers on a small CPU: no thread oversubscription
                             **kw)
    return launch_servers(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf("llama", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Two reference servers that require an API key."""
    handles = _launch(model_dir, tmp_path_factory.mktemp("logs"), 2, api_key=API_KEY)
    yield handles
    stop_servers(handles)


def _client(urls, **kw) -> RolloutClient:
    kw.setdefault("api_key", API_KEY)
    return RolloutClient(ClientConfig(urls=list(urls), **kw))


# --------------------------------------------------------------------------- units


def test_sampling_params_validate_and_translate():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, stop_token_ids=[2], seed=11, ignore_eos=True)
    assert params.to_sglang() == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 5,
                                  "stop_token_ids": [2], "sampling_seed": 11, "ignore_eos": True}
    assert SamplingParams().to_sglang() == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 128}
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=-1), dict(seed=2**31)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_expand_samples_gives_distinct_rids_and_consecutive_seeds():
    reqs = [GenerateRequest(input_ids=[5, 6], n=3, rid="a", sampling=SamplingParams(seed=100)),
            GenerateRequest(input_ids=[7], n=2, rid="b")]
    specs = expand_samples(reqs, __import__("random").Random(0))
    assert [(s.prompt_index, s.sample_index, s.rid) for s in specs] == [
        (0, 0, "a-0"), (0, 1, "a-1"), (0, 2, "a-2"), (1, 0, "b-0"), (1, 1, "b-1")]
    assert [s.sampling.seed for s in specs[:3]] == [100, 101, 102]
    assert specs[4].sampling.seed == specs[3].sampling.seed + 1  # drawn once per request
    with pytest.raises(ValueError, match="used twice"):
        expand_samples([GenerateRequest(input_ids=[1], rid="x"), GenerateRequest(input_ids=[1], rid="x")])


def test_client_config_validation():
    with pytest.raises(ValueError, match="distinct"):
        ClientConfig(urls=["http://a:1", "http://a:1/"])
    with pytest.raises(ValueError, match="http"):
        ClientConfig(urls=["a:1"])
    with pytest.raises(ValueError, match="backoff_s"):
        ClientConfig(urls=["http://a:1"], backoff_s=5, backoff_max_s=1)


def test_no_server_listening_fails_fast():
    async def run():
        async with _client([f"http://127.0.0.1:{free_ports(1)[0]}"], health_timeout_s=2) as client:
            with pytest.raises(NoHealthyServerError):
                await client.generate([GenerateRequest(input_ids=[5, 6])])

    asyncio.run(run())


# --------------------------------------------------------------------------- against reference servers


def test_generate_n_samples_distinct_and_consistent_with_scoring(servers, model_dir):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]

    async def run():
        async with _client(h.url for h in servers) as client:
            assert isinstance(client, RolloutEngine)
            sampling = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
            reqs = [GenerateRequest(input_ids=p, n=4, sampling=sampling) for p in prompts]
            out = await client.generate(reqs)
            again = await client.generate([GenerateRequest(input_ids=prompts[0], n=1, sampling=SamplingParams(
                temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=out[0].seed))])
            scores = await client.score([prompts[c.prompt_index] + c.output_ids for c in out])
            return out, again, scores

    out, again, scores = asyncio.run(run())
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(4)]
    assert len({c.rid for c in out}) == 12
    assert {c.engine_url for c in out} == {h.url for h in servers}  # both servers took work
    for i in range(3):
        group = [tuple(c.output_ids) for c in out if c.prompt_index == i]
        assert len(set(group)) == 4, "T=1 samples of one prompt must differ"
    for c, s in zip(out, scores):
        assert c.weight_version == "default" and c.finish_reason == "length"
        assert c.prompt_tokens == len(prompts[c.prompt_index]) and len(c.output_logprobs) == 12
        # At T=1 the log-prob of a sampled token is log_softmax of the logits: scoring agrees.
        torch.testing.assert_close(torch.tensor(s.input_logprobs[c.prompt_tokens:]),
                                   torch.tensor(c.output_logprobs), atol=1e-4, rtol=0)
    assert again[0].output_ids == out[0].output_ids  # same seed, same sample


def test_score_matches_hugging_face_model(servers, model_dir):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]

    async def run():
        async with _client(h.url for h in servers) as client:
            return await client.score(seqs)

    results = asyncio.run(run())
    for seq, res in zip(seqs, results):
        ids = torch.tensor([seq])
        ref = torch.log_softmax(hf_logits(model_dir, ids)[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert res.input_logprobs[0] is None and len(res.input_logprobs) == len(seq)
        torch.testing.assert_close(torch.tensor(res.input_logprobs[1:], dtype=torch.float64), ref,
                                   atol=1e-4, rtol=0)


def test_api_key_is_sent_and_required(servers):
    async def run():
        async with _client([servers[0].url], api_key=None) as client:
            with pytest.raises(RolloutRequestError, match="401"):
                await client.generate([GenerateRequest(input_ids=[5, 6], sampling=SamplingParams(max_new_tokens=2))])
        async with _client([servers[0].url]) as client:
            await client.flush_cache()
            return await client.weight_version()

    assert asyncio.run(run()) == "default"


def test_tensor_update_reaches_every_server_and_failures_name_it(servers, model_dir):
    from safetensors.torch import load_file

    norm = load_file(str(model_dir / "model.safetensors"))["model.norm.weight"]

    async def update(tensor, version, client):
        entries, load_format = serialize_bucket([("model.norm.weight", tensor)], "safetensors", tp_size=1)
        await client.begin_weight_update()
        try:
            await client.update_weights_from_tensor(serialized_named_tensors=entries, load_format=load_format,
                                                     weight_version=version, flush_cache=False)
        finally:
            await client.end_weight_update()

    async def run():
        async with _client([s.url for s in servers]) as client:
            try:
                await update(norm + 1.0, "t1", client)
                changed = await client.weights_checksums()
                version = await client.weight_version()
                with pytest.raises(RolloutRequestError, match=r"/update_weights_from_tensor failed: .*has shape"):
                    await update(torch.zeros(3), "bad", client)
            finally:
                await update(norm, "default", client)  # back to the launch weights for the other tests
            return changed, version, await client.weights_checksums()

    changed, version, restored = asyncio.run(run())
    assert version == "t1" and set(changed) == {s.url for s in servers}
    assert all(a["checksums"]["model.norm.weight"] == tensor_checksum(norm + 1.0) for a in changed.values())
    assert all(a["checksums"]["model.norm.weight"] == tensor_checksum(norm) for a in restored.values())


def test_flush_cache_retries_while_requests_run(servers):
    url = servers[0].url
    _post(url, "/slow_down", {"forward_sleep_time": 0.05})
    try:
        async def run():
            async with _client([url], flush_retry_s=0.1) as client:
                sampling = SamplingParams(max_new_tokens=30, ignore_eos=True)
                gen = asyncio.ensure_future(client.generate([GenerateRequest(input_ids=[5, 6, 7], sampling=sampling)]))
                await asyncio.sleep(0.3)  # the batch is running: /flush_cache answers 400
                async with _client([url], flush_timeout_s=0.5, flush_retry_s=0.1) as impatient:
                    with pytest.raises(RolloutRequestError, match="400"):
                        await impatient.flush_cache()
                await client.flush_cache()  # retried until the batch is over on the server ...
                return await asyncio.wait_for(gen, 2.0)  # ... so its answer is here or in flight (seen in CI)

        assert len(asyncio.run(run())[0].output_ids) == 30
    finally:
        _post(url, "/slow_down", {"forward_sleep_time": 0.0})


def test_close_aborts_in_flight_requests(servers):
    url = servers[1].url
    _post(url, "/slow_down", {"forward_sleep_time": 0.2})  # 100 tokens: 20 s if nothing aborts them
    try:
        async def run():
            client = _client([url])
            sampling = SamplingParams(max_new_tokens=100, ignore_eos=True)
            gen = asyncio.ensure_future(client.generate([GenerateRequest(input_ids=[5, 6, 7], n=4, sampling=sampling)]))
            await asyncio.sleep(0.5)
            await client.close()
            with pytest.raises(ClientClosedError):
                await gen
            async with _client([url], flush_timeout_s=10, flush_retry_s=0.1) as other:
                await other.flush_cache()  # succeeds only once the server is idle: raises after 10 s otherwise

        asyncio.run(run())
    finally:
        _post(url, "/slow_down", {"forward_sleep_time": 0.0})


def test_hung_server_times_out_and_requests_move(servers):
    hung, alive = servers
    os.killpg(hung.process.pid, signal.SIGSTOP)  # the server and its watchdog
    try:
        async def run():
            async with _client([hung.url, alive.url], timeout_s=2, health_timeout_s=1, backoff_s=0.0) as client:
                out = await client.generate([GenerateRequest(input_ids=[5, 6, 7], n=8,
                                                             sampling=SamplingParams(max_new_tokens=4))])
                return out, client.healthy_urls()

        out, healthy = asyncio.run(run())
    finally:
        os.killpg(hung.process.pid, signal.SIGCONT)
    assert len(out) == 8 and {c.engine_url for c in out} == {alive.url}
    assert healthy == [alive.url]


def test_killing_one_of_two_servers_mid_batch_returns_every_result_once(model_dir, tmp_path):
    handles = _launch(model_dir, tmp_path, 2)
    victim, survivor = handles
    dead_calls: list[str] = []
    restart = restart_callback(handles)

    def on_dead(url: str) -> None:
        dead_calls.append(url)
        restart(url)

    try:
        for h in handles:
            _post(h.url, "/update_weight_version", {"new_version": "3"}, api_key=None)  # as after a weight sync
            _post(h.url, "/slow_down", {"forward_sleep_time": 0.03}, api_key=None)  # a batch takes seconds
        reqs = [GenerateRequest(input_ids=[5 + i % 7, 6, 7, 8], rid=f"p{i}",
                                sampling=SamplingParams(temperature=1.0, max_new_tokens=40, seed=1000 + i,
                                                        ignore_eos=True))  # no early finish before the kill
                for i in range(64)]

        async def run():
            async with RolloutClient(ClientConfig(urls=[h.url for h in handles]), on_server_dead=on_dead) as client:
                batch = asyncio.ensure_future(client.generate(reqs))
                await asyncio.sleep(0.6)
                os.killpg(victim.process.pid, signal.SIGKILL)  # the server and its watchdog
                start = time.monotonic()
                out = await batch
                elapsed = time.monotonic() - start
                await client.wait_revivals()
                # Restarted with its launch weights ("default"), it must not serve version-3 rollouts ...
                healthy_after_restart = client.healthy_urls()
                # ... until its weights are synced: then the next health check takes it back.
                _post(victim.url, "/update_weight_version", {"new_version": "3"}, api_key=None)
                await client.health()
                after = await client.generate([GenerateRequest(input_ids=[5, 6], n=4,
                                                               sampling=SamplingParams(max_new_tokens=2))])
                return out, elapsed, healthy_after_restart, client.healthy_urls(), after

        out, elapsed, healthy_after_restart, healthy, after = asyncio.run(run())
        assert len(out) == 64 and sorted(c.rid for c in out) == sorted(f"p{i}-0" for i in range(64))
        assert all(c.engine_url == survivor.url for c in out), "no result may come from the killed server"
        assert {c.weight_version for c in out} == {"3"}
        assert dead_calls == [victim.url] and victim.alive()
        assert victim.log_path.read_text().count("starting:") == 2  # restarted, logging to the same file
        assert healthy_after_restart == [survivor.url]
        assert healthy == [victim.url, survivor.url]
        assert {c.engine_url for c in after} == {victim.url, survivor.url}

        # Re-sent samples kept their seeds: the survivor alone gives the same tokens for each seed.
        _post(survivor.url, "/slow_down", {"forward_sleep_time": 0.0}, api_key=None)

        async def reference():
            async with RolloutClient(ClientConfig(urls=[survivor.url])) as client:
                return await client.generate(reqs)

        for got, want in zip(out, asyncio.run(reference())):
            assert got.output_ids == want.output_ids and got.seed == want.seed
            assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got.output_logprobs, want.output_logprobs))
        print(f"64-request batch with one server killed at 0.6 s: finished {elapsed:.1f} s after the kill")
    finally:
        stop_servers(handles)
