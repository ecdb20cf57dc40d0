"""An asynchronous client for a fleet of rollout servers over HTTP: SGLang, vLLM or ``lcr serve``.

:class:`RolloutClient` implements :class:`~megatron_lcr.rollout.engine.RolloutEngine`. What each
engine (and engine release) expects on the wire comes from the server's
:class:`~megatron_lcr.rollout.server_api.ServerAPI`, detected once per server from what it reports
about itself (``/server_info``, ``/get_server_info``, ``/version``). The client sends one HTTP request
per sample, so a batch spreads over every server and survives losing some of them:

- **Load balancing.** Each server has ``max_concurrency`` slots. A request waits for the first free
  slot on *any* healthy server (the least busy one), so faster servers take more work. (One
  semaphore per server would pin a waiting request to the server it queued on, and a request
  queued on a server that then dies would wait for nothing.)
- **Failover.** A connection failure (refused, reset, disconnected) or a timeout triggers one
  ``/health`` probe of that server, shared by all requests that failed on it. If the probe fails,
  the server is marked unhealthy, its other in-flight requests are cancelled, and every one of them
  is re-sent to the surviving servers, or, when it was the only one, waits for its restart.
- **Restarts.** ``on_server_dead(url)`` (the launcher's restart) runs for a dead server; once it
  answers ``/health`` it must hold the weights the fleet holds. A restarted server has its launch
  weights: when its ``weight_version`` differs from the last one synced (:attr:`synced_version`),
  ``on_server_stale(url)`` tells the trainer (it must return at once: it runs on the client's loop),
  whose catch-up sync pushes the current weights to :meth:`stale_urls` and calls :meth:`readmit`.
  Requests and control calls that find no healthy server wait for a restart under way (catch-up
  included), up to ``revive_timeout_s``.
- **Exactly once.** Each sample has one task that makes one attempt at a time; an attempt that is
  cancelled or fails contributes nothing. Retries are sent as ``{rid}.retry{k}`` (SGLang rejects a rid
  already in flight, and the original may still be running on a slow server), and a response is only
  accepted if its ``meta_info.id`` is the rid of the attempt that received it. Re-sent samples keep
  their seed, so they sample the same tokens on a deterministic engine.
- **Retries.** HTTP 5xx / 429 and confirmed-transient connection failures are retried with
  exponential backoff, at most ``max_retries`` times per sample; other 4xx answers fail at once.

Control calls (weight updates, pause, flush, memory) go to every healthy server at once (or to the
servers named) and raise naming the server that failed. One client belongs to one event loop.
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
from megatron_lcr.rollout.server_api import (
    Call,
    ModelInfo,
    NotFound,
    ServerAPI,
    UnsupportedServerError,
    detect_server_api,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_JSON_HEADERS = {"Content-Type": "application/json"}
OnServerDead = Callable[[str], "Awaitable[None] | None"]
OnServerStale = Callable[[str], None]
_SESSION_OPEN = "already open"  # SGLang's answer to begin_weight_update while a session is open


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
    """How long a restart may take, catch-up sync included, before the server stays out (seconds)."""
    allow_untested_engine: bool = False
    """Talk to an engine release newer than the newest tested one (server_api.py lists the range)."""
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
        self.text = text


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
    api: ServerAPI | None = None
    detecting: asyncio.Future | None = None
    catch_up: asyncio.Future | None = None
    deaths: int = 0  # times found dead: a process group it had joined died with it

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


def _encoded(payload: dict | None) -> bytes | None:
    return None if payload is None else json.dumps(payload).encode()


class RolloutClient:
    """A :class:`RolloutEngine` over HTTP on SGLang, vLLM or ``lcr serve`` servers."""

    def __init__(self, config: ClientConfig, *, on_server_dead: OnServerDead | None = None,
                 on_server_stale: OnServerStale | None = None) -> None:
        self.config = config
        self.on_server_dead = on_server_dead
        self.on_server_stale = on_server_stale
        self._servers = [_Server(url) for url in config.urls]
        self._rng = random.Random(config.seed)
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._jobs: set[asyncio.Future] = set()
        self._background: set[asyncio.Future] = set()  # fire-and-forget aborts (kept referenced)
        self._closed = False
        self.synced_version: str | None = None
        """The weight_version of the last successful weight update (what a restarted server must hold)."""

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def healthy_urls(self) -> list[str]:
        """Servers currently taking requests."""
        return [s.url for s in self._servers if s.healthy]

    def incarnations(self, urls: Sequence[str]) -> list[tuple[str, int]]:
        """``(url, times found dead)`` of each server: it changes when a process behind a URL is replaced."""
        return [(url, self._server(url).deaths) for url in urls]

    # ------------------------------------------------------------------ what the servers are

    async def api(self, url: str) -> ServerAPI:
        """The API of the server at ``url`` (asked once; again after a restart)."""
        try:
            return await self._api(self._server(url))
        except (_HTTPStatus, _Unreachable) as exc:
            raise RolloutRequestError(f"{url}: cannot tell which engine it runs: {exc}") from None

    async def _api(self, server: _Server) -> ServerAPI:
        if server.api is not None:
            return server.api
        if server.detecting is None or server.detecting.done():
            server.detecting = asyncio.ensure_future(detect_server_api(
                lambda path: self._get(server.url, path), server.url,
                allow_newer=self.config.allow_untested_engine))
        # _HTTPStatus / _Unreachable propagate: callers treat them as a failed request to this server.
        server.api = await asyncio.shield(server.detecting)
        return server.api

    async def _get(self, url: str, path: str) -> Any:
        try:
            return await self._call(url, "GET", path, None, self.config.health_timeout_s)
        except _HTTPStatus as exc:
            if exc.status == 404:
                raise NotFound(path) from None
            raise

    async def model_info(self, urls: Sequence[str] | None = None) -> dict[str, ModelInfo]:
        """``{url: ModelInfo}`` (model path and weight_version) of every healthy server, or of ``urls``."""
        return await self._control(lambda api, k: api.model_info_call(), urls=urls, parse="model_info")

    def _server(self, url: str) -> _Server:
        for server in self._servers:
            if server.url == url.rstrip("/"):
                return server
        raise ValueError(f"{url} is not one of this client's servers {self.urls}")

    # ------------------------------------------------------------------ generation and scoring

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        """Sample every request's n responses; ordered by (prompt index, sample index).

        A sample the server aborts (``/abort_request``, ``/pause_generation`` in abort mode) comes
        back with ``finish_reason == 'abort'`` and is not re-sent: the caller decides.
        """
        specs = expand_samples(requests, self._rng)

        def job(spec: SampleSpec) -> Awaitable[Completion]:
            return self._dispatch(spec.rid, lambda api, rid: api.generate_call(spec, rid),
                                  lambda api, body, rid, url: api.parse_generate(body, spec, rid, url))

        return await self._run_all([job(s) for s in specs])

    async def score(self, sequences: Sequence[Sequence[int]], *, top_k: int = 0) -> list[ScoreResult]:
        """Log-prob of every token of every sequence given the tokens before it (teacher scoring), and with
        ``top_k`` the engine's ``top_k`` most likely tokens at each position."""
        for i, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"sequence {i} is empty")
        batch = self._rng.getrandbits(48)

        def job(i: int, seq: Sequence[int]) -> Awaitable[ScoreResult]:
            return self._dispatch(f"score-{batch:012x}-{i}", lambda api, rid: api.score_call(seq, rid, top_k),
                                  lambda api, body, rid, url: api.parse_score(body, seq, rid, url, top_k))

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

    async def _dispatch(self, rid: str, build: Callable[[ServerAPI, str], Call],
                        parse: Callable[[ServerAPI, Any, str, str], T]) -> T:
        """Send one request until a server answers it; one attempt at a time (see module docstring)."""
        failures, last_error = 0, ""
        while True:
            server = await self._acquire_slot()
            attempt_rid = rid if failures == 0 else f"{rid}.retry{failures}"
            try:
                api = await self._api(server)
                body = await self._attempt(server, build(api, attempt_rid))
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
                return parse(api, body, attempt_rid, server.url)
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

    async def _attempt(self, server: _Server, call: Call) -> Any:
        """One request to ``server``; raises _ServerLost if the server is found dead before it answers."""
        attempt = asyncio.ensure_future(self._call(server.url, call.method, call.path, call.payload,
                                                   self.config.timeout_s))
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
                raise NoHealthyServerError(f"no healthy rollout server among {self.urls}, and none restarting")
            await self._changed.wait()

    def _release_slot(self, server: _Server) -> None:
        server.inflight -= 1
        self._notify()

    async def _healthy_servers(self) -> list[_Server]:
        """The healthy servers; when none is, wait for restarts under way (each bounded by revive_timeout_s)."""
        while True:
            if self._closed:
                raise ClientClosedError("the rollout client is closed")
            live = [s for s in self._servers if s.healthy]
            if live:
                return live
            if not any(s.reviving() for s in self._servers):
                raise NoHealthyServerError(f"no healthy rollout server among {self.urls}, and none restarting")
            await self._changed.wait()

    async def wait_for_any_server(self) -> None:
        """Return once a server is healthy or waiting for its catch-up sync; raise if none is coming."""
        while not self.healthy_urls() and not self.stale_urls():
            if self._closed:
                raise ClientClosedError("the rollout client is closed")
            if not any(s.reviving() for s in self._servers):
                raise NoHealthyServerError(f"no healthy rollout server among {self.urls}, and none restarting")
            await self._changed.wait()

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
        server.deaths += 1
        if self.on_server_dead is not None and self.config.restart_dead_servers and not self._closed:
            server.revival = asyncio.ensure_future(self._revive(server))
        self._notify()

    async def _revive(self, server: _Server) -> None:
        """Restart, wait for /health, catch its weights up, and take the server back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.revive_timeout_s
        try:
            if inspect.iscoroutinefunction(self.on_server_dead):
                await self.on_server_dead(server.url)
            else:  # a blocking restart (ServerHandle.restart) must not stall the event loop
                result = await asyncio.to_thread(self.on_server_dead, server.url)
                if inspect.isawaitable(result):
                    await result
            while not await self._health_ok(server.url):
                if loop.time() > deadline:
                    raise TimeoutError(f"no answer to /health within {self.config.revive_timeout_s} s")
                await asyncio.sleep(0.5)
            server.api = None  # the restarted process may be another release
            mismatch = await self._version_mismatch(server)
            if mismatch and self.on_server_stale is not None:
                # Its launch weights are not the fleet's: wait (still "reviving", so requests and control
                # calls wait too) until the trainer has synced it and calls readmit().
                log.warning("rollout server %s is back with stale weights (%s): waiting for its catch-up sync",
                            server.url, mismatch)
                server.catch_up = loop.create_future()
                self.on_server_stale(server.url)
                self._notify()
                await asyncio.wait_for(asyncio.shield(server.catch_up), max(deadline - loop.time(), 1.0))
                mismatch = await self._version_mismatch(server)
            if mismatch:
                raise RuntimeError(mismatch)
            server.set_healthy(True)
            log.warning("rollout server %s is back", server.url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server stays out; the batch goes on without it
            log.error("rollout server %s stays out: %s", server.url, exc)
        finally:
            server.catch_up = None
            self._notify()

    def stale_urls(self) -> list[str]:
        """Restarted servers waiting for a catch-up sync (see ``on_server_stale``)."""
        return [s.url for s in self._servers if s.catch_up is not None and not s.catch_up.done()]

    def readmit(self, urls: Sequence[str]) -> None:
        """After a catch-up sync of ``urls``: their restarts check the weight_version and take them back."""
        for url in urls:
            server = self._server(url)
            if server.catch_up is not None and not server.catch_up.done():
                server.catch_up.set_result(None)

    async def _version_mismatch(self, server: _Server) -> str | None:
        """Why ``server`` may not rejoin: it must hold the weight_version last synced (a restarted server
        has its launch weights), or, before any sync by this client, the healthy servers' version."""
        want = self.synced_version
        peers = [s for s in self._servers if s.healthy and s is not server]
        try:
            if want is None:
                if not peers:
                    return None
                want = (await self.model_info([peers[0].url]))[peers[0].url].weight_version
            mine = (await self.model_info([server.url]))[server.url].weight_version
        except (RolloutRequestError, UnsupportedServerError) as exc:
            return f"cannot read its weight_version: {exc}"
        if mine != want:
            return f"it holds weight_version {mine!r}, the fleet {want!r}"
        return None

    async def wait_revivals(self) -> None:
        """Wait until every restart started by a server failure has finished (or failed)."""
        pending = [s.revival for s in self._servers if s.reviving()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def health(self) -> dict[str, bool]:
        """Probe every server's /health. A failure marks a server dead; a server that answers comes
        back if it holds the synced weight_version. (SGLang's /health runs a one-token generation: it
        fails while generation is paused or memory released.)"""
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
            call = server.api.abort_call(rid) if server.api is not None else None
            if call is None:
                return
            try:
                await self._call(server.url, call.method, call.path, call.payload, self.config.health_timeout_s)
            except (_Unreachable, _HTTPStatus) as exc:
                log.warning("could not abort %s on %s: %s", rid, server.url, exc)

        task = asyncio.ensure_future(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _control(self, make: Callable[[ServerAPI, int], Call | None], *, urls: Sequence[str] | None = None,
                       timeout_s: float | None = None, parse: str | None = None) -> dict[str, Any]:
        """Send ``make(api, k)`` to every healthy server k at once (or to ``urls``, healthy or not);
        ``{url: answer}``. A None call skips that server. ``parse="model_info"`` parses answers."""
        servers = [self._server(u) for u in urls] if urls is not None else await self._healthy_servers()
        timeout = timeout_s or self.config.control_timeout_s

        async def one(k: int, server: _Server) -> Any:
            path = "(engine detection)"
            try:
                api = await self._api(server)
                call = make(api, k)
                if call is None:
                    return None
                path = call.path
                answer = await self._call(server.url, call.method, call.path, _encoded(call.payload), timeout)
            except _HTTPStatus as exc:
                raise RolloutRequestError(f"{server.url}{path} failed: {exc}") from None
            except _Unreachable as exc:
                await self._probe(server)
                raise RolloutRequestError(f"{server.url}{path} failed: {exc}") from None
            try:
                api.check_answer(answer, server.url, call.path)
            except RuntimeError as exc:
                raise RolloutRequestError(str(exc)) from None
            return api.parse_model_info(answer) if parse == "model_info" else answer

        if self._closed:
            raise ClientClosedError("the rollout client is closed")
        answers = await asyncio.gather(*(one(k, s) for k, s in enumerate(servers)))
        return {s.url: a for s, a in zip(servers, answers)}

    # ------------------------------------------------------------------ weights and engine state

    async def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                        group_name: str, backend: str, ranks_per_engine: int = 1,
                                        urls: Sequence[str] | None = None) -> None:
        """Join server k (of ``urls``, default every server) as ranks ``1 + k * ranks_per_engine ...``.

        The trainer's source is rank 0; it must join concurrently (this call returns when all joined).
        """
        members = list(urls) if urls is not None else self.urls
        if urls is None and any(not s.healthy for s in self._servers):
            raise RolloutRequestError(f"every server must be healthy to form a group; healthy: {self.healthy_urls()}")
        expected = 1 + len(members) * ranks_per_engine
        if world_size != expected:
            raise ValueError(f"world_size ({world_size}) must be 1 + servers ({len(members)}) "
                             f"x ranks_per_engine ({ranks_per_engine}) = {expected}")
        await self._control(lambda api, k: api.init_group_call(
            master_address=master_address, master_port=master_port, rank_offset=1 + k * ranks_per_engine,
            world_size=world_size, group_name=group_name, backend=backend), urls=members)

    async def begin_weight_update(self, urls: Sequence[str] | None = None) -> None:
        """Open a weight-update session where the engine needs one (SGLang >= 0.5.21). A session left
        open by a trainer that died mid-sync is closed first, so a restarted trainer can sync."""
        async def begin(url: str) -> None:
            api = await self.api(url)
            for call in api.begin_update_calls():
                try:
                    await self._control(lambda a, k, c=call: c, urls=[url])
                except RolloutRequestError as exc:
                    if _SESSION_OPEN not in str(exc):
                        raise
                    log.warning("%s had a weight-update session open (an earlier sync died): closing it", url)
                    for end in api.end_update_calls():
                        await self._control(lambda a, k, c=end: c, urls=[url])
                    await self._control(lambda a, k, c=call: c, urls=[url])

        targets = list(urls) if urls is not None else [s.url for s in await self._healthy_servers()]
        await asyncio.gather(*(begin(u) for u in targets))

    async def end_weight_update(self, urls: Sequence[str] | None = None) -> None:
        """Close the session :meth:`begin_weight_update` opened (engines finalise the loaded weights)."""
        async def end(url: str) -> None:
            for call in (await self.api(url)).end_update_calls():
                await self._control(lambda a, k, c=call: c, urls=[url])

        targets = list(urls) if urls is not None else [s.url for s in await self._healthy_servers()]
        await asyncio.gather(*(end(u) for u in targets))

    async def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], group_name: str,
                                              weight_version: str | None = None, flush_cache: bool = True,
                                              urls: Sequence[str] | None = None) -> None:
        """Every server (of ``urls``) receives one bucket broadcast by rank 0 (which broadcasts while this waits)."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(
                f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length")
        await self._control(lambda api, k: api.update_distributed_call(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, weight_version=weight_version,
            flush_cache=flush_cache), urls=urls)

    async def destroy_weights_update_group(self, group_name: str, urls: Sequence[str] | None = None) -> None:
        await self._control(lambda api, k: api.destroy_group_call(group_name), urls=urls)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       load_format: str | None = None, urls: Sequence[str] | None = None) -> None:
        await self._control(lambda api, k: api.update_disk_call(model_path, weight_version=weight_version,
                                                                load_format=load_format), urls=urls)

    async def update_weights_from_tensor(self, *, serialized_named_tensors: Sequence[str],
                                         load_format: str | None = None, weight_version: str | None = None,
                                         flush_cache: bool = True, urls: Sequence[str] | None = None) -> None:
        """Every server loads one bucket: entry r of ``serialized_named_tensors`` is for its TP rank r."""
        if not serialized_named_tensors:
            raise ValueError("serialized_named_tensors must hold one entry per engine TP rank, got none")
        await self._control(lambda api, k: api.update_tensor_call(
            serialized_named_tensors=serialized_named_tensors, load_format=load_format,
            weight_version=weight_version, flush_cache=flush_cache), urls=urls)

    async def pause(self, mode: str | None = None, urls: Sequence[str] | None = None) -> None:
        """Stop generation: SGLang's /pause_generation; ``mode`` (SGLang >= 0.5.6): 'abort' (its default:
        running requests end with finish_reason 'abort'), 'retract' or 'in_place' (they resume after
        :meth:`resume`)."""
        await self._control(lambda api, k: api.pause_call(mode), urls=urls)

    async def resume(self, urls: Sequence[str] | None = None) -> None:
        await self._control(lambda api, k: api.resume_call(), urls=urls)

    async def abort(self, rid: str | None = None, urls: Sequence[str] | None = None) -> None:
        """Abort request ``rid`` (None: every request) on the servers; aborted samples come back with
        finish_reason 'abort'."""
        await self._control(lambda api, k: api.abort_call(rid), urls=urls)

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._control(lambda api, k: api.release_memory_call(tags))

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._control(lambda api, k: api.resume_memory_call(tags))

    async def flush_cache(self, urls: Sequence[str] | None = None) -> None:
        """Flush every healthy server's cache (or those of ``urls``), retrying while it answers 400
        (SGLang: requests still running)."""
        async def one(server: _Server) -> None:
            try:
                call = (await self._api(server)).flush_call()
            except (_HTTPStatus, _Unreachable) as exc:
                raise RolloutRequestError(f"{server.url}: cannot tell which engine it runs: {exc}") from None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.flush_timeout_s
            while True:
                try:
                    await self._call(server.url, call.method, call.path, _encoded(call.payload),
                                     self.config.control_timeout_s)
                    return
                except _HTTPStatus as exc:
                    if exc.status != 400 or loop.time() > deadline:
                        raise RolloutRequestError(f"{server.url}{call.path} failed: {exc}") from None
                except _Unreachable as exc:
                    await self._probe(server)
                    raise RolloutRequestError(f"{server.url}{call.path} failed: {exc}") from None
                await asyncio.sleep(self.config.flush_retry_s)

        servers = [self._server(u) for u in urls] if urls is not None else await self._healthy_servers()
        await asyncio.gather(*(one(s) for s in servers))

    async def weight_version(self) -> str | None:
        """The weight_version all healthy servers report; raises if they disagree."""
        versions = {url: info.weight_version for url, info in (await self.model_info()).items()}
        if len(set(versions.values())) > 1:
            raise RolloutRequestError(f"servers hold different weight versions: {versions}")
        return next(iter(versions.values()))

    async def weights_checksums(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """``{url: {"weight_version", "checksums": {hf_name: sha256}}}`` from every healthy server.

        ``GET /lcr/weights_checksum`` exists on ``lcr serve`` only.
        """
        def call(api: ServerAPI, k: int) -> Call:
            if not api.has_checksums:
                raise RolloutRequestError(f"{api.engine} {api.version} has no weight checksums (lcr serve only); "
                                          "set rollout.sync.checksum=false")
            return Call("GET", "/lcr/weights_checksum")

        return await self._control(call, urls=urls)

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
        try:
            pending = list(self._jobs) + [s.revival for s in self._servers if s.revival is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            # The servers belong to this run: abort_all also stops requests whose connection is gone.
            aborts = [(s, s.api.abort_call(None)) for s in busy if s.api is not None]
            results = await asyncio.gather(*(self._call(s.url, c.method, c.path, c.payload,
                                                        self.config.health_timeout_s)
                                             for s, c in aborts if c is not None), return_exceptions=True)
            for (server, _), result in zip([a for a in aborts if a[1] is not None], results):
                if isinstance(result, Exception):
                    log.warning("abort on %s failed: %s", server.url, result)
        finally:
            if self._session is not None:
                await self._session.close()
