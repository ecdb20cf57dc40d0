"""A CPU rollout server that speaks SGLang's native HTTP API: ``lcr serve --model DIR --port P``.

It serves a Hugging Face causal LM (``AutoModelForCausalLM``, fp32 by default, eval mode, no grad) so
the rollout client, weight sync and the RL loop run without a GPU against SGLang's endpoints, field
names and response shapes (checked against sglang's ``python/sglang/srt/managers/io_struct.py``,
``entrypoints/http_server.py``, ``managers/tokenizer_manager.py``, ``managers/scheduler.py`` and
``utils/auth.py``) as of SGLang 0.5.23, the release ``/server_info`` names (with ``"engine":
"lcr-serve"``, so clients know it is not SGLang itself). Ours on top: ``GET /lcr/weights_checksum`` -> ``{"weight_version", "checksums":
{hf_name: tensor_checksum(param)}}``.

Generation: requests that arrive together are batched (up to ``--max-batch`` sequences), left-padded
with attention masks and position ids, prefilled once and decoded step by step with a KV cache
(``DynamicCache``). A batch runs until all its sequences finish; later requests wait for the next batch
(static batching: correctness over speed). Sampling, log-prob and stop semantics are SGLang's, see
:mod:`megatron_lcr.rollout.reference.sampling`. Input log-probs (``logprob_start_len >= 0``) are
``log_softmax(logits)`` without temperature, as SGLang's default (``Req.temp_scaled_logprobs=False``).
``/pause_generation`` takes SGLang's modes: ``abort`` (the default: running requests end with an abort
finish reason), ``in_place`` and ``retract`` (both freeze running requests between steps); new requests
wait until ``/continue_generation``. Weight updates wait for running batches, unless paused.

Weight-update group protocol (TP 1, one rank per server): the trainer is rank 0 and hosts the store;
everyone joins through ``update_group.join_update_group`` (SGLang's tcp:// rendezvous + PrefixStore
+ torch's group factory, so a trainer that works with this server works with SGLang). For each name of an
``/update_weights_from_distributed`` call, in order, the trainer broadcasts one tensor of the announced
shape and dtype from rank 0 (``pg.broadcast([t], opts)`` with ``opts.rootRank = 0``). The server
receives everything, validates names and shapes, and only then copies (all or nothing). As in SGLang
0.5.21+, distributed and tensor updates are refused (400) outside a session opened by ``POST
/begin_weight_update`` and closed by ``POST /end_weight_update``; a second ``begin`` while one is open
is refused too.
``/update_weights_from_tensor`` takes our pickle-free ``load_format="lcr_safetensors"`` (one base64
safetensors entry per TP rank, :mod:`megatron_lcr.rollout.tensor_payload`), validated the same way
plus dtypes. The model itself (loading, prefill/decode, weight copies) is
:class:`~megatron_lcr.rollout.reference.model.ModelRunner`.

Deviations from SGLang: no streaming, penalties, grammars, LoRA or multimodal input (refused with 400);
``/update_weights_from_tensor`` refuses SGLang's own load formats (their payload is pickled; nothing
from the network is unpickled here); ``/health`` answers without running the model; ``/health_generate`` answers 503 at
once while paused or released (SGLang times out after 20 s); there is no prefix cache to flush; with
``sampling_seed`` each of the ``n`` copies samples its own stream. As in SGLang, ``/health*`` needs no
API key; every other endpoint needs ``Authorization: Bearer KEY`` when ``--api-key`` is set.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import json
import secrets
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch
from aiohttp import web

from megatron_lcr import __version__
from megatron_lcr.rollout.reference.model import ModelRunner, read_safetensors_dir
from megatron_lcr.rollout.reference.sampling import BadRequest, SamplingSpec, Sequence, expand_generate_request, generate_result
from megatron_lcr.rollout.server_api import LCR_SERVE_ENGINE, SGLANG_NEWEST, version_text
from megatron_lcr.rollout.tensor_payload import LCR_SAFETENSORS, decode_safetensors_payload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GROUP = "weight_update_group"
MEMORY_TAGS = ("weights", "kv_cache")
# Rendezvous and collective timeouts of a weight-update group.
_COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=1800)
_HEALTH_TIMEOUT_S = 20.0
_FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """``lcr serve`` options."""

    model: str
    """Hugging Face model directory (config.json, safetensors; a tokenizer for text and stop strings)."""
    port: int
    """TCP port; 0 lets the OS pick one (printed in the ready line)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless you mean to expose the server."""
    api_key: str | None = None
    """When set, every endpoint but /health* requires ``Authorization: Bearer <key>``."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    seed: int = 0
    """Server seed; with the request id it seeds requests that carry no sampling_seed."""
    max_batch: int = 64
    """Most sequences decoded together."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")


# ---- Weight-update plumbing: the update group, blocking collectives, dtype names.


class _UpdateGroup:
    """This server's membership (one rank) of a trainer's gloo weight-update group."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str) -> None:
        from megatron_lcr.rollout.update_group import join_update_group

        self.pg = join_update_group(backend="gloo", master_address=master_address, master_port=master_port,
                                    world_size=world_size, rank=rank, group_name=group_name,
                                    timeout_s=_COLLECTIVE_TIMEOUT.total_seconds())
        self.lock = threading.Lock()

    def receive(self, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """One broadcast from rank 0 per tensor, in order."""
        from megatron_lcr.rollout.update_group import broadcast_from_source

        with self.lock:
            return [broadcast_from_source(self.pg, torch.empty(shape, dtype=dtype)) for shape, dtype in zip(shapes, dtypes)]


def _in_daemon_thread(fn: Callable, *args: Any) -> asyncio.Future:
    """Run a blocking collective in a daemon thread: a trainer that never broadcasts cannot keep the
    process alive at exit (executor threads are joined at exit; daemon threads are not)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting handler was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, err
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    threading.Thread(target=run, daemon=True, name="lcr-weight-group").start()
    return future


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise BadRequest(f"unknown dtype {name!r}")
    return dtype


# ---- The server: request queue, batching worker, pause/abort, weight-update coordination, HTTP.


async def _json_body(request: web.Request) -> dict:
    """The request's JSON object, ``{}`` when empty. JSON only: nothing from the network is unpickled."""
    raw = await request.read() if request.can_read_body else b""
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the request body is not valid JSON: {err}") from err
    if body is not None and not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body or {}


def _outcome(success: bool, message: str, **extra: Any) -> web.Response:
    """SGLang's answer to a weight/group call: ``{success, message}``, 200 or 400."""
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


class ReferenceServer:
    """Holds the model runner and the serving state; ``app()`` builds the aiohttp application."""

    def __init__(self, runner: ModelRunner, cfg: ServeConfig) -> None:
        self.runner, self.cfg = runner, cfg
        self.weight_version = "default"
        self.model_path = cfg.model
        self._queue: list[Sequence] = []
        self._running: list[Sequence] = []
        self._paused = False
        self._step_running = False
        self._updates_pending = 0
        self._released: set[str] = set()
        self._groups: dict[str, _UpdateGroup] = {}
        self._update_session = False  # between /begin_weight_update and /end_weight_update
        # One thread owns the model: forward steps and weight copies never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcr-model")
        self._cond: asyncio.Condition
        self._update_lock: asyncio.Lock
        self._worker_task: asyncio.Task

    # -- lifecycle ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        # (path, methods, handler), methods as SGLang's http_server.py
        routes = [
            ("/generate", "POST PUT", self.generate), ("/health", "GET", self.health),
            ("/health_generate", "GET", self.health_generate), ("/model_info", "GET", self.get_model_info),
            ("/get_model_info", "GET", self.get_model_info), ("/server_info", "GET", self.get_server_info),
            ("/get_server_info", "GET", self.get_server_info),
            ("/begin_weight_update", "POST", self.begin_weight_update),
            ("/end_weight_update", "POST", self.end_weight_update),
            ("/update_weight_version", "POST", self.update_weight_version),
            ("/flush_cache", "GET POST", self.flush_cache), ("/pause_generation", "POST", self.pause_generation),
            ("/continue_generation", "POST", self.continue_generation),
            ("/abort_request", "POST", self.abort_request), ("/slow_down", "GET POST", self.slow_down),
            ("/init_weights_update_group", "POST", self.init_weights_update_group),
            ("/destroy_weights_update_group", "POST", self.destroy_weights_update_group),
            ("/update_weights_from_distributed", "POST", self.update_weights_from_distributed),
            ("/update_weights_from_disk", "POST", self.update_weights_from_disk),
            ("/update_weights_from_tensor", "POST", self.update_weights_from_tensor),
            ("/release_memory_occupation", "GET POST", self.release_memory),
            ("/resume_memory_occupation", "GET POST", self.resume_memory),
            ("/lcr/weights_checksum", "GET", self.weights_checksum),
        ]
        app.add_routes([web.route(m, path, h) for path, methods, h in routes for m in methods.split()])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._cond = asyncio.Condition()
        self._update_lock = asyncio.Lock()
        self._worker_task = asyncio.create_task(self._worker())

    async def _stop(self, app: web.Application) -> None:
        self._worker_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable]) -> Any:
        key = self.cfg.api_key
        # As SGLang (utils/auth.py): health probes and CORS preflight need no key.
        if key and request.method != "OPTIONS" and not request.path.startswith("/health"):
            bearer = request.headers.get("Authorization", "")
            scheme, _, token = bearer.partition(" ")
            ok = scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())
            if not ok:
                return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except BadRequest as err:
            return web.json_response({"error": {"message": str(err)}}, status=400)

    # -- the batching worker -----------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            async with self._cond:
                await self._cond.wait_for(lambda: self._queue and not self._paused and not self._updates_pending)
                batch, self._queue = self._queue[: self.cfg.max_batch], self._queue[self.cfg.max_batch:]
                self._running = batch
                self._step_running = True
            try:
                await self._run_batch(batch)
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
                for seq in batch:
                    if not seq.done.done():
                        seq.done.set_exception(err)
            finally:
                async with self._cond:
                    self._running, self._step_running = [], False
                    self._cond.notify_all()

    async def _run_batch(self, batch: list[Sequence]) -> None:
        loop = asyncio.get_running_loop()
        state = await self._unclaim_after(loop.run_in_executor(self._executor, self.runner.prefill, batch))
        while True:
            async with self._cond:
                # Parked while paused, unless every sequence of the batch has been aborted.
                await self._cond.wait_for(lambda: not self._paused or all(
                    s.finish_reason is not None or s.abort_message for s in batch))
                if self._settle(batch):
                    return
                self._step_running = True
            await self._unclaim_after(loop.run_in_executor(self._executor, self.runner.decode_step, batch, state))

    async def _unclaim_after(self, step: Awaitable) -> Any:
        """Await a model step claimed with ``_step_running``; release the claim whatever happens."""
        try:
            return await step
        finally:
            async with self._cond:
                self._step_running = False
                self._cond.notify_all()

    def _settle(self, seqs: list[Sequence]) -> bool:
        """Apply pending aborts, answer finished sequences; True when all of ``seqs`` are finished."""
        for seq in seqs:
            if seq.finish_reason is None and seq.abort_message:
                seq.finish_reason = {"type": "abort", "message": seq.abort_message}
            if seq.finish_reason is not None and not seq.done.done():
                seq.weight_version = self.weight_version
                seq.done.set_result(None)
        return all(s.finish_reason is not None for s in seqs)

    def _abort(self, rid: str | None, abort_all: bool, message: str) -> None:
        self._abort_seqs([s for s in self._queue + self._running if abort_all or s.rid == rid], message)

    def _abort_seqs(self, seqs: list[Sequence], message: str) -> None:
        """Abort sequences: queued ones and, between steps (e.g. paused), running ones at once; during a
        step at its end. Callers hold ``_cond``, so no step can start meanwhile."""
        hit = [s for s in seqs if s.finish_reason is None]
        for seq in hit:
            seq.abort_message = message
        self._queue = [s for s in self._queue if s not in hit]
        self._settle([s for s in hit if s not in self._running or not self._step_running])
        self._cond.notify_all()

    async def _exclusive(self, fn: Callable, *args: Any) -> Any:
        """Run a weight mutation on the model thread. As SGLang's writer lock: wait until no batch is
        running, or, while generation is paused, until the running batch is parked between steps."""
        async with self._update_lock:
            try:
                async with self._cond:
                    self._updates_pending += 1  # no new batch starts meanwhile
                    await self._cond.wait_for(lambda: not self._running or (self._paused and not self._step_running))
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
            finally:
                async with self._cond:
                    self._updates_pending -= 1
                    self._cond.notify_all()

    # -- generation endpoints ----------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        runner = self.runner
        seqs, single = expand_generate_request(body, tokenizer=runner.tokenizer, vocab_size=runner.vocab_size,
                                               context_len=runner.context_len, server_seed=self.cfg.seed)
        await self._run_sequences(seqs)
        with_text = bool(body.get("return_text_in_logprobs"))
        results = [generate_result(s, tokenizer=runner.tokenizer, text_in_logprobs=with_text) for s in seqs]
        return web.json_response(results[0] if single else results)

    async def _run_sequences(self, seqs: list[Sequence]) -> None:
        if self._released:
            raise BadRequest(f"memory is released ({', '.join(sorted(self._released))}): "
                             "call /resume_memory_occupation first")
        loop = asyncio.get_running_loop()
        for seq in seqs:
            seq.done = loop.create_future()
        async with self._cond:
            self._queue += seqs
            self._cond.notify_all()
        try:
            await asyncio.gather(*(s.done for s in seqs))
        except asyncio.CancelledError:  # the client went away (handler_cancellation): free the batch slot
            async with self._cond:
                self._abort_seqs(seqs, "the client disconnected")
            raise

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        """One greedy token, as SGLang; busy means healthy, paused or released means 503."""
        if self._queue or self._running:
            return web.Response(status=200)
        if self._paused or self._released:
            return web.Response(status=503)
        seq = Sequence(rid=f"HEALTH_CHECK_{time.time()}", input_ids=[0], spec=SamplingSpec(temperature=0.0),
                       max_new_tokens=1, return_logprob=False, logprob_start_len=0, top_logprobs_num=0,
                       generator=torch.Generator())
        try:
            await asyncio.wait_for(self._run_sequences([seq]), _HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure is "unhealthy"
            return web.Response(status=503)
        return web.Response(status=200 if seq.output_ids else 503)

    async def flush_cache(self, request: web.Request) -> web.Response:
        # SGLang refuses while requests run or wait; the text is SGLang's for both outcomes.
        busy = bool(self._queue or self._running)
        return web.Response(text=_FLUSH_MESSAGE, status=400 if busy else 200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await _json_body(request)).get("mode") or "abort"
        if mode not in ("abort", "in_place", "retract"):
            raise BadRequest(f"Invalid mode: {mode!r}. Expected one of abort, in_place, retract.")
        async with self._cond:
            self._paused = True
            if mode == "abort":
                self._abort(None, True, "aborted by /pause_generation")
            # Answer once no forward step runs (and, for abort, once the aborted batch has ended).
            await self._cond.wait_for(lambda: not self._step_running and (mode != "abort" or not self._running))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        async with self._cond:
            self._paused = False
            self._cond.notify_all()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        async with self._cond:
            self._abort(body.get("rid"), bool(body.get("abort_all")), "aborted by /abort_request")
        return web.Response(status=200)

    async def slow_down(self, request: web.Request) -> web.Response:
        """SGLang's testing hook: sleep ``forward_sleep_time`` seconds after every model step."""
        self.runner.forward_sleep_s = float((await _json_body(request)).get("forward_sleep_time") or 0.0)
        return web.json_response(None)

    async def release_memory(self, request: web.Request) -> web.Response:
        tags = await self._memory_tags(request)
        if self._queue or self._running:
            raise BadRequest("cannot release memory while requests run or wait; pause or abort them first")
        self._released |= tags
        return web.json_response(None)

    async def resume_memory(self, request: web.Request) -> web.Response:
        self._released -= await self._memory_tags(request)
        return web.json_response(None)

    async def _memory_tags(self, request: web.Request) -> set[str]:
        tags = (await _json_body(request)).get("tags") or list(MEMORY_TAGS)
        unknown = set(tags) - {*MEMORY_TAGS, "cuda_graph"}
        if unknown:
            raise BadRequest(f"unknown memory tag(s) {sorted(unknown)}; known: {', '.join(MEMORY_TAGS)}")
        return set(tags) & set(MEMORY_TAGS)

    # -- information -------------------------------------------------------------------------------

    async def get_model_info(self, request: web.Request) -> web.Response:
        config = self.runner.config
        return web.json_response({
            "model_path": self.model_path, "tokenizer_path": self.cfg.model, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": self.weight_version,
            "model_type": getattr(config, "model_type", None), "architectures": getattr(config, "architectures", None),
        })

    async def get_server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.model_path, "host": self.cfg.host, "port": request.url.port,
            "dtype": self.cfg.dtype, "max_batch": self.cfg.max_batch, "seed": self.cfg.seed,
            "weight_version": self.weight_version, "api_key_required": self.cfg.api_key is not None,
            "version": version_text(SGLANG_NEWEST), "engine": LCR_SERVE_ENGINE, "lcr_version": __version__,
            "internal_states": [{"num_running_reqs": len(self._running), "num_waiting_reqs": len(self._queue),
                                 "paused": self._paused, "released": sorted(self._released)}],
        })

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body.get("new_version") is None:
            raise BadRequest("new_version is required")
        if body.get("abort_all_requests", True):
            async with self._cond:
                self._abort(None, True, "aborted by /update_weight_version")
        self.weight_version = str(body["new_version"])
        return _outcome(True, f"Weight version updated to {self.weight_version}", new_version=self.weight_version)

    async def weights_checksum(self, request: web.Request) -> web.Response:
        checksums = await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.checksums)
        return web.json_response({"weight_version": self.weight_version, "checksums": checksums})

    # -- weight updates ----------------------------------------------------------------------------

    def _updated(self, message: str, weight_version: Any, **extra: Any) -> web.Response:
        if weight_version is not None:
            self.weight_version = str(weight_version)
            message += f" Weight version updated to {self.weight_version}."
        return _outcome(True, message, **extra)

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if self._update_session:
            return _outcome(False, "a weight-update session is already open; call end_weight_update() first")
        self._update_session = True
        return _outcome(True, "Success")

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if not self._update_session:
            return _outcome(False, "no weight-update session is open; call begin_weight_update() first")
        self._update_session = False
        return _outcome(True, "Success")

    def _no_session(self, endpoint: str) -> web.Response | None:
        """SGLang >= 0.5.21: tensor and distributed updates only inside a weight-update session."""
        if self._update_session:
            return None
        return _outcome(False, f"{endpoint} must run between begin_weight_update() and end_weight_update()")

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            address, port = str(body["master_address"]), int(body["master_port"])
            rank, world_size = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as err:
            return _outcome(False, f"master_address, master_port, rank_offset and world_size are required: {err}")
        name, backend = body.get("group_name") or DEFAULT_GROUP, body.get("backend") or "nccl"
        if backend != "gloo":
            return _outcome(False, f"backend {backend!r}: the CPU reference server joins groups over gloo only")
        if name in self._groups:
            return _outcome(False, f"group {name!r} already exists; destroy it first")
        if not 0 < rank < world_size:
            return _outcome(False, f"rank_offset {rank} must be in [1, world_size={world_size}): 0 is the trainer")
        # Shielded: a group the trainer has joined stays registered even if this HTTP client is gone.
        return await asyncio.shield(self._join_group(name, address, port, rank, world_size))

    async def _join_group(self, name: str, address: str, port: int, rank: int, world_size: int) -> web.Response:
        try:
            self._groups[name] = await _in_daemon_thread(_UpdateGroup, address, port, rank, world_size, name)
        except Exception as err:  # noqa: BLE001 - any rendezvous failure is reported to the caller
            return _outcome(False, f"Failed to init group {name!r} at {address}:{port}: {err}")
        return _outcome(True, "Succeeded to initialize custom process group.")

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = (await _json_body(request)).get("group_name") or DEFAULT_GROUP
        if self._groups.pop(name, None) is None:
            return _outcome(False, f"group {name!r} does not exist")
        return _outcome(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        refused = self._no_session("update_weights_from_distributed")
        if refused is not None:
            return refused
        name = body.get("group_name") or DEFAULT_GROUP
        group = self._groups.get(name)
        if group is None:
            return _outcome(False, f"group {name!r} does not exist: call /init_weights_update_group first")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        try:
            if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                    and len(names) == len(dtypes) == len(shapes)):
                raise BadRequest("names, dtypes and shapes must be lists of equal length")
            if not all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes):
                raise BadRequest("every shape must be a list of non-negative ints")
            torch_dtypes = [_torch_dtype(d) for d in dtypes]
        except BadRequest as err:
            return _outcome(False, str(err))
        await self._abort_if_asked(body)
        # Shielded: once the trainer broadcasts, the update completes even if this HTTP client is gone.
        return await asyncio.shield(self._receive_and_apply(group, name, names, shapes, torch_dtypes, body))

    async def _receive_and_apply(self, group: _UpdateGroup, name: str, names: list, shapes: list,
                                 dtypes: list[torch.dtype], body: dict) -> web.Response:
        try:
            tensors = await _in_daemon_thread(group.receive, shapes, dtypes)
        except Exception as err:  # noqa: BLE001 - a broken collective is reported, the model untouched
            return _outcome(False, f"Failed to receive weights over group {name!r}: {err}")
        return await self._apply([(str(n), t) for n, t in zip(names, tensors)], body,
                                 "Succeeded to update parameter online.")

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        path, load_format = body.get("model_path"), body.get("load_format")
        if not path:
            return _outcome(False, "model_path is required", num_paused_requests=0)
        if load_format not in (None, "auto", "safetensors"):
            return _outcome(False, f"load_format {load_format!r} is not supported (auto, safetensors)",
                            num_paused_requests=0)
        await self._abort_if_asked(body)
        return await asyncio.shield(self._load_and_apply(str(path), body))

    async def _load_and_apply(self, path: str, body: dict) -> web.Response:
        try:
            named = await asyncio.get_running_loop().run_in_executor(None, read_safetensors_dir, path)
        except Exception as err:  # noqa: BLE001 - unreadable checkpoints are reported, the model untouched
            return _outcome(False, f"Failed to read weights from {path}: {err}", num_paused_requests=0)
        response = await self._apply(named, body, "Succeeded to update model weights.", num_paused_requests=0)
        if response.status == 200:
            self.model_path = path
        return response

    async def _apply(self, named: list[tuple[str, torch.Tensor]], body: dict, message: str, *,
                     same_dtype: bool = False, **extra: Any) -> web.Response:
        """Validate every tensor, then copy them all: a bad update leaves the model as it was."""
        try:
            self.runner.validate_weights(named, same_dtype=same_dtype)
        except BadRequest as err:
            return _outcome(False, f"Failed to update weights: {err}. The model is unchanged.", **extra)
        await self._exclusive(self.runner.copy_weights, named)
        return self._updated(message, body.get("weight_version"), **extra)

    async def _abort_if_asked(self, body: dict) -> None:
        """SGLang's ``abort_all_requests`` of an update request: abort everything queued or running first."""
        if body.get("abort_all_requests"):
            async with self._cond:
                self._abort(None, True, "aborted by a weight update")

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """Our pickle-free ``lcr_safetensors`` payload only (``tensor_payload.py``); SGLang's own formats
        are pickles, refused unread. The tensors carry their dtype, so it must equal the parameter's."""
        body = await _json_body(request)
        refused = self._no_session("update_weights_from_tensor")
        if refused is not None:
            return refused
        load_format = body.get("load_format")
        if load_format != LCR_SAFETENSORS:
            return _outcome(False, f"load_format {load_format!r} is refused: SGLang's tensor payloads are pickled "
                                   "and this server never unpickles network data; send load_format "
                                   f"{LCR_SAFETENSORS!r} (base64 safetensors) or use update_weights_from_distributed")
        try:  # base64 + safetensors parsing of a whole bucket: off the event loop
            named = await asyncio.get_running_loop().run_in_executor(
                None, decode_safetensors_payload, body.get("serialized_named_tensors"))
        except ValueError as err:
            return _outcome(False, f"Failed to update weights: {err}. The model is unchanged.")
        await self._abort_if_asked(body)
        return await asyncio.shield(self._apply(named, body, "Success", same_dtype=True))


# ---- Startup


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails at once with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise ValueError(f"cannot listen on {host}:{port}: {reason}") from err
    return sock


def serve(cfg: ServeConfig) -> None:
    """Bind, load the model, serve until SIGINT/SIGTERM. Prints ``lcr serve: ready on URL`` to stderr."""
    sock = _bind(cfg.host, cfg.port)
    try:
        runner = ModelRunner(cfg.model, DTYPES[cfg.dtype])
        asyncio.run(_serve_forever(ReferenceServer(runner, cfg), sock))
    finally:
        sock.close()


async def _serve_forever(server: ReferenceServer, sock: socket.socket) -> None:
    # handler_cancellation: a client that disconnects aborts its sequences, as SGLang does.
    app_runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, handler_cancellation=True,
                               shutdown_timeout=1.0)
    await app_runner.setup()
    await web.SockSite(app_runner, sock).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lcr serve: ready on http://{shown}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app_runner.cleanup()
