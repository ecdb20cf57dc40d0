"""The trainer's rollout engines: launch (or attach to) servers, generate, and sync weights into them.

Global rank 0 owns the engines: it launches the servers (SGLang or vLLM on GPUs or CPU, ``lcr serve``
on CPU), talks to them through one :class:`RolloutClient` (failover, retries, restarts of dead
servers) and broadcasts what they return to the other ranks. Every rank takes part in weight syncs,
because the tensors are gathered from all tensor/pipeline shards.

A server that dies mid-run is restarted by the launcher and comes back with its launch weights. While
rank 0 waits for a batch, it watches for such servers and, with every rank, pushes them the weights of
the last sync (a *catch-up*); only then does the client give them requests again. So every sample of
a step is drawn with the step's weights, even when the only server died.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lcr.rollout.client import ClientConfig, RolloutClient, RolloutRequestError
from megatron_lcr.rollout.engine import Completion, GenerateRequest
from megatron_lcr.rollout.server_api import ModelInfo
from megatron_lcr.rollout.sglang import (SGLangLaunchConfig, cpu_reference_launch, launch_servers, restart_callback,
                                         stop_servers)
from megatron_lcr.rollout.weight_sync import (WeightSyncConfig, WeightSyncer, check_update_group_address,
                                             hf_tensors_on_source)

# How often rank 0 looks for restarted servers while a batch is being generated (seconds).
_CATCH_UP_POLL_S = 0.5
# How often rank 0 tells the other ranks, waiting for a batch in a collective, to keep waiting (seconds).
_HEARTBEAT_S = 60.0


@dataclass(kw_only=True)
class RolloutConfig:
    """Where rollouts come from and how new weights reach them."""

    server: SGLangLaunchConfig = field(default_factory=cpu_reference_launch)
    """Servers to launch (model_path empty: the policy's starting weights)."""
    urls: list[str] = field(default_factory=list)
    """Servers already running (e.g. started by the SLURM script); non-empty: launch nothing."""
    max_concurrency: int = 64
    """Requests in flight per server (count)."""
    request_timeout_s: float = 1800.0
    """Limit on one generate request (seconds)."""
    max_retries: int = 3
    """Re-sends of one sample after server failures (count)."""
    revive_timeout_s: float = 900.0
    """How long a dead server's restart and catch-up sync may take before it stays out (seconds)."""
    allow_untested_engine: bool = False
    """Accept an engine release newer than the newest tested one (rollout/server_api.py lists them)."""
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How the trainer's weights reach the servers after every step."""

    def __post_init__(self) -> None:
        if self.sync.mode == "distributed":  # launched servers run on this node: only given URLs can be remote
            check_update_group_address(self.sync.master_address, self.urls)

    def launched_gpus(self, on_gpus: bool | None = None) -> list[int]:
        """GPUs of node 0 the servers rank 0 launches will use (empty: servers on CPU, or given by URL).
        ``on_gpus`` overrides resolving ``server.device`` here (the recipe checks assume GPU nodes)."""
        return launched_gpus(self.server, self.urls, on_gpus)

    @property
    def gpu_engines(self) -> bool:
        """Whether the servers run on GPUs. Servers given by URL are taken to be on GPUs (set
        ``sync.backend`` / ``sync.tensor_format`` for others); launched ones run where their device says."""
        return bool(self.urls) or (self.server.backend != "reference" and self.server.on_gpus)


def launched_gpus(server: SGLangLaunchConfig, urls: list[str], on_gpus: bool | None = None) -> list[int]:
    """GPUs of node 0 that servers launched from ``server`` use (empty: on CPU, or ``urls`` given)."""
    on_gpus = (server.backend != "reference" and server.on_gpus) if on_gpus is None else on_gpus
    if urls or not on_gpus:
        return []
    return list(server.gpu_ids) or list(range(server.num_servers * server.tp_size))


def check_served_model(infos: dict[str, ModelInfo], hf_dir: str, *, launched: bool) -> None:
    """Refuse servers that serve another model than the trainer's (``hf_dir``'s config.json): the
    architecture or model type they report differ, or, for servers we launched, the path they loaded."""
    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    for url, info in infos.items():
        if info.architectures and config.get("architectures") and info.architectures != config["architectures"]:
            raise RolloutRequestError(f"{url} serves architecture {info.architectures}, the trainer's model "
                                      f"{config['architectures']} ({hf_dir})")
        if info.model_type and config.get("model_type") and info.model_type != config["model_type"]:
            raise RolloutRequestError(f"{url} serves model type {info.model_type!r}, the trainer's model "
                                      f"{config['model_type']!r} ({hf_dir})")
        if launched and info.model_path and Path(info.model_path).resolve() != Path(hf_dir).resolve():
            raise RolloutRequestError(f"{url} loaded {info.model_path}, not the trainer's model {hf_dir}")


async def _stale_urls(client: RolloutClient) -> list[str]:
    return client.stale_urls()  # read on the client's own loop


class Engines:
    """Rollout servers as the trainer sees them. Use as a context manager on every rank."""

    def __init__(self, cfg: RolloutConfig, *, model_path: str, log_dir: str, seed: int | None = None) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.is_source = torch.distributed.get_rank() == 0
        self._handles = []
        self._stale = threading.Event()  # set (on the client's loop) when a restarted server needs weights
        self._synced: tuple[Callable[[], Iterable], str] | None = None  # (weights, version) of the last sync
        client = None
        if self.is_source:
            urls = list(cfg.urls)
            if not urls:
                server = dataclasses.replace(cfg.server, model_path=cfg.server.model_path or model_path,
                                             log_dir=log_dir)
                self._handles = launch_servers(server)
                urls = [h.url for h in self._handles]
            client = RolloutClient(
                ClientConfig(urls=urls, api_key=cfg.server.api_key, max_concurrency=cfg.max_concurrency,
                             timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries, seed=seed,
                             revive_timeout_s=cfg.revive_timeout_s, allow_untested_engine=cfg.allow_untested_engine),
                on_server_dead=restart_callback(self._handles) if self._handles else None,
                on_server_stale=lambda url: self._stale.set(),
            )
        self.syncer = WeightSyncer(cfg.sync, client, gpu_engines=cfg.gpu_engines)

    def __enter__(self) -> Engines:
        try:
            infos = None
            if self.is_source:
                infos = self.syncer.run(self.syncer.client.model_info())
                check_served_model(infos, self.model_path, launched=bool(self._handles))
            self.syncer.connect(infos)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Completions of ``requests`` on every rank (generated on rank 0, broadcast). Restarted servers
        are caught up with every rank's help while the batch runs (see the module docstring)."""
        batch = self.syncer.submit(self.syncer.client.generate(requests)) if self.is_source else None
        while True:
            box = [self._next_message(batch) if self.is_source else None]
            torch.distributed.broadcast_object_list(box, src=0)
            kind, value = box[0]
            if kind == "done":
                return value
            if kind == "error":
                raise RolloutRequestError(value)
            if kind == "catch_up":
                self._catch_up(value)

    def _next_message(self, batch: concurrent.futures.Future) -> tuple[str, object]:
        """Rank 0: ('done', completions), ('error', message) or ('catch_up', urls), whichever comes first,
        or ('wait', None) after _HEARTBEAT_S: the other ranks wait for the batch in a collective, which
        must not run into the collective timeout however long the batch takes."""
        started = time.monotonic()
        while time.monotonic() - started < _HEARTBEAT_S:
            try:
                return "done", batch.result(timeout=_CATCH_UP_POLL_S)
            except concurrent.futures.TimeoutError:
                pass
            except Exception as exc:  # noqa: BLE001 - every rank raises it, not only rank 0
                return "error", f"{type(exc).__name__}: {exc}"
            if self._stale.is_set():
                self._stale.clear()
                stale = self.syncer.run(_stale_urls(self.syncer.client))
                if stale and self._synced is not None:
                    return "catch_up", stale
        return "wait", None

    def _catch_up(self, urls: list[str]) -> None:
        """Every rank: push the last synced weights to restarted servers ``urls``."""
        weights, version = self._synced
        if self.is_source:
            print(f"rollout: catching up restarted server(s) {', '.join(urls)} to weight_version {version}",
                  flush=True)
        self.syncer.sync_stream(weights(), version, urls=urls if self.is_source else None)

    def sync(self, policy, version: int) -> dict:
        """Push the policy's weights as ``weight_version = str(version)`` (every rank calls this)."""
        return self.sync_weights(lambda: hf_tensors_on_source(policy), version)

    def sync_weights(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], version: int | str) -> dict:
        """Push ``weights()`` (HF-named tensors, yielded on rank 0; every rank drives it) as ``version``.
        The engines hold these weights until the next sync: a restarted server is caught up with them
        (in a synchronous loop the policy does not change between a sync and the next rollout)."""
        stats = self.syncer.sync_stream(weights(), str(version))
        self._synced = (weights, str(version))
        return stats

    def close(self) -> None:
        try:
            self.syncer.close()
        finally:
            stop_servers(self._handles)
            self._handles = []
