"""An asynchronous client for a fleet of SGLang servers (or CPU reference servers) over HTTP.

:class:`SGLangClient` implements :class:`~megatron_lcr.rollout.engine.RolloutEngine` on SGLang's
native API (``/generate``, ``/flush_cache``, ``/update_weights_from_distributed``, ...; field names
as in sglang's ``io_struct.py`` and ``http_server.py``). It sends one HTTP request per sample, so a
batch spreads over every server and survives losing some of them:

- **Load balancing.** Each server has ``max_concurrency`` slots. A request waits for the first free
  slot on *any* healthy server (the least busy one), so faster servers take more work. (One
  semaphore per server would pin a waiting request to the server it queued on, and a request
  queued on a server that then dies would wait for nothing.)
- **Failover.** A connection failure (refused, reset, disconnected) or a timeout triggers one
  ``/health`` probe of that server, shared by all requests that failed on it. If the probe fails,
  the server is marked unhealthy, its other in-flight requests are cancelled, and every one of them
  is re-sent to the surviving servers. ``on_server_dead(url)`` (the launcher's restart) then runs,
  and the server rejoins once it answers ``/health`` *and* reports the healthy servers'
  ``weight_version`` (a restarted server holds its launch weights, not the synced ones).
- **Exactly once.** Each sample has one task that makes one attempt at a time; an attempt that is
  cancelled or fails contributes nothing. Retries are sent as ``{rid}.retry{k}`` (SGLang rejects a rid
  already in flight, and the original may still be running on a slow server), and a response is only
  accepted if its ``meta_info.id`` is the rid of the attempt that received it. Re-sent samples keep
  their seed, so they sample the same tokens on a deterministic engine.
- **Retries.** HTTP 5xx / 429 and confirmed-transient connection failures are retried with
  exponential backoff, at most ``max_retries`` times per sample; other 4xx answers fail at once.

Control calls (weight updates, pause, flush, memory) go to every healthy server at once and raise
naming the server that failed. One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from megatron_lcr.rollout.engine import Completion, GenerateRequest, SampleSpec, ScoreResult, expand_samples

log = logging.getLogger(__name__)

T = TypeVar("T")
_JSON_HEADERS = {"Content-Type": "application/json"}
OnServerDead = Callable[[str], "Awaitable[None] | None"]


@dataclass(kw_only=True)
class ClientConfig:
    """How the rollout client reaches its servers."""

    urls: list[str]
    """Base URLs of the servers, e.g. ['http://10.0.0.5:30000']."""
    api_key: str | None = None
    """Sent as 'Authorization: Bearer KEY' (the servers' --api-key); None sends no header."""
    max_concurrency: int = 64
    """Requests in flight per server (count)."""
    timeout_s: float = 1800.0
    """Limit on one generate/score request, queueing on the server included (seconds)."""
    connect_timeout_s: float = 10.0
    """Limit on opening a connection (seconds)."""
    control_timeout_s: float = 1800.0
    """Limit on one control call: weight updates, pause, memory (seconds)."""
    health_timeout_s: float = 30.0
    """Limit on one /health probe (seconds; SGLang's own check waits up to 20 s)."""
    max_retries: int = 3
    """Re-sends of one sample after failures, before the batch fails (count)."""
    backoff_s: float = 0.5
    """First retry delay; doubles per failure of the same sample (seconds)."""
    backoff_max_s: float = 10.0
    """Longest retry delay (seconds)."""
    flush_timeout_s: float = 300.0
    """How long /flush_cache is retried while it answers 400 (requests still running) (seconds)."""
    flush_retry_s: float = 0.5
    """Pause between /flush_cache attempts (seconds)."""
    restart_dead_servers: bool = True
    """Call on_server_dead(url) for a server found dead, and take it back once healthy."""
    revive_timeout_s: float = 900.0
    """How long a restarted server may take to answer /health (seconds)."""
    seed: int | None = None
    """Seed for the per-request seeds drawn when a request has none (None: nondeterministic)."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("urls must name at least one server")
        self.urls = [u.rstrip("/") for u in self.urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"urls must be distinct, got {self.urls}")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"url {url!r} must start with http:// or https://")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        for name in ("timeout_s", "connect_timeout_s", "control_timeout_s", "health_timeout_s",
                     "flush_timeout_s", "flush_retry_s", "revive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(
                f"need 0 <= backoff_s ({self.backoff_s}) <= backoff_max_s ({self.backoff_max_s})"
            )


class RolloutRequestError(RuntimeError):
    """A request the servers answered with an error, or that failed on every retry."""


class NoHealthyServerError(RolloutRequestError):
    """Every server is down and none is being restarted."""


class ClientClosedError(RuntimeError):
    """The client was closed while the call was waiting or running."""


class _HTTPStatus(Exception):
    """A non-200 answer."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text.strip()[:500]}")
        self.status = status


class _ServerLost(Exception):
    """The server was found dead while a request to it was running."""


class _Unreachable(Exception):
    """No answer: connection refused/reset/closed, or a timeout."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(eq=False)
class _Server:
    """The client's view of one server."""

    url: str
    healthy: bool = True
    inflight: int = 0
    lost: asyncio.Future | None = None
    probe: asyncio.Future | None = None
    revival: asyncio.Future | None = None

    def reviving(self) -> bool:
        return self.revival is not None and not self.revival.done()

    def lost_future(self) -> asyncio.Future:
        """Completed when this server is found dead: every request running on it is then re-sent."""
        if self.lost is None:
            self.lost = asyncio.get_running_loop().create_future()
        return self.lost

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        if not healthy and self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        if healthy:
            self.lost = None  # a fresh one for requests sent after the restart


# --------------------------------------------------------------------------- request/response translation


def generate_payload(spec: SampleSpec, rid: str) -> dict:
    """SGLang ``/generate`` body for one sample (one prompt, one response)."""
    return {
        "input_ids": list(spec.input_ids),
        "sampling_params": spec.sampling.to_sglang(),
        "return_logprob": spec.return_logprob,
        "logprob_start_len": -1,
        "rid": rid,
    }


def score_payload(sequence: Sequence[int], rid: str) -> dict:
    """SGLang ``/generate`` body that scores every token of ``sequence`` and generates nothing.

    Temperature 1 so that the returned log-probs are those of the unscaled distribution.
    """
    return {
        "input_ids": list(sequence),
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "rid": rid,
    }


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


def parse_score_response(body: Any, sequence: Sequence[int], rid: str, url: str) -> ScoreResult:
    """:class:`ScoreResult` from a scoring answer: ``meta_info.input_token_logprobs`` for every token."""
    meta = _meta(body, rid)
    items = meta.get("input_token_logprobs")
    if not isinstance(items, list) or len(items) != len(sequence):
        got = len(items) if isinstance(items, list) else items
        raise ValueError(f"request {rid}: scored {len(sequence)} tokens but input_token_logprobs has {got} entries")
    ids = [int(item[1]) for item in items]
    if ids != list(sequence):
        raise ValueError(f"request {rid}: input_token_logprobs ids {ids[:8]}... differ from the sequence")
    logprobs = [None if item[0] is None else float(item[0]) for item in items]
    if any(lp is None for lp in logprobs[1:]):
        raise ValueError(f"request {rid}: input_token_logprobs has a null log-prob after the first token")
    return ScoreResult(input_logprobs=logprobs, weight_version=meta.get("weight_version"), engine_url=url)


def _encoded(payload: dict | None) -> bytes | None:
    return None if payload is None else json.dumps(payload).encode()


def _check_success(body: Any, url: str, path: str) -> None:
    # Weight endpoints answer {success, message}; some SGLang versions answer 200 with success=false.
    if isinstance(body, dict) and body.get("success") is False:
        raise RolloutRequestError(f"{url}{path} failed: {body.get('message', '')}")


# --------------------------------------------------------------------------- the client


class SGLangClient:
    """A :class:`RolloutEngine` over HTTP: SGLang servers, or ``lcr serve`` reference servers."""

    def __init__(self, config: ClientConfig, *, on_server_dead: OnServerDead | None = None) -> None:
        self.config = config
        self.on_server_dead = on_server_dead
        self._servers = [_Server(url) for url in config.urls]
        self._rng = random.Random(config.seed)
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._jobs: set[asyncio.Future] = set()
        self._background: set[asyncio.Future] = set()  # fire-and-forget aborts (kept referenced)
        self._closed = False

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def healthy_urls(self) -> list[str]:
        """Servers currently taking requests."""
        return [s.url for s in self._servers if s.healthy]

    # ------------------------------------------------------------------ generation and scoring

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        """Sample every request's n responses; ordered by (prompt index, sample index).

        A sample the server aborts (``/abort_request``, ``/pause_generation`` in abort mode) comes
        back with ``finish_reason == 'abort'`` and is not re-sent: the caller decides.
        """
        specs = expand_samples(requests, self._rng)

        def job(spec: SampleSpec) -> Awaitable[Completion]:
            return self._dispatch(spec.rid, lambda rid: generate_payload(spec, rid),
                                  lambda body, rid, url: parse_generate_response(body, spec, rid, url))

        return await self._run_all([job(s) for s in specs])

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[ScoreResult]:
        """Log-prob of every token of every sequence given the tokens before it (teacher scoring)."""
        for i, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"sequence {i} is empty")
        batch = self._rng.getrandbits(48)

        def job(i: int, seq: Sequence[int]) -> Awaitable[ScoreResult]:
            return self._dispatch(f"score-{batch:012x}-{i}", lambda rid: score_payload(seq, rid),
                                  lambda body, rid, url: parse_score_response(body, seq, rid, url))

        return await self._run_all([job(i, seq) for i, seq in enumerate(sequences)])

    async def _run_all(self, coros: list[Awaitable[T]]) -> list[T]:
        if self._closed:
            for coro in coros:
                coro.close()
            raise ClientClosedError("the rollout client is closed")
        tasks = [asyncio.ensure_future(c) for c in coros]
        self._jobs.update(tasks)
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._closed:
                raise ClientClosedError("the rollout client was closed during the call") from None
            raise
        finally:
            self._jobs.difference_update(tasks)

    async def _dispatch(self, rid: str, build: Callable[[str], dict],
                        parse: Callable[[Any, str, str], T]) -> T:
        """Send one request until a server answers it; one attempt at a time (see module docstring)."""
        failures, last_error = 0, ""
        while True:
            server = await self._acquire_slot()
            attempt_rid = rid if failures == 0 else f"{rid}.retry{failures}"
            try:
                body = await self._attempt(server, build(attempt_rid))
            except _ServerLost:
                last_error = f"{server.url} was found dead while the request ran"
            except _Unreachable as exc:
                last_error = f"{server.url}: {exc}"
                if await self._probe(server) and exc.timed_out:
                    self._abort_quietly(server, attempt_rid)  # alive but slow: free its slot on the server
            except _HTTPStatus as exc:
                if exc.status < 500 and exc.status != 429:
                    raise RolloutRequestError(f"request {rid} rejected by {server.url}: {exc}") from None
                last_error = f"{server.url}: {exc}"
            else:
                return parse(body, attempt_rid, server.url)
            finally:
                self._release_slot(server)
            failures += 1
            if failures > self.config.max_retries:
                raise RolloutRequestError(f"request {rid} failed {failures} times; last error: {last_error}")
            # A dead server is reported once (in _mark_dead), not once per request it held.
            log.log(logging.WARNING if server.healthy else logging.DEBUG,
                    "request %s: attempt %d failed (%s); re-sending", rid, failures, last_error)
            if server.healthy:  # the same servers are still in play: back off before retrying
                await asyncio.sleep(min(self.config.backoff_s * 2 ** (failures - 1), self.config.backoff_max_s))

    async def _attempt(self, server: _Server, payload: dict) -> Any:
        """POST /generate to ``server``; raises _ServerLost if the server is found dead before it answers."""
        attempt = asyncio.ensure_future(self._call(server.url, "POST", "/generate", payload, self.config.timeout_s))
        try:
            done, _ = await asyncio.wait({attempt, server.lost_future()}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not attempt.done():  # the server died, or this call was cancelled
                attempt.cancel()
            elif not attempt.cancelled():
                attempt.exception()  # mark it retrieved even if this call was cancelled meanwhile
        if attempt not in done:
            raise _ServerLost()
        return attempt.result()

    # ------------------------------------------------------------------ slots and server health

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _acquire_slot(self) -> _Server:
        while True:
            if self._closed:
                raise ClientClosedError("the rollout client is closed")
            live = [s for s in self._servers if s.healthy]
            free = [s for s in live if s.inflight < self.config.max_concurrency]
            if free:
                server = min(free, key=lambda s: s.inflight)
                server.inflight += 1
                return server
            if not live and not any(s.reviving() for s in self._servers):
                raise NoHealthyServerError(f"no healthy rollout server among {self.urls}")
            await self._changed.wait()

    def _release_slot(self, server: _Server) -> None:
        server.inflight -= 1
        self._notify()

    async def _probe(self, server: _Server) -> bool:
        """One shared /health probe after a failure; marks the server dead if it fails. True: alive."""
        if not server.healthy:
            return False
        if server.probe is None or server.probe.done():
            server.probe = asyncio.ensure_future(self._health_ok(server.url))
        alive = await asyncio.shield(server.probe)
        if not alive:
            self._mark_dead(server, "no answer to /health after a failed request")
        return alive

    async def _health_ok(self, url: str) -> bool:
        try:
            await self._call(url, "GET", "/health", None, self.config.health_timeout_s)
            return True
        except (_Unreachable, _HTTPStatus):
            return False

    def _mark_dead(self, server: _Server, reason: str) -> None:
        if not server.healthy:
            return
        log.warning("rollout server %s is down (%s); re-sending its %d requests", server.url, reason,
                    server.inflight)
        server.set_healthy(False)
        if self.on_server_dead is not None and self.config.restart_dead_servers and not self._closed:
            server.revival = asyncio.ensure_future(self._revive(server))
        self._notify()

    async def _revive(self, server: _Server) -> None:
        """Run the restart callback, wait for /health, and take the server back if its weights match."""
        try:
            if inspect.iscoroutinefunction(self.on_server_dead):
                await self.on_server_dead(server.url)
            else:  # a blocking restart (ServerHandle.restart) must not stall the event loop
                result = await asyncio.to_thread(self.on_server_dead, server.url)
                if inspect.isawaitable(result):
                    await result
            deadline = asyncio.get_running_loop().time() + self.config.revive_timeout_s
            while not await self._health_ok(server.url):
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"no answer to /health within {self.config.revive_timeout_s} s")
                await asyncio.sleep(0.5)
            mismatch = await self._version_mismatch(server)
            if mismatch:
                raise RuntimeError(mismatch)
            server.set_healthy(True)
            log.warning("rollout server %s is back", server.url)
        except Exception as exc:  # the server stays out; the batch goes on without it
            log.error("rollout server %s stays out: %s", server.url, exc)
        finally:
            self._notify()

    async def _version_mismatch(self, server: _Server) -> str | None:
        """Why ``server`` may not rejoin: a restarted server holds the weights it was launched with,
        not the ones synced since; it rejoins once its weight_version equals the healthy servers'."""
        peers = [s for s in self._servers if s.healthy and s is not server]
        if not peers:
            return None
        try:
            mine, theirs = await asyncio.gather(*(self._call(s.url, "GET", "/get_weight_version", None,
                                                             self.config.health_timeout_s) for s in (server, peers[0])))
        except (_Unreachable, _HTTPStatus) as exc:
            return f"cannot read its weight_version: {exc}"
        mine, theirs = (v.get("weight_version") if isinstance(v, dict) else None for v in (mine, theirs))
        if mine != theirs:
            return f"it holds weight_version {mine!r}, the healthy servers {theirs!r} (sync its weights first)"
        return None

    async def wait_revivals(self) -> None:
        """Wait until every restart started by a server failure has finished (or failed)."""
        pending = [s.revival for s in self._servers if s.reviving()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def health(self) -> dict[str, bool]:
        """Probe every server's /health. A failure marks a server dead; a server that answers comes
        back if it holds the healthy servers' weight_version. (SGLang's /health runs a one-token
        generation: it fails while generation is paused or memory released.)"""
        results = await asyncio.gather(*(self._health_ok(s.url) for s in self._servers))
        for server, ok in zip(self._servers, results):
            if ok and not server.healthy and not server.reviving():
                mismatch = await self._version_mismatch(server)
                if mismatch:
                    log.warning("rollout server %s stays out: %s", server.url, mismatch)
                    continue
                server.set_healthy(True)
                self._notify()
            elif not ok and server.healthy:
                self._mark_dead(server, "no answer to /health")
        return {s.url: ok and s.healthy for s, ok in zip(self._servers, results)}

    # ------------------------------------------------------------------ HTTP

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            # Concurrency is limited per server by the slots above, not by the connector.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        return self._session

    async def _call(self, url: str, method: str, path: str, payload: dict | bytes | None, timeout_s: float) -> Any:
        """One HTTP call with a JSON body (a dict, or already encoded); the parsed JSON (or text) of a 200
        answer. Raises _HTTPStatus or _Unreachable."""
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=self.config.connect_timeout_s)
        body = {"data": payload, "headers": _JSON_HEADERS} if isinstance(payload, bytes) else {"json": payload}
        try:
            async with self._session_for_loop().request(method, url + path, timeout=timeout, **body) as resp:
                text = await resp.text()
        except asyncio.TimeoutError:
            raise _Unreachable(f"no answer within {timeout_s} s", timed_out=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}", timed_out=False) from None
        if resp.status != 200:
            raise _HTTPStatus(resp.status, text)
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text  # /flush_cache and a few others answer plain text

    def _abort_quietly(self, server: _Server, rid: str) -> None:
        async def abort() -> None:
            try:
                await self._call(server.url, "POST", "/abort_request", {"rid": rid}, self.config.health_timeout_s)
            except (_Unreachable, _HTTPStatus) as exc:
                log.warning("could not abort %s on %s: %s", rid, server.url, exc)

        task = asyncio.ensure_future(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _control(self, path: str, payload: dict | list[dict] | None, *, method: str = "POST",
                       timeout_s: float | None = None) -> dict[str, Any]:
        """Call ``path`` on every healthy server at once (``payload`` may be one per server)."""
        if self._closed:
            raise ClientClosedError("the rollout client is closed")
        servers = [s for s in self._servers if s.healthy]
        if not servers:
            raise NoHealthyServerError(f"no healthy rollout server among {self.urls}")
        # Encoded once, before any request starts: a tensor update's body holds a whole bucket, and encoding
        # it per server inside the requests would stall the event loop past their connect timeouts.
        payloads = [_encoded(p) for p in payload] if isinstance(payload, list) else [_encoded(payload)] * len(servers)
        timeout = timeout_s or self.config.control_timeout_s

        async def one(server: _Server, body: bytes | None) -> Any:
            try:
                answer = await self._call(server.url, method, path, body, timeout)
            except _HTTPStatus as exc:
                raise RolloutRequestError(f"{server.url}{path} failed: {exc}") from None
            except _Unreachable as exc:
                await self._probe(server)
                raise RolloutRequestError(f"{server.url}{path} failed: {exc}") from None
            _check_success(answer, server.url, path)
            return answer

        answers = await asyncio.gather(*(one(s, p) for s, p in zip(servers, payloads)))
        return {s.url: a for s, a in zip(servers, answers)}

    # ------------------------------------------------------------------ weights and engine state

    async def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                        group_name: str, backend: str, ranks_per_engine: int = 1) -> None:
        """Join server k (in ``urls`` order) as ranks ``1 + k * ranks_per_engine ...`` of the group.

        The trainer's source is rank 0; it must join concurrently (this call returns when all joined).
        """
        if any(not s.healthy for s in self._servers):
            raise RolloutRequestError(f"every server must be healthy to form a group; healthy: {self.healthy_urls()}")
        expected = 1 + len(self._servers) * ranks_per_engine
        if world_size != expected:
            raise ValueError(f"world_size ({world_size}) must be 1 + servers ({len(self._servers)}) "
                             f"x ranks_per_engine ({ranks_per_engine}) = {expected}")
        payloads = [{"master_address": master_address, "master_port": master_port,
                     "rank_offset": 1 + k * ranks_per_engine, "world_size": world_size,
                     "group_name": group_name, "backend": backend} for k in range(len(self._servers))]
        await self._control("/init_weights_update_group", payloads)

    async def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], group_name: str,
                                              weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Every server receives one bucket broadcast by rank 0 (which broadcasts while this waits)."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(
                f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length")
        payload = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                   "group_name": group_name, "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        await self._control("/update_weights_from_distributed", payload)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._control("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       load_format: str | None = None) -> None:
        payload: dict = {"model_path": model_path}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:
            payload["load_format"] = load_format
        await self._control("/update_weights_from_disk", payload)

    async def update_weights_from_tensor(self, *, serialized_named_tensors: Sequence[str],
                                         load_format: str | None = None, weight_version: str | None = None,
                                         flush_cache: bool = True) -> None:
        """Every server loads one bucket: entry r of ``serialized_named_tensors`` is for its TP rank r."""
        if not serialized_named_tensors:
            raise ValueError("serialized_named_tensors must hold one entry per engine TP rank, got none")
        payload: dict = {"serialized_named_tensors": list(serialized_named_tensors), "flush_cache": flush_cache}
        if load_format is not None:
            payload["load_format"] = load_format
        if weight_version is not None:
            payload["weight_version"] = weight_version
        await self._control("/update_weights_from_tensor", payload)

    async def pause(self, mode: str | None = None) -> None:
        """SGLang's /pause_generation; ``mode`` (newer SGLang): 'abort' (its default: running requests end
        with finish_reason 'abort'), 'retract' or 'in_place' (they resume after :meth:`resume`)."""
        await self._control("/pause_generation", {} if mode is None else {"mode": mode})

    async def resume(self) -> None:
        await self._control("/continue_generation", {})

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._control("/release_memory_occupation", {} if tags is None else {"tags": list(tags)})

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._control("/resume_memory_occupation", {} if tags is None else {"tags": list(tags)})

    async def flush_cache(self) -> None:
        """Flush every healthy server's cache, retrying while it answers 400 (requests still running)."""
        async def one(server: _Server) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.flush_timeout_s
            while True:
                try:
                    await self._call(server.url, "POST", "/flush_cache", None, self.config.control_timeout_s)
                    return
                except _HTTPStatus as exc:
                    if exc.status != 400 or loop.time() > deadline:
                        raise RolloutRequestError(f"{server.url}/flush_cache failed: {exc}") from None
                except _Unreachable as exc:
                    await self._probe(server)
                    raise RolloutRequestError(f"{server.url}/flush_cache failed: {exc}") from None
                await asyncio.sleep(self.config.flush_retry_s)

        await asyncio.gather(*(one(s) for s in self._servers if s.healthy))

    async def weight_version(self) -> str | None:
        """The weight_version all healthy servers report; raises if they disagree."""
        answers = await self._control("/get_weight_version", None, method="GET")
        versions = {url: a.get("weight_version") if isinstance(a, dict) else None for url, a in answers.items()}
        if len(set(versions.values())) > 1:
            raise RolloutRequestError(f"servers hold different weight versions: {versions}")
        return next(iter(versions.values()))

    async def weights_checksums(self) -> dict[str, Any]:
        """``{url: {"weight_version", "checksums": {hf_name: sha256}}}`` from every healthy server.

        ``GET /lcr/weights_checksum`` exists on the reference server only (SGLang answers 404).
        """
        return await self._control("/lcr/weights_checksum", None, method="GET")

    async def close(self) -> None:
        """Cancel running calls, abort this client's requests on live servers, close connections."""
        if self._closed:
            return
        busy = [s for s in self._servers if s.healthy and s.inflight > 0]
        self._closed = True
        self._notify()
        for task in list(self._jobs):
            task.cancel()
        for server in self._servers:
            if server.reviving():
                server.revival.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        # The servers belong to this run: abort_all also stops requests whose connection is gone.
        aborts = [self._call(s.url, "POST", "/abort_request", {"abort_all": True}, self.config.health_timeout_s)
                  for s in busy]
        for server, result in zip(busy, await asyncio.gather(*aborts, return_exceptions=True)):
            if isinstance(result, Exception):
                log.warning("abort on %s failed: %s", server.url, result)
        if self._session is not None:
            await self._session.close()
