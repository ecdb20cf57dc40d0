"""What the CPU reference rollout server samples and returns, with SGLang's semantics.

Sampling parameters, the sampling math and stop rules (pure functions of tensors and token lists,
applied row by row by :mod:`megatron_lcr.rollout.reference.server`), and the ``/generate`` request
normalisation and answer layout. Semantics follow SGLang (``python/sglang/srt/sampling/sampling_params.py``,
``python/sglang/srt/layers/sampler.py``, ``Req.check_finished`` in ``managers/schedule_batch.py`` and
``DetokenizerManager.trim_matched_stop``):

- ``temperature < 1e-6`` is greedy. SGLang rewrites it to ``top_k=1, temperature=1``, so the log-prob
  it returns for a greedy token is ``log_softmax(logits)`` with no temperature. So do we.
- Otherwise ``probs = softmax(logits / T)`` and the returned log-prob of the sampled token is
  ``log(probs[token])``: **after temperature, before top-k / top-p / min-p truncation** (the kept mass is
  not renormalised). That is what the trainer computes with the same temperature, and what SGLang's
  current ``Sampler`` returns (``logprobs = log(probs)`` after ``logits.div_(temperatures)``). Older
  SGLang samplers renormalised the log-probs over the top-p set; with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``
  SGLang returns log-probs before temperature. We do neither.
- Top-k and top-p are applied jointly on the temperature-scaled distribution (SGLang's torch fallback
  and flashinfer's ``filter_apply_order="joint"``): a token is kept when it is among the ``top_k`` most
  likely and the mass of the tokens ranked before it is ``< top_p`` (the smallest prefix whose mass
  reaches ``top_p``; SGLang's fallback keeps one more token when that mass equals ``top_p`` exactly).
  ``min_p`` then drops tokens below ``min_p * max_prob``; the token is drawn from the kept mass.
- Finishing is checked in SGLang's order after each token: ``max_new_tokens`` first, then stop token ids
  and EOS (neither with ``ignore_eos``: SGLang's ``_check_token_based_finish`` returns at once), then
  stop strings on the decoded output. ``output_ids``
  keep a matched stop token; ``text`` drops it, and is cut before a matched stop string (after it with
  ``no_stop_trim``).
- Requests (``GenerateReqInput``, ``TokenizerManager``): ``n`` copies are prompt-major; log-prob
  entries are ``[logprob, token_id, text|null]``; input entries start at ``logprob_start_len`` (-1: the
  last prompt token) and the first has a null log-prob.

Randomness comes only from a per-sequence ``torch.Generator`` (see :func:`generator_seed`), never from
the global RNG, so a sequence's samples do not depend on what else is in its batch.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Below this temperature SGLang samples greedily (sampling_params.py: _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-6
# SGLang's default for a missing max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = 128

# SGLang sampling params that change the distribution or the stop rule and are not implemented here:
# a request that sets one to a non-default value is refused rather than silently sampled differently.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
}
# Accepted and without effect here (streaming and detokenizer spacing options).
_IGNORED = ("stream_interval", "spaces_between_special_tokens")


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """One request's ``sampling_params``, validated (field names and defaults as SGLang's)."""

    temperature: float = 1.0
    """Softmax temperature; < 1e-6 means greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps the whole vocabulary."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the largest one."""
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    """Tokens to generate at most; None means up to the model's context length."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded output."""
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    """Token ids that end generation (unless ignore_eos)."""
    ignore_eos: bool = False
    """Do not stop at any token: neither EOS nor stop_token_ids (SGLang's semantics; stop strings still stop)."""
    skip_special_tokens: bool = True
    """Drop special tokens when decoding text."""
    no_stop_trim: bool = False
    """Keep the matched stop string / stop token in ``text``."""
    n: int = 1
    """Samples per prompt (SGLang's parallel sampling)."""
    sampling_seed: int | None = None
    """Seed of this request's sampling stream; None derives one from the server seed and the rid."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def parse_sampling_params(params: dict[str, Any] | None) -> SamplingSpec:
    """Validate a request's ``sampling_params`` dict; ``ValueError`` names the offending key and value."""
    params = dict(params or {})
    for key in _IGNORED:
        params.pop(key, None)
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        value = params.pop(key, default)
        if value is not None and value != default:
            raise ValueError(f"sampling_params.{key}={value!r} is not supported by the CPU reference server")
    known = {f for f in SamplingSpec.__dataclass_fields__}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown sampling_params key(s): {', '.join(unknown)}")
    # SGLang treats an explicit null as "use the default".
    values = {k: v for k, v in params.items() if v is not None or k in ("max_new_tokens", "sampling_seed")}
    stop = values.get("stop", ())
    values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    values["stop_token_ids"] = frozenset(int(t) for t in values.get("stop_token_ids", ()) if t is not None)
    spec = SamplingSpec(**values)
    _validate(spec)
    return spec


def _validate(spec: SamplingSpec) -> None:
    if not math.isfinite(spec.temperature) or spec.temperature < 0:
        raise ValueError(f"temperature must be a non-negative finite number, got {spec.temperature}")
    if not 0.0 < spec.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {spec.top_p}")
    if not 0.0 <= spec.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {spec.min_p}")
    if spec.top_k != -1 and spec.top_k < 1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {spec.top_k}")
    if spec.max_new_tokens is not None and spec.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {spec.max_new_tokens}")
    if spec.n < 1:
        raise ValueError(f"n must be at least 1, got {spec.n}")
    if not all(isinstance(s, str) and s for s in spec.stop):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {list(spec.stop)!r}")


def generator_seed(*, sampling_seed: int | None, server_seed: int, rid: str, copy_index: int) -> int:
    """The 63-bit seed of one sequence's ``torch.Generator``.

    With ``sampling_seed`` the stream depends on it and on the copy index within ``n`` (so the n samples
    of one prompt differ but repeat across calls); without it, on the server seed and the request id.
    SHA-256 rather than ``hash()``: Python salts string hashes per process.
    """
    key = f"seed:{sampling_seed}:{copy_index}" if sampling_seed is not None else f"server:{server_seed}:{rid}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def temperature_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in fp32 over the last dim; greedy (T < 1e-6) counts as T = 1."""
    scale = 1.0 if temperature < GREEDY_TEMPERATURE else temperature
    return torch.log_softmax(logits.float() / scale, dim=-1)


def keep_mask(probs: torch.Tensor, *, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens survive top-k, top-p and min-p. ``probs: [V]`` -> ``bool [V]``.

    Joint top-k/top-p on ``probs`` as given (no renormalisation between them), then min-p.
    Ties are ranked by token id (stable sort), so the result is deterministic.
    """
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:  # at 1.0 no mask, as SGLang: rounding could push the tail's mass_before past 1
        keep_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep_sorted[0] = True  # the most likely token always survives
    else:
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k != -1:
        keep_sorted[top_k:] = False
    if min_p > 0.0:
        keep_sorted &= sorted_probs >= min_p * sorted_probs[0]
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def sample_token(
    logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator
) -> tuple[int, torch.Tensor]:
    """Draw the next token from ``logits: [V]``.

    Returns ``(token_id, logprobs)`` where ``logprobs: [V]`` is the distribution the token's reported
    log-prob comes from: ``temperature_logprobs(logits, T)`` (after temperature, before truncation).
    """
    logprobs = temperature_logprobs(logits, spec.temperature)
    if spec.greedy or spec.top_k == 1:
        return int(torch.argmax(logprobs)), logprobs
    probs = logprobs.exp()
    kept = torch.where(keep_mask(probs, top_k=spec.top_k, top_p=spec.top_p, min_p=spec.min_p), probs, 0.0)
    token = int(torch.multinomial(kept, 1, generator=generator))
    return token, logprobs


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """The ``k`` largest entries of ``logprobs: [V]`` as ``(logprob, token_id)``, largest first."""
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    return list(zip(values.tolist(), ids.tolist()))


def check_finish(
    output_ids: list[int],
    spec: SamplingSpec,
    *,
    max_new_tokens: int,
    eos_token_ids: frozenset[int],
    decode: Callable[[list[int]], str] | None,
) -> dict[str, Any] | None:
    """SGLang's finish reason after the last token of ``output_ids``, or None to keep going.

    ``max_new_tokens`` is the request's limit after capping to the context length; ``decode`` turns
    tokens into text for stop strings (None when the server has no tokenizer).
    """
    if len(output_ids) >= max_new_tokens:
        return {"type": "length", "length": max_new_tokens}
    last = output_ids[-1]
    if not spec.ignore_eos and (last in spec.stop_token_ids or last in eos_token_ids):
        return {"type": "stop", "matched": last}
    if spec.stop and decode is not None:
        text = decode(output_ids)
        for stop in spec.stop:
            if stop in text:
                return {"type": "stop", "matched": stop}
    return None


def visible_output(
    output_ids: list[int], finish_reason: dict[str, Any] | None, spec: SamplingSpec
) -> list[int]:
    """The output tokens whose text is returned: a matched stop token is dropped unless no_stop_trim."""
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, int) and not isinstance(matched, bool) and not spec.no_stop_trim and output_ids:
        return output_ids[:-1]
    return output_ids


def trim_stop_string(text: str, finish_reason: dict[str, Any] | None, spec: SamplingSpec) -> str:
    """Cut ``text`` at a matched stop string: before it, or after it with no_stop_trim (as SGLang)."""
    matched = (finish_reason or {}).get("matched")
    if not isinstance(matched, str):
        return text
    pos = text.find(matched)
    if pos == -1:
        return text
    return text[: pos + len(matched)] if spec.no_stop_trim else text[:pos]


# ----------------------------------------------------------------------------------------------
# /generate requests: SGLang's GenerateReqInput normalisation, and the answer's layout.
# ----------------------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request the server refuses with 400 (``{"error": {"message": ...}}``, as SGLang)."""


@dataclass(eq=False)
class Sequence:
    """One output sequence (a prompt, or one of its ``n`` copies) and its results so far."""

    rid: str
    input_ids: list[int]
    spec: SamplingSpec
    max_new_tokens: int
    """The request's limit capped to the model's context."""
    return_logprob: bool
    logprob_start_len: int
    """First prompt position with an input log-prob entry (SGLang's -1 is resolved to len - 1)."""
    top_logprobs_num: int
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[list[tuple[float, int]] | None] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    abort_message: str | None = None
    """Set by an abort; applied at the next step boundary."""
    weight_version: str = "default"
    """The server's weight version when the sequence finished (as SGLang reports it)."""
    created: float = field(default_factory=time.monotonic)
    done: Any = None
    """The asyncio future the HTTP handler awaits."""


_REFUSED_FIELDS = ("input_embeds", "image_data", "video_data", "audio_data", "lora_path",
                   "token_ids_logprob", "session_params", "custom_logit_processor")


def _per_item(body: dict, key: str, default: Any, count: int, n: int) -> list:
    """A scalar broadcast to every prompt, or a list with one value per prompt (not with n > 1)."""
    value = body.get(key)
    if value is None:
        return [default] * count
    if not isinstance(value, list):
        return [value] * count
    if n > 1:
        raise BadRequest(f"Cannot use list {key} with parallel_sample_num > 1")
    if len(value) != count:
        raise BadRequest(f"{key} has {len(value)} entries for {count} prompts")
    return value


def _prompts(body: dict, tokenizer: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequest("Either text or input_ids should be provided.")
    if text is not None:
        if tokenizer is None:
            raise BadRequest("text needs a tokenizer and the model directory has none: send input_ids")
        texts = [text] if isinstance(text, str) else text
        return [tokenizer.encode(t) for t in texts], isinstance(text, str)
    if not isinstance(input_ids, list) or not input_ids:
        raise BadRequest("input_ids cannot be empty.")
    single = not isinstance(input_ids[0], list)
    prompts = [input_ids] if single else input_ids
    for prompt in prompts:
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
            raise BadRequest(f"every prompt must be a non-empty list of token ids in [0, {vocab_size})")
    return prompts, single


def _rids(body: dict, count: int, single: bool) -> list[str]:
    rid = body.get("rid")
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{i}" for i in range(count)]
    if not isinstance(rid, list) or len(rid) != count or len(set(rid)) != count:
        raise BadRequest(f"rid must be a string or a list of {count} distinct strings")
    return [str(r) for r in rid]


def expand_generate_request(
    body: dict, *, tokenizer: Any, vocab_size: int, context_len: int, server_seed: int
) -> tuple[list[Sequence], bool]:
    """The sequences of one /generate body, and whether the answer is a single dict (not a list).

    As SGLang's ``GenerateReqInput.normalize_batch_and_arguments`` and TokenizerManager: prompt-major
    order, the ``n`` copies of a prompt next to each other, each copy with a fresh rid; a string rid
    of a batch becomes ``rid_i``; ``max_new_tokens`` is capped to the context.
    """
    for key in _REFUSED_FIELDS:
        if body.get(key) is not None:
            raise BadRequest(f"{key} is not supported by the CPU reference server")
    if body.get("stream"):
        raise BadRequest("stream is not supported by the CPU reference server")
    prompts, single = _prompts(body, tokenizer, vocab_size)
    count = len(prompts)
    raw = body.get("sampling_params")
    raw = [raw] * count if raw is None or isinstance(raw, dict) else raw
    if not isinstance(raw, list) or len(raw) != count:
        raise BadRequest(f"sampling_params must be a dict or a list of {count} dicts")
    try:
        specs = [parse_sampling_params(p) for p in raw]
    except (TypeError, ValueError) as err:
        raise BadRequest(str(err)) from err
    n = specs[0].n
    if any(s.n != n for s in specs):
        raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
    single = single and n == 1
    return_logprob = _per_item(body, "return_logprob", False, count, n)
    start_len = _per_item(body, "logprob_start_len", -1, count, n)
    top_num = _per_item(body, "top_logprobs_num", 0, count, n)
    rids = _rids(body, count, single)
    seqs = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        if len(prompt) >= context_len:
            raise BadRequest(f"the input ({len(prompt)} tokens) is longer than the model's context "
                             f"({context_len} tokens)")
        start = len(prompt) - 1 if start_len[i] == -1 or not return_logprob[i] else int(start_len[i])
        if not 0 <= start < len(prompt):
            raise BadRequest(f"logprob_start_len ({start}) is higher than the number of input tokens "
                             f"({len(prompt)}). Request with a lower logprob_start_len.")
        limit = context_len - len(prompt)
        max_new = limit if spec.max_new_tokens is None else min(spec.max_new_tokens, limit)
        for copy in range(n):
            rid = rids[i] if n == 1 else uuid.uuid4().hex
            seed = generator_seed(sampling_seed=spec.sampling_seed, server_seed=server_seed, rid=rid,
                                  copy_index=copy)
            seqs.append(Sequence(rid=rid, input_ids=list(prompt), spec=spec, max_new_tokens=max_new,
                                 return_logprob=bool(return_logprob[i]), logprob_start_len=start,
                                 top_logprobs_num=int(top_num[i] or 0),
                                 generator=torch.Generator().manual_seed(seed)))
    return seqs, single


def _logprob_items(values: list, ids: list[int], tokenizer: Any) -> list:
    """SGLang's ``[logprob, token_id, text]`` triples; text only with return_text_in_logprobs."""
    texts = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [None] * len(ids)
    return [[v, t, s] for v, t, s in zip(values, ids, texts)]


def _top_items(rows: list, tokenizer: Any) -> list:
    return [None if row is None else _logprob_items([v for v, _ in row], [t for _, t in row], tokenizer)
            for row in rows]


def generate_result(seq: Sequence, *, tokenizer: Any, text_in_logprobs: bool) -> dict[str, Any]:
    """SGLang's per-sequence /generate answer: ``{text, output_ids, meta_info}`` (no text without a
    tokenizer, as SGLang with skip_tokenizer_init)."""
    meta: dict[str, Any] = {
        "id": seq.rid,
        "finish_reason": seq.finish_reason,
        "prompt_tokens": len(seq.input_ids),
        "weight_version": seq.weight_version,
        "completion_tokens": len(seq.output_ids),
        "cached_tokens": 0,
        "e2e_latency": time.monotonic() - seq.created,
    }
    if seq.return_logprob:
        text_tok = tokenizer if text_in_logprobs else None
        start = seq.logprob_start_len
        meta["input_token_logprobs"] = _logprob_items(seq.input_logprobs, seq.input_ids[start:], text_tok)
        meta["output_token_logprobs"] = _logprob_items(seq.output_logprobs, seq.output_ids, text_tok)
        if seq.top_logprobs_num > 0:
            meta["input_top_logprobs"] = _top_items(seq.input_top, text_tok)
            meta["output_top_logprobs"] = _top_items(seq.output_top, text_tok)
    result: dict[str, Any] = {}
    if tokenizer is not None:
        ids = visible_output(seq.output_ids, seq.finish_reason, seq.spec)
        text = tokenizer.decode(ids, skip_special_tokens=seq.spec.skip_special_tokens)
        result["text"] = trim_stop_string(text, seq.finish_reason, seq.spec)
    result["output_ids"] = list(seq.output_ids)
    result["meta_info"] = meta
    return result
