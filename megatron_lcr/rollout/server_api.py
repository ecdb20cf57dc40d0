"""What the HTTP rollout client says to a server, per engine and engine version.

The client (:mod:`megatron_lcr.rollout.client`) owns what every engine shares: load balancing,
failover, retries, exactly-once results, restarts. What differs between engines, and between
releases of one engine, is here: which path and body each operation takes and how answers read.
A server's :class:`ServerAPI` is chosen once, when the client first reaches it
(:func:`detect_server_api`), from what the server reports about itself.

SGLang releases, read from each release's ``http_server.py``, ``io_struct.py`` and
``sampling_params.py`` (wheels 0.4.10 and 0.5.1 ... 0.5.23 on PyPI):

============================  ================================================================
from 0.5.1                    ``weight_version`` in ``/get_model_info`` and in every response's
                              ``meta_info``; update requests carry ``weight_version``. Older
                              releases have no weight versions: refused (a restarted server
                              could not prove which weights it holds).
from 0.5.3                    ``sampling_params.sampling_seed`` (``SamplingParams(**kwargs)``
                              raises on an unknown key before that: not sent to older servers).
from 0.5.6                    ``/model_info`` and ``/server_info`` (the ``get_`` forms stay as
                              deprecated aliases); ``/pause_generation`` takes ``mode``.
from 0.5.8                    ``/get_weight_version`` answers 404 (never used here).
from 0.5.21                   ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``
                              fail unless called between ``POST /begin_weight_update`` and
                              ``POST /end_weight_update`` (a session per sync: ``end`` finalises
                              repacked weights; ``begin`` on an open session fails).
============================  ================================================================

``lcr serve`` speaks SGLang's API as of :data:`SGLANG_NEWEST` and says so in ``/server_info``
(``"engine": "lcr-serve"``); it alone has ``/lcr/weights_checksum``. vLLM servers (``/version``,
no ``/server_info``) get their own API object from :mod:`megatron_lcr.rollout.vllm`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from megatron_lcr.rollout.engine import Completion, SampleSpec, ScoreResult

SGLANG_OLDEST = (0, 5, 1)
"""Oldest SGLang release the client supports (weight versions exist from here)."""
SGLANG_NEWEST = (0, 5, 23)
"""Newest SGLang release tested (CI runs the contract suite against it)."""
LCR_SERVE_ENGINE = "lcr-serve"


class UnsupportedServerError(RuntimeError):
    """A server whose engine or version the client cannot talk to."""


@dataclass(frozen=True)
class Call:
    """One HTTP request: method, path and JSON body (None: no body)."""

    method: str
    path: str
    payload: dict | None = None


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What a server says it serves."""

    model_path: str | None
    """Directory or name it loaded (SGLang's ``model_path``; it moves with a disk update)."""
    weight_version: str | None
    """Version of the weights it holds now."""
    model_type: str | None = None
    """Hugging Face ``model_type`` of the served model, when the engine reports it."""
    architectures: list[str] | None = None
    """Hugging Face ``architectures`` of the served model, when the engine reports it."""


def parse_version(text: str) -> tuple[int, ...]:
    """``'0.5.23'`` -> ``(0, 5, 23)``; pre-release and local suffixes are dropped (``0.5.9rc1`` -> ``(0, 5, 9)``)."""
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(parts)


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


class ServerAPI(Protocol):
    """The requests and answers of one kind of server (see the module docstring)."""

    engine: str
    """'sglang', 'lcr-serve' or 'vllm'."""
    version: str
    """The engine's own version string."""
    has_checksums: bool
    """Whether GET /lcr/weights_checksum exists (lcr serve only)."""

    def generate_call(self, spec: SampleSpec, rid: str) -> Call: ...
    def parse_generate(self, body: Any, spec: SampleSpec, rid: str, url: str) -> Completion: ...
    def score_call(self, sequence: Sequence[int], rid: str, top_k: int = 0) -> Call: ...
    def parse_score(self, body: Any, sequence: Sequence[int], rid: str, url: str, top_k: int = 0) -> ScoreResult: ...
    def abort_call(self, rid: str | None) -> Call | None: ...
    def model_info_call(self) -> Call: ...
    def parse_model_info(self, body: Any) -> ModelInfo: ...
    def begin_update_calls(self) -> list[Call]: ...
    def end_update_calls(self) -> list[Call]: ...
    def init_group_call(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                        group_name: str, backend: str) -> Call: ...
    def update_distributed_call(self, *, names: Sequence[str], dtypes: Sequence[str],
                                shapes: Sequence[Sequence[int]], group_name: str, weight_version: str | None,
                                flush_cache: bool) -> Call: ...
    def destroy_group_call(self, group_name: str) -> Call: ...
    def update_disk_call(self, model_path: str, *, weight_version: str | None, load_format: str | None) -> Call: ...
    def update_tensor_call(self, *, serialized_named_tensors: Sequence[str], load_format: str | None,
                           weight_version: str | None, flush_cache: bool) -> Call: ...
    def pause_call(self, mode: str | None) -> Call: ...
    def resume_call(self) -> Call: ...
    def flush_call(self) -> Call: ...
    def release_memory_call(self, tags: Sequence[str] | None) -> Call: ...
    def resume_memory_call(self, tags: Sequence[str] | None) -> Call: ...
    def check_answer(self, body: Any, url: str, path: str) -> None:
        """Raise RuntimeError naming ``url + path`` if a 200 answer still reports a failure."""


# --------------------------------------------------------------------------- SGLang's answers (pure)


def _meta(body: Any, rid: str) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise ValueError(f"request {rid}: /generate answer has no meta_info object: {str(body)[:300]}")
    meta = body["meta_info"]
    if meta.get("id") not in (None, rid):
        raise ValueError(f"request {rid}: answer belongs to request {meta.get('id')!r}")
    return meta


def _finish_reason(value: Any) -> str | None:
    # SGLang: {"type": "stop", "matched": 2} / {"type": "length", "length": 16} / {"type": "abort", ...}.
    if isinstance(value, dict):
        return value.get("type")
    return value


def parse_generate_response(body: Any, spec: SampleSpec, rid: str, url: str) -> Completion:
    """One sample's :class:`Completion` from SGLang's ``/generate`` answer ``{text, output_ids, meta_info}``.

    ``meta_info.output_token_logprobs`` holds ``[logprob, token_id, text|null]`` per sampled token;
    its ids must equal ``output_ids`` (a mismatch means the log-probs belong to other tokens).
    """
    meta = _meta(body, rid)
    output_ids = body.get("output_ids")
    if not isinstance(output_ids, list):
        raise ValueError(f"request {rid}: answer from {url} has no output_ids list")
    logprobs: list[float] = []
    if spec.return_logprob:
        items = meta.get("output_token_logprobs")
        if not isinstance(items, list) or len(items) != len(output_ids):
            got = len(items) if isinstance(items, list) else items
            raise ValueError(
                f"request {rid}: {len(output_ids)} output_ids but output_token_logprobs has {got} entries"
            )
        ids = [int(item[1]) for item in items]
        if ids != output_ids:
            raise ValueError(
                f"request {rid}: output_token_logprobs ids {ids[:8]}... differ from output_ids {output_ids[:8]}..."
            )
        logprobs = [float(item[0]) for item in items]
    return Completion(
        prompt_index=spec.prompt_index,
        sample_index=spec.sample_index,
        rid=spec.rid,
        output_ids=[int(t) for t in output_ids],
        output_logprobs=logprobs,
        finish_reason=_finish_reason(meta.get("finish_reason")),
        weight_version=meta.get("weight_version"),
        prompt_tokens=int(meta.get("prompt_tokens", len(spec.input_ids))),
        seed=spec.sampling.seed,
        engine_url=url,
    )


def parse_score_response(body: Any, sequence: Sequence[int], rid: str, url: str, top_k: int = 0) -> ScoreResult:
    """:class:`ScoreResult` from a scoring answer: ``meta_info.input_token_logprobs`` for every token (and
    ``input_top_logprobs``, ``[logprob, token id, text]`` x ``top_k`` per position, with ``top_k``)."""
    meta = _meta(body, rid)
    items = meta.get("input_token_logprobs")
    if not isinstance(items, list) or len(items) != len(sequence):
        got = len(items) if isinstance(items, list) else items
        raise ValueError(f"request {rid}: scored {len(sequence)} tokens but input_token_logprobs has {got} entries")
    # SGLang (0.5.23, logprob_result_processor.py) reports every id >= vocab_size - 1 as 0 there: it
    # clips image-token hashes that way. A 0 can therefore stand for the vocabulary's last token.
    for pos, (item, token) in enumerate(zip(items, sequence)):
        if int(item[1]) not in (int(token), 0):
            raise ValueError(f"request {rid}: input_token_logprobs id {item[1]} at position {pos} "
                             f"differs from the sequence's {token}")
    logprobs = [None if item[0] is None else float(item[0]) for item in items]
    if any(lp is None for lp in logprobs[1:]):
        raise ValueError(f"request {rid}: input_token_logprobs has a null log-prob after the first token")
    top = _top_rows(meta.get("input_top_logprobs"), len(sequence), top_k, rid) if top_k else None
    return ScoreResult(input_logprobs=logprobs, weight_version=meta.get("weight_version"), engine_url=url,
                       input_top_logprobs=top)


def _top_rows(rows: Any, length: int, top_k: int, rid: str) -> list[list[tuple[int, float]] | None]:
    """SGLang's ``input_top_logprobs`` (None, then per position ``top_k`` entries ``[logprob, id, text]``)
    as ``(id, logprob)`` lists, most likely first."""
    if not isinstance(rows, list) or len(rows) != length:
        got = len(rows) if isinstance(rows, list) else rows
        raise ValueError(f"request {rid}: asked for top-{top_k} log-probs of {length} tokens, got {got} entries")
    out: list[list[tuple[int, float]] | None] = [None]
    for pos, row in enumerate(rows[1:], start=1):
        if not isinstance(row, list) or len(row) != top_k or any(item[0] is None for item in row):
            raise ValueError(f"request {rid}: input_top_logprobs[{pos}] is not {top_k} entries: {str(row)[:200]}")
        out.append(sorted(((int(item[1]), float(item[0])) for item in row), key=lambda e: -e[1]))
    return out


def _optional(payload: dict, **fields: Any) -> dict:
    """``payload`` plus the fields that are not None."""
    return {**payload, **{k: v for k, v in fields.items() if v is not None}}


# --------------------------------------------------------------------------- SGLang (and lcr serve)


@dataclass(frozen=True)
class SGLangAPI:
    """SGLang's native API at one release (``lcr serve`` speaks the newest one)."""

    release: tuple[int, ...] = SGLANG_NEWEST
    """SGLang release whose API the server speaks."""
    engine: str = "sglang"
    """'sglang', or 'lcr-serve' for our CPU server."""

    def __post_init__(self) -> None:
        if self.release < SGLANG_OLDEST:
            raise UnsupportedServerError(
                f"SGLang {version_text(self.release)} is older than the oldest supported release "
                f"{version_text(SGLANG_OLDEST)} (it has no weight versions)")

    @property
    def version(self) -> str:
        return version_text(self.release)

    @property
    def has_checksums(self) -> bool:
        return self.engine == LCR_SERVE_ENGINE

    @property
    def sampling_seed(self) -> bool:
        return self.release >= (0, 5, 3)

    @property
    def update_session(self) -> bool:
        return self.release >= (0, 5, 21)

    @property
    def new_paths(self) -> bool:
        """``/model_info`` and ``/server_info`` (from 0.5.6) instead of their ``get_`` forms."""
        return self.release >= (0, 5, 6)

    def generate_call(self, spec: SampleSpec, rid: str) -> Call:
        params = spec.sampling.to_sglang()
        if not self.sampling_seed:
            params.pop("sampling_seed", None)
        return Call("POST", "/generate", {"input_ids": list(spec.input_ids), "sampling_params": params,
                                          "return_logprob": spec.return_logprob, "logprob_start_len": -1,
                                          "rid": rid})

    def parse_generate(self, body: Any, spec: SampleSpec, rid: str, url: str) -> Completion:
        return parse_generate_response(body, spec, rid, url)

    def score_call(self, sequence: Sequence[int], rid: str, top_k: int = 0) -> Call:
        # Temperature 1: the log-probs of the unscaled distribution; max_new_tokens 0 scores only.
        body = {"input_ids": list(sequence), "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                "return_logprob": True, "logprob_start_len": 0, "rid": rid}
        return Call("POST", "/generate", {**body, "top_logprobs_num": top_k} if top_k else body)

    def parse_score(self, body: Any, sequence: Sequence[int], rid: str, url: str, top_k: int = 0) -> ScoreResult:
        return parse_score_response(body, sequence, rid, url, top_k)

    def abort_call(self, rid: str | None) -> Call:
        return Call("POST", "/abort_request", {"abort_all": True} if rid is None else {"rid": rid})

    def model_info_call(self) -> Call:
        return Call("GET", "/model_info" if self.new_paths else "/get_model_info")

    def parse_model_info(self, body: Any) -> ModelInfo:
        if not isinstance(body, dict):
            raise ValueError(f"model info is not a JSON object: {str(body)[:200]}")
        version = body.get("weight_version")
        return ModelInfo(model_path=body.get("model_path"), weight_version=None if version is None else str(version),
                         model_type=body.get("model_type"), architectures=body.get("architectures"))

    def begin_update_calls(self) -> list[Call]:
        return [Call("POST", "/begin_weight_update", {})] if self.update_session else []

    def end_update_calls(self) -> list[Call]:
        return [Call("POST", "/end_weight_update", {})] if self.update_session else []

    def init_group_call(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                        group_name: str, backend: str) -> Call:
        return Call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def update_distributed_call(self, *, names: Sequence[str], dtypes: Sequence[str],
                                shapes: Sequence[Sequence[int]], group_name: str, weight_version: str | None,
                                flush_cache: bool) -> Call:
        return Call("POST", "/update_weights_from_distributed", _optional(
            {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
             "group_name": group_name, "flush_cache": flush_cache}, weight_version=weight_version))

    def destroy_group_call(self, group_name: str) -> Call:
        return Call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_disk_call(self, model_path: str, *, weight_version: str | None, load_format: str | None) -> Call:
        return Call("POST", "/update_weights_from_disk", _optional(
            {"model_path": model_path}, weight_version=weight_version, load_format=load_format))

    def update_tensor_call(self, *, serialized_named_tensors: Sequence[str], load_format: str | None,
                           weight_version: str | None, flush_cache: bool) -> Call:
        return Call("POST", "/update_weights_from_tensor", _optional(
            {"serialized_named_tensors": list(serialized_named_tensors), "flush_cache": flush_cache},
            load_format=load_format, weight_version=weight_version))

    def pause_call(self, mode: str | None) -> Call:
        if mode is not None and not self.new_paths:
            raise UnsupportedServerError(f"SGLang {self.version} has no pause modes (from 0.5.6); asked for {mode!r}")
        return Call("POST", "/pause_generation", {} if mode is None else {"mode": mode})

    def resume_call(self) -> Call:
        return Call("POST", "/continue_generation", {})

    def flush_call(self) -> Call:
        return Call("POST", "/flush_cache")

    def release_memory_call(self, tags: Sequence[str] | None) -> Call:
        return Call("POST", "/release_memory_occupation", {} if tags is None else {"tags": list(tags)})

    def resume_memory_call(self, tags: Sequence[str] | None) -> Call:
        return Call("POST", "/resume_memory_occupation", {} if tags is None else {"tags": list(tags)})

    def check_answer(self, body: Any, url: str, path: str) -> None:
        # Weight endpoints answer {success, message}; some releases answer 200 with success=false.
        if isinstance(body, dict) and body.get("success") is False:
            raise RuntimeError(f"{url}{path} failed: {body.get('message', '')}")


# --------------------------------------------------------------------------- detection


class NotFound(Exception):
    """A GET answered 404 (the path does not exist on that server)."""


Get = Callable[[str], Awaitable[Any]]
"""``await get(path)``: the JSON of a 200 answer; raises :class:`NotFound` on 404."""


def reported_release(info: Any, url: str, *, engine: str, oldest: tuple[int, ...], newest: tuple[int, ...],
                     allow_newer: bool, why_oldest: str = "") -> tuple[int, ...]:
    """The release an engine's info answer reports, checked against the supported ``oldest`` .. ``newest``
    (a newer one only with ``allow_newer``, then clamped to ``newest``); one-line errors naming ``url``."""
    if not isinstance(info, dict) or "version" not in info:
        raise UnsupportedServerError(f"{url}: {engine} info has no 'version' field: {str(info)[:200]}")
    try:
        release = parse_version(info["version"])
    except ValueError as exc:
        raise UnsupportedServerError(f"{url}: {exc}") from None
    span = f"{version_text(oldest)} to {version_text(newest)}"
    if release < oldest:
        raise UnsupportedServerError(f"{url} runs {engine} {info['version']}; supported: {span}{why_oldest}")
    if release[:3] > newest and not allow_newer:
        raise UnsupportedServerError(f"{url} runs {engine} {info['version']}, newer than the newest tested release "
                                     f"({span}); set rollout.allow_untested_engine=true to try it")
    return min(release[:3], newest)


def sglang_api_from_server_info(info: Any, url: str, *, allow_newer: bool = False) -> SGLangAPI:
    """The API of an SGLang (or ``lcr serve``) server from its ``/server_info`` answer."""
    release = reported_release(info, url, engine="SGLang", oldest=SGLANG_OLDEST, newest=SGLANG_NEWEST,
                               allow_newer=allow_newer, why_oldest=" (older releases report no weight_version)")
    engine = LCR_SERVE_ENGINE if info.get("engine") == LCR_SERVE_ENGINE else "sglang"
    return SGLangAPI(release=release, engine=engine)


async def detect_server_api(get: Get, url: str, *, allow_newer: bool = False) -> ServerAPI:
    """Ask a server what it is: SGLang ``/server_info`` (``/get_server_info`` before 0.5.6), else vLLM ``/version``."""
    for path in ("/server_info", "/get_server_info"):
        try:
            info = await get(path)
        except NotFound:
            continue
        if isinstance(info, dict) and "vllm_config" in info:
            break  # vLLM's dev mode (VLLM_SERVER_DEV_MODE=1) serves a /server_info of its own, without a version
        return sglang_api_from_server_info(info, url, allow_newer=allow_newer)
    try:
        info = await get("/version")
    except NotFound:
        raise UnsupportedServerError(f"{url} answers neither /server_info, /get_server_info (SGLang) nor "
                                     "/version (vLLM): not a rollout server this client knows") from None
    from megatron_lcr.rollout.vllm import vllm_api_from_version

    return vllm_api_from_version(info, url, allow_newer=allow_newer)
