"""A vLLM rollout engine behind the same :class:`~megatron_lcr.rollout.engine.RolloutEngine` protocol.

GPU only: ``vllm`` is imported inside methods, never at module level.

**Offline ``vllm.LLM`` in the trainer's process, not ``vllm serve`` over HTTP.** Weight updates have
to run code inside vLLM's workers (receive tensors, call the model's ``load_weights``); the offline
engine does that with ``LLM.collective_rpc`` and a worker extension class
(``worker_extension_cls``), the path of vLLM's own RLHF examples
(``examples/offline_inference/rlhf_utils.py``), while the HTTP server only offers such hooks
(``/collective_rpc``, ``/sleep``, ``/wake_up``) in its development mode and has no weight-update
protocol the trainer could rely on. Token ids in, token ids and per-token log-probs out are native to
``LLM.generate`` (``RequestOutput.outputs[i].token_ids`` / ``.logprobs``). The cost: one engine per
process, no failover, and ``LLM.generate`` blocks, so calls run in a worker thread, one at a time.
Use SGLang (:mod:`megatron_lcr.rollout.client`) for a fleet of servers.

Translation, verified against vLLM's sources (``vllm/sampling_params.py``, ``vllm/outputs.py``,
``vllm/logprobs.py``):

- :class:`SamplingParams` -> vLLM ``SamplingParams(n=1, temperature, top_p, top_k, max_tokens, stop,
  stop_token_ids, seed, ignore_eos, logprobs=0)``; ``logprobs=0`` returns only the sampled token's
  log-prob. n samples are n prompts with seeds ``seed + j`` (as the SGLang client does), not vLLM's ``n``.
- ``CompletionOutput.logprobs`` is a sequence (a list or vLLM's ``FlatLogprobs``) of
  ``{token_id: Logprob(logprob, rank, decoded_token)}``, one per output token; we take the entry of
  the sampled token.
- Scoring: ``max_tokens=1, prompt_logprobs=0, temperature=1``; ``RequestOutput.prompt_logprobs`` has
  ``None`` for the first token and a dict holding each prompt token's log-prob after it.
- The engine is built with ``logprobs_mode="processed_logprobs"`` (log-probs after temperature, as
  the trainer computes them). vLLM's "processed" also reflects top-k/top-p truncation, SGLang's does
  not: the two agree when ``top_k == -1`` and ``top_p == 1`` (the RL setting).

Weight updates use the trainer's weight-update group as it is (``update_group.join_update_group``:
rank 0 hosts the store, the engine ranks ``1 .. tp_size`` join via ``update_group``) and the
model's own ``load_weights`` with Hugging Face names, as the bucketed sync produces them. Tensor
updates (mode ``tensor``) take our pickle-free ``lcr_safetensors`` payload only (``tensor_format
'safetensors'``): the tensors are decoded here and handed to every worker's ``load_weights`` by
``collective_rpc``. SGLang's pickled CUDA-IPC payload is refused: unpickling it needs sglang's
serializer, and an in-process engine gains nothing from IPC handles over the tensors themselves.

What is tested without a GPU (tests/rollout/test_vllm.py): the request/response translation above,
on plain objects with vLLM's attribute names, the tensor-update payload translation, and a worker's
group membership receiving the trainer's broadcast (gloo). What is NOT tested here (needs vLLM and CUDA): building the ``LLM``,
``generate``/``score`` end to end, ``collective_rpc`` into the worker extension, NCCL, ``load_weights``,
sleep/wake-up and prefix-cache reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lcr.rollout.engine import (
    Completion,
    GenerateRequest,
    SampleSpec,
    SamplingParams,
    ScoreResult,
    expand_samples,
)
from megatron_lcr.rollout.tensor_payload import LCR_SAFETENSORS, decode_safetensors_payload

ENGINE_URL = "vllm://local"
# Import path vLLM's workers load the extension from (worker_extension_cls).
WORKER_EXTENSION = "megatron_lcr.rollout.vllm.VLLMWorkerExtension"


@dataclass(kw_only=True)
class VLLMConfig:
    """The in-process vLLM engine."""

    model_path: str
    """Hugging Face model directory."""
    tp_size: int = 1
    """GPUs of the engine (tensor-parallel degree)."""
    dtype: str = "auto"
    """Weight/activation dtype ('auto', 'bfloat16', 'float16', 'float32')."""
    gpu_memory_utilization: float = 0.5
    """Fraction of each GPU vLLM may take (weights + KV cache)."""
    max_model_len: int | None = None
    """Longest prompt + response (tokens); None: the model's."""
    seed: int = 0
    """Engine seed (per-request seeds override it for sampling)."""
    enable_sleep_mode: bool = True
    """Allow release_memory/resume_memory (vLLM's sleep/wake_up) when colocated with the trainer."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower; faster start, less memory)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for vllm.LLM."""

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path must name a Hugging Face model directory")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM``."""
        kwargs = dict(model=self.model_path, tensor_parallel_size=self.tp_size, dtype=self.dtype,
                      gpu_memory_utilization=self.gpu_memory_utilization, seed=self.seed,
                      enable_sleep_mode=self.enable_sleep_mode, enforce_eager=self.enforce_eager,
                      logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return {**kwargs, **self.engine_kwargs}


# --------------------------------------------------------------------------- translation (pure)


def vllm_sampling_kwargs(params: SamplingParams, *, return_logprob: bool = True) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``SamplingParams`` for one sample."""
    if params.max_new_tokens < 1:
        raise ValueError(f"vLLM generates at least one token: max_new_tokens must be >= 1, got {params.max_new_tokens}")
    kwargs: dict[str, Any] = dict(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  max_tokens=params.max_new_tokens, seed=params.seed)
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.ignore_eos:
        kwargs["ignore_eos"] = True
    if return_logprob:
        kwargs["logprobs"] = 0  # the sampled token only
    return kwargs


def vllm_score_kwargs() -> dict[str, Any]:
    """vLLM ``SamplingParams`` that score a prompt: every prompt token's log-prob, one throwaway token."""
    return dict(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0)


def _logprob_of(position: Mapping[int, Any] | None, token: int, where: str) -> float:
    if not position or token not in position:
        raise ValueError(f"{where}: vLLM returned no log-prob for token {token}")
    entry = position[token]
    return float(getattr(entry, "logprob", entry))


def completion_from_vllm(output: Any, spec: SampleSpec, *, weight_version: str | None,
                         engine_url: str = ENGINE_URL) -> Completion:
    """A :class:`Completion` from a vLLM ``RequestOutput`` with one ``CompletionOutput``."""
    sample = output.outputs[0]
    token_ids = [int(t) for t in sample.token_ids]
    logprobs: list[float] = []
    if spec.return_logprob:
        positions = sample.logprobs
        if positions is None or len(positions) != len(token_ids):
            got = None if positions is None else len(positions)
            raise ValueError(f"request {spec.rid}: {len(token_ids)} tokens but {got} log-prob positions")
        logprobs = [_logprob_of(positions[i], tok, f"request {spec.rid} token {i}") for i, tok in enumerate(token_ids)]
    prompt_ids = getattr(output, "prompt_token_ids", None)
    return Completion(
        prompt_index=spec.prompt_index,
        sample_index=spec.sample_index,
        rid=spec.rid,
        output_ids=token_ids,
        output_logprobs=logprobs,
        finish_reason=sample.finish_reason,
        weight_version=weight_version,
        prompt_tokens=len(prompt_ids) if prompt_ids is not None else len(spec.input_ids),
        seed=spec.sampling.seed,
        engine_url=engine_url,
    )


def score_from_vllm(output: Any, sequence: Sequence[int], *, weight_version: str | None,
                    engine_url: str = ENGINE_URL) -> ScoreResult:
    """A :class:`ScoreResult` from a ``RequestOutput`` requested with ``prompt_logprobs=0``."""
    positions = output.prompt_logprobs
    if positions is None or len(positions) != len(sequence):
        got = None if positions is None else len(positions)
        raise ValueError(f"scored {len(sequence)} tokens but vLLM returned {got} prompt log-prob positions")
    logprobs: list[float | None] = [None]
    logprobs += [_logprob_of(positions[i], int(sequence[i]), f"prompt token {i}") for i in range(1, len(sequence))]
    return ScoreResult(input_logprobs=logprobs, weight_version=weight_version, engine_url=engine_url)


def named_tensors_from_payload(serialized_named_tensors: Sequence[str], load_format: str | None, *,
                               tp_size: int) -> list[tuple[str, Any]]:
    """The ``(HF name, CPU tensor)`` pairs of an ``/update_weights_from_tensor`` payload, for ``load_weights``."""
    if load_format != LCR_SAFETENSORS:
        raise ValueError(f"the vLLM engine takes tensor updates only in load_format {LCR_SAFETENSORS!r} "
                         f"(WeightSyncConfig.tensor_format 'safetensors'), not {load_format!r} (SGLang's pickled "
                         "form); use tensor_format 'safetensors', or mode 'distributed' or 'disk'")
    return decode_safetensors_payload(list(serialized_named_tensors), tp_size=tp_size)


def _torch_dtype(name: str):
    import torch

    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# --------------------------------------------------------------------------- inside vLLM's workers


class _UpdateGroupMember:
    """One worker's rank in the trainer's weight-update group (``update_group.join_update_group``,
    the same rendezvous SGLang uses; NCCL on GPU)."""

    def __init__(self, *, master_address: str, master_port: int, rank: int, world_size: int, backend: str,
                 group_name: str) -> None:
        from megatron_lcr.rollout.update_group import join_update_group

        self.group = join_update_group(backend=backend, master_address=master_address, master_port=master_port,
                                       world_size=world_size, rank=rank, group_name=group_name, timeout_s=1800)

    def receive(self, tensor) -> None:
        """One broadcast from rank 0 (the trainer's source) into ``tensor``."""
        from megatron_lcr.rollout.update_group import broadcast_from_source

        broadcast_from_source(self.group, tensor)


class VLLMWorkerExtension:
    """Methods vLLM mixes into its workers (``self`` is the worker: ``self.model_runner``, ``self.device``)."""

    def lcr_init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                              group_name: str, backend: str) -> None:
        from vllm.distributed.parallel_state import get_world_group

        groups = self.__dict__.setdefault("_lcr_groups", {})
        groups[group_name] = _UpdateGroupMember(master_address=master_address, master_port=master_port,
                                                rank=rank_offset + get_world_group().rank, world_size=world_size,
                                                backend=backend, group_name=group_name)

    def lcr_update_weights(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str) -> None:
        """Receive one bucket (one broadcast from rank 0 per tensor, in order), then load it."""
        import torch

        member = self.__dict__["_lcr_groups"][group_name]
        weights = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)
            member.receive(tensor)
            weights.append((name, tensor))
        self.model_runner.model.load_weights(weights=weights)
        torch.cuda.synchronize()

    def lcr_load_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        """Load (name, tensor) pairs handed over by collective_rpc (moved to this worker's device)."""
        self.model_runner.model.load_weights(weights=[(n, t.to(self.device)) for n, t in named_tensors])

    def lcr_destroy_weight_group(self, group_name: str) -> None:
        self.__dict__.get("_lcr_groups", {}).pop(group_name, None)


# --------------------------------------------------------------------------- the engine


class VLLMEngine:
    """:class:`RolloutEngine` on an in-process ``vllm.LLM`` (GPU only; see the module docstring)."""

    def __init__(self, config: VLLMConfig, *, llm: Any = None) -> None:
        self.config = config
        self._llm = llm
        self._version: str | None = "default"
        self._lock = asyncio.Lock()  # LLM is not thread-safe: one call at a time
        self._running = asyncio.Event()
        self._running.set()

    def _engine(self) -> Any:
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(**self.config.llm_kwargs())
        return self._llm

    async def _run(self, fn, *args, **kwargs):
        async with self._lock:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        from vllm import SamplingParams as VSamplingParams

        await self._running.wait()
        specs = expand_samples(requests)
        prompts = [{"prompt_token_ids": list(s.input_ids)} for s in specs]
        params = [VSamplingParams(**vllm_sampling_kwargs(s.sampling, return_logprob=s.return_logprob)) for s in specs]
        version = self._version
        outputs = await self._run(self._engine().generate, prompts, params, use_tqdm=False)
        return [completion_from_vllm(o, s, weight_version=version) for o, s in zip(outputs, specs)]

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[ScoreResult]:
        from vllm import SamplingParams as VSamplingParams

        await self._running.wait()
        prompts = [{"prompt_token_ids": list(seq)} for seq in sequences]
        version = self._version
        outputs = await self._run(self._engine().generate, prompts, VSamplingParams(**vllm_score_kwargs()),
                                  use_tqdm=False)
        return [score_from_vllm(o, seq, weight_version=version) for o, seq in zip(outputs, sequences)]

    async def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                        group_name: str, backend: str, ranks_per_engine: int | None = None) -> None:
        """Join as ranks 1 .. tp_size of the group (the trainer's source is rank 0)."""
        if world_size != 1 + self.config.tp_size:
            raise ValueError(f"world_size ({world_size}) must be 1 + tp_size ({self.config.tp_size})")
        await self._run(self._engine().collective_rpc, "lcr_init_weight_group",
                        args=(master_address, master_port, 1, world_size, group_name, backend))

    async def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], group_name: str,
                                              weight_version: str | None = None, flush_cache: bool = True) -> None:
        await self._run(self._engine().collective_rpc, "lcr_update_weights",
                        args=(list(names), list(dtypes), [list(s) for s in shapes], group_name))
        await self._after_update(weight_version, flush_cache)

    async def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, Any]], *,
                                          weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Load one bucket of (HF name, tensor) pairs (CPU tensors are fine; they are pickled to workers)."""
        await self._run(self._engine().collective_rpc, "lcr_load_weights", args=(list(named_tensors),))
        await self._after_update(weight_version, flush_cache)

    async def update_weights_from_tensor(self, *, serialized_named_tensors: Sequence[str],
                                         load_format: str | None = None, weight_version: str | None = None,
                                         flush_cache: bool = True) -> None:
        """Load one ``lcr_safetensors`` bucket (see :func:`named_tensors_from_payload`)."""
        named = named_tensors_from_payload(serialized_named_tensors, load_format, tp_size=self.config.tp_size)
        await self.update_weights_from_tensors(named, weight_version=weight_version, flush_cache=flush_cache)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       load_format: str | None = None) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no safetensors files in {model_path}")
        for path in files:
            await self.update_weights_from_tensors(list(load_file(str(path)).items()), flush_cache=False)
        await self._after_update(weight_version, True)

    async def _after_update(self, weight_version: str | None, flush_cache: bool) -> None:
        if flush_cache:
            await self.flush_cache()
        if weight_version is not None:
            self._version = weight_version

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._run(self._engine().collective_rpc, "lcr_destroy_weight_group", args=(group_name,))

    async def pause(self) -> None:
        """New generate/score calls wait until resume(); a call already running finishes."""
        self._running.clear()

    async def resume(self) -> None:
        self._running.set()

    async def flush_cache(self) -> None:
        await self._run(self._engine().reset_prefix_cache)

    async def health(self) -> dict[str, bool]:
        return {ENGINE_URL: self._llm is not None}

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """vLLM's sleep(level=1): weights offloaded to CPU, KV cache dropped (vLLM sleeps by level, not tag)."""
        await self._run(self._engine().sleep, level=1)

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._run(self._engine().wake_up, tags=None if tags is None else list(tags))

    async def weight_version(self) -> str | None:
        return self._version

    async def close(self) -> None:
        self._llm = None
