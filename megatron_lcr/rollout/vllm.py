"""vLLM's OpenAI-compatible server as a rollout backend: what the HTTP client sends it, and how it answers.

:class:`VLLMServerAPI` is the :class:`~megatron_lcr.rollout.server_api.ServerAPI` of a vLLM server;
:func:`~megatron_lcr.rollout.server_api.detect_server_api` picks it for a server that answers
``GET /version`` (``{"version": "0.32.0"}``). The server must run with :data:`SERVER_ARGS` and
:data:`SERVER_ENV` (the launcher adds them; our package's parent directory goes on its
``PYTHONPATH`` so vLLM can import the worker extension). Paths and fields below were read from
vLLM 0.32.0's sources (``vllm/entrypoints/openai/completion/``, ``entrypoints/serve/dev/``,
``entrypoints/rl/online/api_router.py``) and checked against a running CPU build
(``tests/rollout/test_vllm.py``).

==========================  =====================================================================
generate                    ``POST /v1/completions``: ``prompt`` (token ids), ``max_tokens``,
                            ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
                            ``stop_token_ids`` (left out with ``ignore_eos``: vLLM's stops only
                            at EOS, ours at no token, as SGLang's), ``ignore_eos``, ``logprobs: 0`` (the sampled token
                            only), ``return_token_ids``, ``return_tokens_as_token_ids``,
                            ``request_id``; the penalties and ``min_p`` are sent as neutral values,
                            since otherwise the model's ``generation_config.json`` may set them.
                            Answer: ``id == "cmpl-" + request_id``; ``choices[0]`` has
                            ``token_ids``, ``logprobs.token_logprobs`` / ``logprobs.tokens``
                            (``"token_id:<id>"``, one per sampled token), ``finish_reason``.
                            Log-probs are after temperature only with ``--logprobs-mode
                            processed_logprobs`` (vLLM's default is the raw distribution);
                            "processed" also renormalises over the top-k/top-p set, so they
                            match the trainer's at top_k -1 and top_p 1 (the RL setting).
score                       the same path with ``prompt_logprobs: 0``, ``max_tokens: 1``: ``choices[0].
                            prompt_logprobs`` is ``[null, {"<id>": {"logprob", ...}}, ...]``, always
                            at temperature 1 (prompt tokens skip the sampling processors) and never
                            read from the prefix cache (vLLM skips it for prompt log-probs).
abort                       ``POST /abort_requests {"request_ids": ["cmpl-<rid>-0"]}`` (the id the
                            completions endpoint gives the engine); ``{}`` aborts everything.
pause / resume              ``POST /pause?mode=abort|keep`` (SGLang's ``in_place`` is vLLM's
                            ``keep``; SGLang's ``retract`` has no equivalent) / ``POST /resume``.
flush                       ``POST /reset_prefix_cache?reset_running_requests=true`` -> ``{success}``:
                            running (e.g. kept) requests are preempted and recompute their KV with
                            the new weights, so the reset cannot fail for want of free blocks.
memory                      ``POST /sleep?level=1`` (weights and KV cache together: its
                            ``/release_kv_cache_memory`` needs a completed ``/pause`` first),
                            ``POST /wake_up`` with ``tags`` as query parameters. Needs
                            ``--enable-sleep-mode`` on GPUs; the CPU build only logs a warning.
model info, weights         ``POST /collective_rpc {"method": "lcr_...", "kwargs": {...}}`` into
                            :mod:`megatron_lcr.rollout.vllm_worker`, answered ``{"results": [one
                            per worker]}``. Model info and the weight version come from every worker.
                            Bucket updates (``distributed``: a gloo/NCCL broadcast from the trainer;
                            ``tensor``: our ``lcr_safetensors`` payload) load between
                            ``lcr_begin_update`` and ``lcr_end_update``, which this API sends as
                            the session calls; the session's end is followed by the flush, so
                            an update's ``flush_cache`` is always honoured there, never per bucket
                            (the weights change at the session's end). A directory update is one
                            call and does not flush: the syncer flushes after every sync.
==========================  =====================================================================

Not available from vLLM's completions endpoint: the weight version a sample was drawn with
(``Completion.weight_version`` is None; the server's current version is in :meth:`parse_model_info`),
and scoring without generating a token (``max_tokens`` must be >= 1: one throwaway greedy token).
vLLM 0.32's token-in/token-out ``POST /inference/v1/generate`` (behind ``--enable-scale-out``) does
answer per-sample ``weight_versions``, but from the engine core's own label, which only vLLM's
``/update_weight_version`` sets: a second request per update, while the version here must change
with the weights themselves (the worker sets it at the session's end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_lcr.rollout.engine import Completion, SampleSpec, ScoreResult
from megatron_lcr.rollout.server_api import (
    Call,
    ModelInfo,
    UnsupportedServerError,
    reported_release,
    version_text,
)
from megatron_lcr.rollout.tensor_payload import LCR_SAFETENSORS

VLLM_OLDEST = (0, 32, 0)
"""Oldest vLLM release the client supports (its dev endpoints, pause modes and layerwise reload)."""
VLLM_NEWEST = (0, 32, 0)
"""Newest vLLM release tested (the contract tests run its CPU build)."""
WORKER_EXTENSION = "megatron_lcr.rollout.vllm_worker.LCRWorkerExtension"
PROCESSED_LOGPROBS = "processed_logprobs"
SERVER_ARGS = ("--logprobs-mode", PROCESSED_LOGPROBS, "--worker-extension-cls", WORKER_EXTENSION)
"""Flags every vLLM rollout server needs: log-probs after temperature, and our worker methods."""
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""Environment every vLLM rollout server needs: dev mode serves /collective_rpc, /pause, /sleep, ..."""

_TOKEN_PREFIX = "token_id:"
_INFO_KEYS = ("model_path", "weight_version", "logprobs_mode", "model_type", "architectures")
_SLEEP_TAGS = frozenset({"weights", "kv_cache"})


def _rpc(method: str, **kwargs: Any) -> Call:
    """A call of worker method ``method`` on every worker of the server."""
    return Call("POST", "/collective_rpc", {"method": method, "kwargs": kwargs})


# --------------------------------------------------------------------------- requests (pure)


def completion_request(spec: SampleSpec, rid: str) -> dict:
    """The ``/v1/completions`` body of one sample: token ids in, token ids and their log-probs out."""
    s = spec.sampling
    if s.max_new_tokens < 1:
        raise ValueError(f"request {rid}: vLLM generates at least one token; max_new_tokens is {s.max_new_tokens} "
                         "(score a prompt with score() instead)")
    body: dict[str, Any] = {
        "prompt": list(spec.input_ids), "max_tokens": s.max_new_tokens, "temperature": s.temperature,
        "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed, "ignore_eos": s.ignore_eos,
        "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "return_token_ids": True, "return_tokens_as_token_ids": True, "request_id": rid,
    }
    if s.stop:
        body["stop"] = list(s.stop)
    if s.stop_token_ids and not s.ignore_eos:
        # Our ignore_eos ignores stop tokens too (SGLang's rule); vLLM's only the EOS token.
        body["stop_token_ids"] = list(s.stop_token_ids)
    if spec.return_logprob:
        body["logprobs"] = 0
    return body


def score_request(sequence: Sequence[int], rid: str, top_k: int = 0) -> dict:
    """The ``/v1/completions`` body that scores ``sequence``: every prompt token's log-prob at temperature 1
    (and the ``top_k`` most likely tokens at each position)."""
    return {"prompt": list(sequence), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k,
            "return_token_ids": True, "request_id": rid}


def abort_request(rid: str | None) -> dict:
    """The ``/abort_requests`` body: the engine id of sample ``rid`` (prompt 0 of its completion), or all."""
    return {} if rid is None else {"request_ids": [f"cmpl-{rid}-0"]}


# --------------------------------------------------------------------------- answers (pure)


def _choice(body: Any, rid: str, url: str) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or len(body["choices"]) != 1:
        raise ValueError(f"request {rid}: answer from {url} is not a completion with one choice: {str(body)[:300]}")
    if body.get("id") != f"cmpl-{rid}":
        raise ValueError(f"request {rid}: answer from {url} belongs to request {body.get('id')!r}")
    choice = body["choices"][0]
    if not isinstance(choice.get("token_ids"), list):
        raise ValueError(f"request {rid}: answer from {url} has no token_ids (return_token_ids was not honoured)")
    return choice


def _sampled_logprobs(choice: dict, output_ids: list[int], rid: str) -> list[float]:
    """``logprobs.token_logprobs``, checked against the tokens they belong to (``"token_id:<id>"``)."""
    lp = choice.get("logprobs")
    values = lp.get("token_logprobs") if isinstance(lp, dict) else None
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    if not (isinstance(values, list) and isinstance(tokens, list) and len(values) == len(tokens) == len(output_ids)):
        raise ValueError(f"request {rid}: {len(output_ids)} token_ids but log-probs {str(lp)[:200]}")
    if tokens != [f"{_TOKEN_PREFIX}{t}" for t in output_ids]:
        raise ValueError(f"request {rid}: log-prob tokens {tokens[:8]}... differ from token_ids {output_ids[:8]}...")
    if any(v is None for v in values):
        raise ValueError(f"request {rid}: a sampled token has a null log-prob")
    return [float(v) for v in values]


def completion_from_answer(body: Any, spec: SampleSpec, rid: str, url: str) -> Completion:
    """One sample's :class:`Completion` from a ``/v1/completions`` answer (see the module docstring)."""
    choice = _choice(body, rid, url)
    output_ids = [int(t) for t in choice["token_ids"]]
    logprobs = _sampled_logprobs(choice, output_ids, rid) if spec.return_logprob else []
    usage = body.get("usage") or {}
    return Completion(
        prompt_index=spec.prompt_index,
        sample_index=spec.sample_index,
        rid=spec.rid,
        output_ids=output_ids,
        output_logprobs=logprobs,
        finish_reason=choice.get("finish_reason"),
        weight_version=None,
        prompt_tokens=int(usage.get("prompt_tokens", len(spec.input_ids))),
        seed=spec.sampling.seed,
        engine_url=url,
    )


def score_from_answer(body: Any, sequence: Sequence[int], rid: str, url: str, top_k: int = 0) -> ScoreResult:
    """:class:`ScoreResult` from ``choices[0].prompt_logprobs``: ``[null, {"<token id>": {"logprob": x, "rank":
    r}}, ...]``; each position holds the sequence's token and, with ``top_k``, the ranks 1..top_k."""
    items = _choice(body, rid, url).get("prompt_logprobs")
    if not isinstance(items, list) or len(items) != len(sequence):
        got = len(items) if isinstance(items, list) else items
        raise ValueError(f"request {rid}: scored {len(sequence)} tokens but prompt_logprobs has {got} entries")
    logprobs: list[float | None] = [None]
    for i in range(1, len(sequence)):
        entry = items[i].get(str(int(sequence[i]))) if isinstance(items[i], dict) else None
        if not isinstance(entry, dict) or entry.get("logprob") is None:
            raise ValueError(f"request {rid}: prompt_logprobs[{i}] has no log-prob for token {sequence[i]}: "
                             f"{str(items[i])[:200]}")
        logprobs.append(float(entry["logprob"]))
    top = [None] + [_top_entries(items[i], top_k, rid, i) for i in range(1, len(sequence))] if top_k else None
    return ScoreResult(input_logprobs=logprobs, weight_version=None, engine_url=url, input_top_logprobs=top)


def _top_entries(entries: dict, top_k: int, rid: str, pos: int) -> list[tuple[int, float]]:
    """The ranks 1..top_k of one ``prompt_logprobs`` position as ``(id, logprob)``, most likely first (the
    sequence's own token is in the dict at its rank, which may be higher)."""
    ranked = sorted((int(e["rank"]), int(tok), float(e["logprob"])) for tok, e in entries.items()
                    if isinstance(e, dict) and e.get("rank") is not None and int(e["rank"]) <= top_k)
    if len(ranked) != top_k:
        raise ValueError(f"request {rid}: prompt_logprobs[{pos}] has {len(ranked)} entries of rank <= {top_k}: "
                         f"{str(entries)[:200]}")
    return [(tok, lp) for _, tok, lp in ranked]


def model_info_from_results(body: Any) -> ModelInfo:
    """:class:`ModelInfo` from ``lcr_model_info`` on every worker; the workers must agree.

    Raises :class:`UnsupportedServerError` for a server launched without ``--logprobs-mode
    processed_logprobs``: its sample log-probs would be before temperature, unlike the trainer's.
    """
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise ValueError(f"lcr_model_info answered no worker results: {str(body)[:200]}")
    first = results[0]
    for key in _INFO_KEYS:
        values = [r.get(key) for r in results]
        if any(v != values[0] for v in values):
            raise ValueError(f"the server's workers disagree on {key}: {values}")
    if first.get("logprobs_mode") != PROCESSED_LOGPROBS:
        raise UnsupportedServerError(
            f"vLLM server runs with --logprobs-mode {first.get('logprobs_mode')}: sample log-probs would not be "
            f"after temperature; launch it with --logprobs-mode {PROCESSED_LOGPROBS}")
    version = first.get("weight_version")
    return ModelInfo(model_path=first.get("model_path"), weight_version=None if version is None else str(version),
                     model_type=first.get("model_type"), architectures=first.get("architectures"))


def _sleep_call(tags: Sequence[str] | None) -> Call:
    # /sleep releases both; /release_kv_cache_memory (the KV cache alone) needs a completed /pause first.
    if tags is not None and frozenset(tags) != _SLEEP_TAGS:
        raise UnsupportedServerError(f"vLLM releases the weights and the KV cache together (/sleep); "
                                     f"asked for {sorted(set(tags))}")
    return Call("POST", "/sleep?level=1")


def _wake_call(tags: Sequence[str] | None) -> Call:
    if tags is None:
        return Call("POST", "/wake_up")
    unknown = sorted(set(tags) - _SLEEP_TAGS)
    if unknown:
        raise UnsupportedServerError(f"vLLM's wake_up knows tags {sorted(_SLEEP_TAGS)}, not {unknown}")
    return Call("POST", "/wake_up?" + "&".join(f"tags={t}" for t in tags))


# --------------------------------------------------------------------------- the API object


@dataclass(frozen=True)
class VLLMServerAPI:
    """vLLM's OpenAI-compatible server with our worker extension, at one release."""

    release: tuple[int, ...] = VLLM_NEWEST
    """vLLM release the server runs."""

    def __post_init__(self) -> None:
        if self.release < VLLM_OLDEST:
            raise UnsupportedServerError(f"vLLM {version_text(self.release)} is older than the oldest supported "
                                         f"release {version_text(VLLM_OLDEST)}")

    @property
    def engine(self) -> str:
        return "vllm"

    @property
    def version(self) -> str:
        return version_text(self.release)

    @property
    def has_checksums(self) -> bool:
        return False  # GET /lcr/weights_checksum is lcr serve's alone

    def generate_call(self, spec: SampleSpec, rid: str) -> Call:
        return Call("POST", "/v1/completions", completion_request(spec, rid))

    def parse_generate(self, body: Any, spec: SampleSpec, rid: str, url: str) -> Completion:
        return completion_from_answer(body, spec, rid, url)

    def score_call(self, sequence: Sequence[int], rid: str, top_k: int = 0) -> Call:
        return Call("POST", "/v1/completions", score_request(sequence, rid, top_k))

    def parse_score(self, body: Any, sequence: Sequence[int], rid: str, url: str, top_k: int = 0) -> ScoreResult:
        return score_from_answer(body, sequence, rid, url, top_k)

    def abort_call(self, rid: str | None) -> Call:
        return Call("POST", "/abort_requests", abort_request(rid))

    def model_info_call(self) -> Call:
        return _rpc("lcr_model_info")

    def parse_model_info(self, body: Any) -> ModelInfo:
        return model_info_from_results(body)

    def begin_update_calls(self) -> list[Call]:
        return [_rpc("lcr_begin_update")]

    def end_update_calls(self) -> list[Call]:
        return [_rpc("lcr_end_update"), self.flush_call()]

    def init_group_call(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                        group_name: str, backend: str) -> Call:
        return _rpc("lcr_init_group", master_address=master_address, master_port=master_port,
                    rank_offset=rank_offset, world_size=world_size, group_name=group_name, backend=backend)

    def update_distributed_call(self, *, names: Sequence[str], dtypes: Sequence[str],
                                shapes: Sequence[Sequence[int]], group_name: str, weight_version: str | None,
                                flush_cache: bool) -> Call:
        return _rpc("lcr_update_from_group", names=list(names), dtypes=list(dtypes),
                    shapes=[list(s) for s in shapes], group_name=group_name, weight_version=weight_version)

    def destroy_group_call(self, group_name: str) -> Call:
        return _rpc("lcr_destroy_group", group_name=group_name)

    def update_disk_call(self, model_path: str, *, weight_version: str | None, load_format: str | None) -> Call:
        if load_format not in (None, "auto"):
            raise UnsupportedServerError(f"vLLM reloads a directory in the format it was launched with; "
                                         f"load_format {load_format!r} is not supported")
        return _rpc("lcr_update_from_disk", model_path=model_path, weight_version=weight_version)

    def update_tensor_call(self, *, serialized_named_tensors: Sequence[str], load_format: str | None,
                           weight_version: str | None, flush_cache: bool) -> Call:
        if load_format != LCR_SAFETENSORS:
            raise UnsupportedServerError(
                f"vLLM servers take tensor updates in load_format {LCR_SAFETENSORS!r} only (rollout.sync."
                f"tensor_format 'safetensors'), not {load_format!r}; or use sync mode 'distributed' or 'disk'")
        if not serialized_named_tensors:
            raise ValueError("serialized_named_tensors is empty")
        # Every lcr_safetensors entry holds the whole bucket; each worker shards it itself: send one.
        return _rpc("lcr_update_from_tensors", payload=serialized_named_tensors[0], weight_version=weight_version)

    def pause_call(self, mode: str | None) -> Call:
        vllm_mode = {None: "abort", "abort": "abort", "in_place": "keep"}.get(mode)
        if vllm_mode is None:
            raise UnsupportedServerError(f"vLLM's /pause has modes abort, keep (SGLang's in_place), wait; "
                                         f"not {mode!r}")
        return Call("POST", f"/pause?mode={vllm_mode}")

    def resume_call(self) -> Call:
        return Call("POST", "/resume")

    def flush_call(self) -> Call:
        return Call("POST", "/reset_prefix_cache?reset_running_requests=true")

    def release_memory_call(self, tags: Sequence[str] | None) -> Call:
        return _sleep_call(tags)

    def resume_memory_call(self, tags: Sequence[str] | None) -> Call:
        return _wake_call(tags)

    def check_answer(self, body: Any, url: str, path: str) -> None:
        # /reset_prefix_cache answers 200 {"success": false} when it could not reset.
        if isinstance(body, dict) and (body.get("success") is False or "error" in body):
            raise RuntimeError(f"{url}{path} failed: {str(body)[:300]}")


def vllm_api_from_version(info: Any, url: str, *, allow_newer: bool = False) -> VLLMServerAPI:
    """The API of a vLLM server from its ``GET /version`` answer ``{"version": "0.32.0"}``."""
    return VLLMServerAPI(release=reported_release(info, url, engine="vLLM", oldest=VLLM_OLDEST, newest=VLLM_NEWEST,
                                                  allow_newer=allow_newer))
