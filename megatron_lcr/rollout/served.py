"""Servers serving one model, and a rollout client driven synchronously from the calling thread.

For the commands that use engines outside the training loop's weight sync: evaluation (``lcr eval``), the
pipeline's boundary check and an engine teacher. :func:`served` launches the servers (or attaches to
running ones by URL), opens a :class:`~megatron_lcr.rollout.client.RolloutClient` on an event loop of its
own, and on exit closes the client, then its loop, then stops the servers it launched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from megatron_lcr.rollout.client import ClientConfig, RolloutClient
from megatron_lcr.rollout.engine import Completion, GenerateRequest, ScoreResult
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, restart_callback, stop_servers
from megatron_lcr.rollout.weight_sync import EventLoopThread


@dataclass
class ServedModel:
    """Synchronous calls to the servers of one model."""

    client: RolloutClient
    loop: EventLoopThread
    launched: list = field(default_factory=list)
    """Handles of the servers :func:`served` launched (empty when attached by URL)."""

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        return self.loop.run(self.client.generate(requests))

    def score(self, sequences: Sequence[Sequence[int]], *, top_k: int = 0) -> list[ScoreResult]:
        return self.loop.run(self.client.score(sequences, top_k=top_k))

    def model_info(self) -> dict:
        return self.loop.run(self.client.model_info())


@contextlib.contextmanager
def served(server: SGLangLaunchConfig, *, urls: Sequence[str] = (), restart: bool = False,
           **client: object) -> Iterator[ServedModel]:
    """Launch ``server`` (unless ``urls`` name running servers) and yield a :class:`ServedModel`.

    ``restart``: a launched server that dies is restarted (its requests fail over meanwhile); ``client``:
    further :class:`ClientConfig` fields (``seed``, ``max_concurrency``, ``timeout_s``, ...).
    """
    with contextlib.ExitStack() as stack:
        handles = [] if urls else launch_servers(server)
        stack.callback(stop_servers, handles)
        loop = EventLoopThread()
        stack.callback(loop.close)
        rollout = RolloutClient(ClientConfig(urls=list(urls) or [h.url for h in handles], api_key=server.api_key,
                                             restart_dead_servers=restart and bool(handles), **client),
                                on_server_dead=restart_callback(handles) if restart and handles else None)
        stack.callback(lambda: loop.run(rollout.close()))
        yield ServedModel(rollout, loop, handles)
