"""The trainer's rollout engines: launch (or attach to) servers, generate, and sync weights into them.

Global rank 0 owns the engines: it launches the servers (SGLang on GPUs, ``lcr serve`` on CPU),
talks to them through one :class:`SGLangClient` (failover, retries, restarts of dead servers) and
broadcasts what they return to the other ranks. Every rank takes part in weight syncs, because
the tensors are gathered from all tensor/pipeline shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megatron_lcr.rollout.client import ClientConfig, SGLangClient
from megatron_lcr.rollout.engine import Completion, GenerateRequest
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, restart_callback, stop_servers
from megatron_lcr.rollout.weight_sync import WeightSyncConfig, WeightSyncer


def _reference_default() -> SGLangLaunchConfig:
    return SGLangLaunchConfig(backend="reference", base_port=0, dtype="float32", startup_timeout_s=300)


@dataclass(kw_only=True)
class RolloutConfig:
    """Where rollouts come from and how new weights reach them."""

    server: SGLangLaunchConfig = field(default_factory=_reference_default)
    """Servers to launch (model_path empty: the policy's starting weights)."""
    urls: list[str] = field(default_factory=list)
    """Servers already running (e.g. started by the SLURM script); non-empty: launch nothing."""
    max_concurrency: int = 64
    """Requests in flight per server (count)."""
    request_timeout_s: float = 1800.0
    """Limit on one generate request (seconds)."""
    max_retries: int = 3
    """Re-sends of one sample after server failures (count)."""
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How the trainer's weights reach the servers after every step."""

    @property
    def gpu_engines(self) -> bool:
        """Whether the servers run on GPUs: all but launched `lcr serve` ones. Servers given by URL are
        taken to be SGLang or vLLM; for others set ``sync.backend`` / ``sync.tensor_format``."""
        return bool(self.urls) or self.server.backend != "reference"


class Engines:
    """Rollout servers as the trainer sees them. Use as a context manager on every rank."""

    def __init__(self, cfg: RolloutConfig, *, model_path: str, log_dir: str, seed: int | None = None) -> None:
        self.cfg = cfg
        self.is_source = torch.distributed.get_rank() == 0
        self._handles = []
        client = None
        if self.is_source:
            urls = list(cfg.urls)
            if not urls:
                server = dataclasses.replace(cfg.server, model_path=cfg.server.model_path or model_path,
                                             log_dir=log_dir)
                self._handles = launch_servers(server)
                urls = [h.url for h in self._handles]
            client = SGLangClient(
                ClientConfig(urls=urls, api_key=cfg.server.api_key, max_concurrency=cfg.max_concurrency,
                             timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries, seed=seed),
                on_server_dead=restart_callback(self._handles) if self._handles else None,
            )
        self.syncer = WeightSyncer(cfg.sync, client, gpu_engines=cfg.gpu_engines)

    def __enter__(self) -> Engines:
        try:
            self.syncer.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Completions of ``requests`` on every rank (generated on rank 0, broadcast)."""
        box = [self.syncer.run(self.syncer.client.generate(requests)) if self.is_source else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sync(self, policy, version: int) -> dict:
        """Push the policy's weights as ``weight_version = str(version)`` (every rank calls this)."""
        return self.syncer.sync(policy, str(version))

    def close(self) -> None:
        try:
            self.syncer.close()
        finally:
            stop_servers(self._handles)
            self._handles = []
