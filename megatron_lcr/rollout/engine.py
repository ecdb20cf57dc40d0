"""The rollout-engine protocol the trainer talks to, and the plain data it exchanges.

The trainer never sees HTTP, SGLang or vLLM: it hands a :class:`RolloutEngine` a list of
:class:`GenerateRequest` (prompt token ids, :class:`SamplingParams`, ``n`` samples) and gets back one
:class:`Completion` per sample (response ids, the log-prob of each sampled token, the
``weight_version`` the sample was drawn with). Teacher scoring returns one :class:`ScoreResult` per
sequence. Weight updates, pause/resume and memory release are the SGLang endpoints' vocabulary
(``init_weights_update_group`` ... ``release_memory_occupation``); a sync of tensors runs between
``begin_weight_update`` and ``end_weight_update`` (SGLang's weight-update session).

Implementation: :class:`megatron_lcr.rollout.client.RolloutClient`, over HTTP, for SGLang, vLLM and
``lcr serve`` servers alike (what differs per engine and release: :mod:`megatron_lcr.rollout.server_api`).

Sample expansion: a request with ``n`` samples becomes ``n`` engine requests with request ids
``{rid}-{j}`` and seeds ``seed + j``. When the request has no seed, one is drawn per request when the
batch is expanded, so a request that is re-sent after a server failure samples with the same seed.
"""

from __future__ import annotations

import dataclasses
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Seeds are kept below 2**31: every engine's sampler (SGLang's sampling_seed, vLLM's seed,
# torch.Generator.manual_seed) accepts them.
SEED_LIMIT = 2**31


@dataclass(kw_only=True)
class SamplingParams:
    """How one response is sampled."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability, in (0, 1]."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps the whole vocabulary."""
    max_new_tokens: int = 128
    """Longest response (tokens); 0 only scores the prompt."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the response (needs a server with a tokenizer)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the response (in addition to the model's EOS)."""
    seed: int | None = None
    """Sampling seed of sample 0 (sample j uses seed + j); None draws one per request."""
    ignore_eos: bool = False
    """Never stop at a token: EOS and stop_token_ids are ignored, as SGLang does (benchmarks, tests)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")

    def to_sglang(self) -> dict:
        """The ``sampling_params`` object of SGLang's ``/generate`` (field names of its SamplingParams)."""
        params: dict = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


@dataclass(kw_only=True)
class GenerateRequest:
    """One prompt and how many responses to sample for it."""

    input_ids: list[int]
    """Prompt token ids."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Sampling parameters shared by the n samples (sample j gets seed + j)."""
    n: int = 1
    """Responses to sample for this prompt (a GRPO group)."""
    rid: str | None = None
    """Request id; sample j is sent as '{rid}-{j}'. None: a random id."""
    return_logprob: bool = True
    """Return the log-prob of every sampled token."""

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise ValueError("input_ids must hold at least one token id")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.rid is not None and not self.rid:
            raise ValueError("rid must be a non-empty string or None")


@dataclass(frozen=True, kw_only=True)
class SampleSpec:
    """One engine request: sample ``sample_index`` of prompt ``prompt_index``, its rid and seed."""

    prompt_index: int
    """Position of the prompt in the generate() call."""
    sample_index: int
    """Which of the prompt's n samples (0-based)."""
    rid: str
    """Request id sent to the engine (unique within the batch)."""
    input_ids: tuple[int, ...]
    """Prompt token ids."""
    sampling: SamplingParams
    """Sampling parameters with this sample's own seed."""
    return_logprob: bool
    """Return per-token log-probs."""


def expand_samples(requests: Sequence[GenerateRequest], rng: random.Random | None = None) -> list[SampleSpec]:
    """Turn prompts with ``n`` samples into one :class:`SampleSpec` per sample.

    Sample j of a request gets rid ``{rid}-{j}`` and seed ``seed + j``; a request without a seed
    draws one from ``rng`` (so the samples are distinct, and a re-sent sample repeats its seed).
    Raises if two samples would share a rid.
    """
    rng = rng or random.Random()
    specs: list[SampleSpec] = []
    seen: set[str] = set()
    for i, req in enumerate(requests):
        base_rid = req.rid or uuid.uuid4().hex
        base_seed = req.sampling.seed
        if base_seed is None:
            base_seed = rng.randrange(SEED_LIMIT - req.n)
        if base_seed + req.n > SEED_LIMIT:
            raise ValueError(f"request {i}: seed {base_seed} + n {req.n} exceeds 2**31")
        for j in range(req.n):
            rid = f"{base_rid}-{j}"
            if rid in seen:
                raise ValueError(f"request {i}: request id {rid!r} is used twice in one batch")
            seen.add(rid)
            sampling = dataclasses.replace(req.sampling, seed=base_seed + j)
            specs.append(SampleSpec(prompt_index=i, sample_index=j, rid=rid, input_ids=tuple(req.input_ids),
                                    sampling=sampling, return_logprob=req.return_logprob))
    return specs


@dataclass(kw_only=True)
class Completion:
    """One sampled response."""

    prompt_index: int
    """Position of its prompt in the generate() call."""
    sample_index: int
    """Which of the prompt's n samples (0-based)."""
    rid: str
    """Request id it was sampled under ('{rid}-{j}')."""
    output_ids: list[int]
    """Response token ids (including a matched stop/EOS token, as the engine returns it)."""
    output_logprobs: list[float]
    """Log-prob of each sampled token after temperature ([len(output_ids)]; empty without return_logprob)."""
    finish_reason: str | None
    """'stop' (EOS/stop token or string), 'length' (max_new_tokens) or 'abort'."""
    weight_version: str | None
    """Weights the sample was drawn with (the engine's weight_version)."""
    prompt_tokens: int
    """Prompt length as the engine counted it (tokens)."""
    seed: int | None
    """Sampling seed used."""
    engine_url: str
    """Engine that produced it."""


@dataclass(kw_only=True)
class ScoreResult:
    """Per-token log-probs of a given sequence (teacher scoring)."""

    input_logprobs: list[float | None]
    """log p(token_t | tokens_<t) for every token ([len(sequence)]; the first is None: it has no context)."""
    weight_version: str | None
    """Weights that scored it."""
    engine_url: str
    """Engine that scored it."""
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    """With ``top_k``: the engine's ``top_k`` most likely ``(token id, log-prob)`` at every position, most
    likely first ([len(sequence)]; the first is None); None when not asked for."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a set of rollout engines (one or more servers behind one object)."""

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        """One Completion per sample, ordered by (prompt index, sample index)."""

    async def score(self, sequences: Sequence[Sequence[int]], *, top_k: int = 0) -> list[ScoreResult]:
        """Per-token log-probs of each whole sequence, in order (and the ``top_k`` most likely tokens at
        each position when ``top_k > 0``)."""

    async def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                        group_name: str, backend: str, ranks_per_engine: int = 1) -> None:
        """Join every engine to a process group with the trainer's source rank (rank 0)."""

    async def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], group_name: str,
                                              weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Receive one bucket of tensors broadcast by rank 0 of the group, in the order of ``names``."""

    async def begin_weight_update(self) -> None:
        """Open the engines' weight-update session (before the first bucket of a sync)."""

    async def end_weight_update(self) -> None:
        """Close it (after the last bucket): engines finalise the loaded weights."""

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the weight-update process group."""

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       load_format: str | None = None) -> None:
        """Reload weights from a Hugging Face directory every engine can read."""

    async def update_weights_from_tensor(self, *, serialized_named_tensors: Sequence[str],
                                         load_format: str | None = None, weight_version: str | None = None,
                                         flush_cache: bool = True) -> None:
        """Load one bucket serialized once per engine TP rank (colocated engines; formats in ``tensor_payload``)."""

    async def pause(self) -> None:
        """Stop scheduling generation (before a weight sync)."""

    async def resume(self) -> None:
        """Resume generation after :meth:`pause`."""

    async def flush_cache(self) -> None:
        """Drop the prefix (radix) cache; waits until no request is running."""

    async def health(self) -> dict[str, bool]:
        """Probe every engine; ``{url: healthy}``."""

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free GPU memory (weights, KV cache) while the trainer runs on the same GPUs."""

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what :meth:`release_memory` freed."""

    async def weight_version(self) -> str | None:
        """The weight_version every engine reports (raises if engines disagree)."""

    async def close(self) -> None:
        """Abort this engine's in-flight requests and release connections."""
