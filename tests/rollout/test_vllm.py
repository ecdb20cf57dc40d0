"""The vLLM engine's request/response translation, without vLLM.

vLLM needs CUDA and is not installed here. These tests build plain objects with the attribute names of
vLLM's ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` (``vllm/outputs.py``, ``vllm/logprobs.py``)
and check our translation; building the engine, generation, weight loading and sleep/wake-up are not
exercised (see the docstring of ``megatron_lcr/rollout/vllm.py``). The workers' side of a weight-update
group is checked against the trainer's side on gloo; a tensor update's decoding and hand-over to
``collective_rpc`` against a stand-in that records the engine's calls.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from megatron_lcr.parallel.env import free_port
from megatron_lcr.rollout.engine import GenerateRequest, RolloutEngine, SamplingParams, expand_samples
from megatron_lcr.rollout.tensor_payload import serialize_bucket
from megatron_lcr.rollout.vllm import (
    WORKER_EXTENSION,
    VLLMConfig,
    VLLMEngine,
    _UpdateGroupMember,
    completion_from_vllm,
    named_tensors_from_payload,
    score_from_vllm,
    vllm_sampling_kwargs,
    vllm_score_kwargs,
)
from megatron_lcr.rollout.update_group import broadcast_from_source, join_update_group


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: object
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: object
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class FlatPositions(Sequence):
    """Like vLLM's FlatLogprobs: a non-list sequence of {token_id: Logprob} per position."""

    def __init__(self, positions):
        self._positions = positions

    def __len__(self):
        return len(self._positions)

    def __getitem__(self, i):
        return self._positions[i]


def _spec(**sampling):
    return expand_samples([GenerateRequest(input_ids=[5, 6, 7], rid="q", sampling=SamplingParams(**sampling))])[0]


def test_sampling_params_to_vllm_kwargs():
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=64, stop=["\n\n"], stop_token_ids=[2], seed=9)
    assert vllm_sampling_kwargs(params) == dict(n=1, temperature=0.7, top_p=0.95, top_k=-1, max_tokens=64, seed=9,
                                                stop=["\n\n"], stop_token_ids=[2], logprobs=0)
    assert "logprobs" not in vllm_sampling_kwargs(params, return_logprob=False)
    assert vllm_sampling_kwargs(SamplingParams(ignore_eos=True))["ignore_eos"] is True
    with pytest.raises(ValueError, match="at least one token"):
        vllm_sampling_kwargs(SamplingParams(max_new_tokens=0))
    assert vllm_score_kwargs() == dict(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0)


@pytest.mark.parametrize("wrap", [list, FlatPositions])
def test_completion_takes_the_sampled_tokens_logprob(wrap):
    # With logprobs=k vLLM also returns the top-k tokens; the sampled one may not be the most likely.
    positions = wrap([{11: Logprob(-0.1, 1), 12: Logprob(-2.5, 2)}, {40: Logprob(-0.3, 1), 2: Logprob(-1.7, 3)}])
    out = RequestOutput("q-0", None, [5, 6, 7], None,
                        [CompletionOutput(0, "", [12, 2], -4.2, positions, finish_reason="stop", stop_reason=2)])
    c = completion_from_vllm(out, _spec(seed=4), weight_version="v1")
    assert (c.rid, c.output_ids, c.output_logprobs, c.finish_reason, c.prompt_tokens, c.seed, c.weight_version) == (
        "q-0", [12, 2], [-2.5, -1.7], "stop", 3, 4, "v1")


def test_completion_rejects_missing_logprobs():
    short = RequestOutput("q-0", None, [5], None, [CompletionOutput(0, "", [12, 2], None, [{12: Logprob(-1.0)}])])
    with pytest.raises(ValueError, match="2 tokens but 1"):
        completion_from_vllm(short, _spec(), weight_version=None)
    wrong = RequestOutput("q-0", None, [5], None, [CompletionOutput(0, "", [12], None, [{13: Logprob(-1.0)}])])
    with pytest.raises(ValueError, match="no log-prob for token 12"):
        completion_from_vllm(wrong, _spec(), weight_version=None)


def test_score_from_prompt_logprobs():
    out = RequestOutput("s", None, [5, 6, 7], [None, {6: Logprob(-3.0, 7), 9: Logprob(-0.2, 1)}, {7: Logprob(-1.5)}])
    assert score_from_vllm(out, [5, 6, 7], weight_version="v2").input_logprobs == [None, -3.0, -1.5]
    with pytest.raises(ValueError, match="scored 4 tokens"):
        score_from_vllm(out, [5, 6, 7, 8], weight_version=None)


def test_engine_kwargs_name_an_importable_worker_extension():
    kwargs = VLLMConfig(model_path="/m", tp_size=2, engine_kwargs={"enforce_eager": True}).llm_kwargs()
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["enforce_eager"] is True
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    module, _, name = kwargs["worker_extension_cls"].rpartition(".")
    assert kwargs["worker_extension_cls"] == WORKER_EXTENSION
    cls = getattr(importlib.import_module(module), name)
    assert {"lcr_init_weight_group", "lcr_update_weights", "lcr_load_weights"} <= set(vars(cls))
    assert isinstance(VLLMEngine(VLLMConfig(model_path="/m")), RolloutEngine)  # vllm is only imported on use


def test_tensor_update_payload_translation():
    bucket = [("model.norm.weight", torch.arange(4.0)), ("lm_head.weight", torch.ones(2, 3, dtype=torch.bfloat16))]
    entries, load_format = serialize_bucket(bucket, "safetensors", tp_size=2)
    got = dict(named_tensors_from_payload(entries, load_format, tp_size=2))
    assert set(got) == {n for n, _ in bucket}
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in bucket)
    with pytest.raises(ValueError, match="entries; the engine has 2 TP ranks"):
        named_tensors_from_payload(entries[:1], load_format, tp_size=2)
    # SGLang's pickled CUDA-IPC form (load_format None, 'flattened_bucket', ...) is refused by name.
    for other in (None, "flattened_bucket"):
        with pytest.raises(ValueError, match="tensor_format 'safetensors', or mode 'distributed' or 'disk'"):
            named_tensors_from_payload(entries, other, tp_size=2)


class _RecordingLLM:
    """Stands in for ``vllm.LLM`` (not installable here): records the calls the engine makes."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", ()))


def test_engine_tensor_update_loads_the_decoded_bucket_on_every_worker():
    llm = _RecordingLLM()
    engine = VLLMEngine(VLLMConfig(model_path="/m"), llm=llm)
    entries, load_format = serialize_bucket([("model.norm.weight", torch.arange(4.0))], "safetensors", tp_size=1)
    asyncio.run(engine.update_weights_from_tensor(serialized_named_tensors=entries, load_format=load_format,
                                                  weight_version="7"))
    (method, (named,)), flush = llm.calls
    assert method == "lcr_load_weights" and flush == ("reset_prefix_cache", ())
    assert [n for n, _ in named] == ["model.norm.weight"] and torch.equal(named[0][1], torch.arange(4.0))
    assert asyncio.run(engine.weight_version()) == "7"
    with pytest.raises(ValueError, match="not None"):
        asyncio.run(engine.update_weights_from_tensor(serialized_named_tensors=entries, load_format=None))
    assert len(llm.calls) == 2 and asyncio.run(engine.weight_version()) == "7"  # nothing loaded


def _member_receives(port: int, queue) -> None:
    got = torch.zeros(3, 4)
    _UpdateGroupMember(master_address="127.0.0.1", master_port=port, rank=1, world_size=2, backend="gloo",
                       group_name=f"vllm-test-{port}").receive(got)
    queue.put(got.tolist())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trainer side picks NCCL on GPU; this checks gloo")
def test_worker_group_member_joins_the_trainers_update_group():
    # The vLLM worker side of a weight update against the trainer side, on gloo, in two processes
    # (as in production: a process holds one membership of a named group).
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    queue = ctx.Queue()
    member = ctx.Process(target=_member_receives, args=(port, queue))
    member.start()
    sent = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    # Group names are process-wide in torch; other tests in this process may have used "g".
    group = join_update_group(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=2, rank=0,
                              group_name=f"vllm-test-{port}", timeout_s=60)
    broadcast_from_source(group, sent)
    got = torch.tensor(queue.get(timeout=60))
    member.join(60)
    assert member.exitcode == 0
    assert torch.equal(got, sent)

