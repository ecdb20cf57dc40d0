"""Push the trainer's weights to rollout engines after every optimizer step.

Trainer side of the sync (engines implement the SGLang endpoints it calls):

1. Gather: every rank iterates :func:`hf_tensors_on_source`. Per parameter, TP shards are all-gathered
   on each pipeline stage and un-fused into Hugging Face tensors (``models.transfer``); stages other
   than the first send theirs to global rank 0, the *source*, point to point. Tensors stream one at
   a time: no rank ever holds the whole model.
2. Bucket: the source groups tensors into buckets of about ``bucket_bytes`` (default 512 MiB; one
   request and one round of broadcasts per bucket instead of per tensor).
3. Transport, by ``mode``:
   ``distributed``  a process group of the source (rank 0, hosting the store) and every engine rank
                    (``/init_weights_update_group``, formed as SGLang does: ``update_group.py``); per bucket the source POSTs
                    ``/update_weights_from_distributed`` and broadcasts each tensor in order
                    (NCCL between GPU processes; gloo where either side is on CPU, e.g. the
                    reference server beside a GPU trainer: tensors are staged through host memory);
   ``disk``         safetensors shards in a directory, then ``/update_weights_from_disk`` on each engine;
                    older copies are deleted once the engines hold the new one (``disk_keep`` remain);
   ``tensor``       per bucket one ``/update_weights_from_tensor`` request per engine, for engines on
                    the trainer's node: SGLang's pickled form (``tensor_format='sglang'``: CUDA-IPC
                    handles, or shared-memory CPU tensors for SGLang on a CPU) or our pickle-free base64
                    safetensors (``'safetensors'``: lcr serve, vLLM); unset off GPUs, each engine gets
                    the one it reads. Formats and what was verified in SGLang's sources: ``tensor_payload.py``.
4. Generation is paused and the cache flushed around the sync; bucket updates run inside the
   engines' weight-update session (``begin_weight_update`` ... ``end_weight_update``: SGLang >= 0.5.21
   requires it, vLLM finalises repacked weights at its end); every engine gets the new
   ``weight_version`` (with every bucket, as SGLang's update requests carry it); optional per-tensor
   checksums (lcr serve) prove the engines hold exactly these weights. All three modes share this path.

The update group's rendezvous: rank 0 hosts a TCP store that listens on every interface; the engines
connect to ``master_address`` (:func:`update_group_address`: 127.0.0.1 only while every engine is on this
host; else rank 0's routable address). A loopback address with an engine on another host is refused
(:func:`check_update_group_address`), at config time when it was configured.

Limits: ``timeout_s`` bounds the group's rendezvous and collectives. Client calls have no second limit
here: the client bounds each HTTP request itself (``request_timeout_s`` for generation,
``control_timeout_s`` for control calls, ``revive_timeout_s`` for a restart), and a batch of requests
legitimately outlasts any one of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import torch

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.models.builder import use_transformer_engine
from megatron_lcr.models.hf_checkpoint import ShardedSafetensorsWriter, finalize_shards
from megatron_lcr.models.transfer import export_chunk_to_hf, maps_for_rank
from megatron_lcr.parallel.env import DEFAULT_MASTER_ADDR, collective_device, free_port, is_loopback, routable_address
from megatron_lcr.rollout.checksum import tensor_checksum
from megatron_lcr.rollout.client import RolloutRequestError
from megatron_lcr.rollout.tensor_payload import TENSOR_FORMATS, serialize_bucket
from megatron_lcr.rollout.update_group import broadcast_from_source, join_update_group

log = logging.getLogger(__name__)
# Attempts to start a sync while servers die and come back (each a full restart: minutes at most).
_PREPARE_TRIES = 3
# Mode 'disk': weights-{version} copies, and atomic_dir's temporary siblings of them (a crashed write).
_DISK_COPY = re.compile(r"weights-.+")
_DISK_TEMP = re.compile(r"\.weights-.+\.(tmp|old)-[^.]+")


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How new weights reach the rollout engines."""

    mode: Literal["distributed", "disk", "tensor"] = "distributed"
    """Transport: broadcast over a trainer+engines process group, safetensors on a shared disk, or
    /update_weights_from_tensor requests (engines colocated on the trainer's GPUs)."""
    bucket_bytes: int = 512 * 2**20
    """Bytes of tensors per update request (bytes)."""
    checksum: bool = False
    """Compare per-tensor SHA-256 of trainer and engines after each sync (slow; for debugging and tests)."""
    group_name: str = "lcr_weight_sync"
    """Name of the trainer+engines process group."""
    disk_dir: str = ""
    """Directory for mode 'disk' (must be visible to every engine; this run's own: weights-* found there
    from an earlier run are deleted as older copies)."""
    disk_keep: int = 1
    """Mode 'disk': weight copies left in disk_dir after a sync (count, >= 1). The engines have loaded the
    newest copy when /update_weights_from_disk returns and never read an older one again (a restarted
    server is caught up by a sync that writes a new copy), so 1 suffices; more keep earlier steps' weights."""
    master_address: str = ""
    """Mode 'distributed': address (IP or host name of the trainer's rank-0 node) the engines connect to for
    the update group; empty: auto (127.0.0.1 if every engine URL is loopback, else MASTER_ADDR if routable,
    else this node's address on the route to the first remote engine)."""
    timeout_s: float = 600.0
    """Limit on forming the update group (every engine rank joining it) and on each broadcast in it (seconds)."""
    engine_tp_size: int = 1
    """Tensor-parallel ranks per engine (SGLang --tp-size): each joins the update group, or gets an entry
    of a tensor update."""
    tensor_format: Literal["sglang", "safetensors"] | None = None
    """Mode 'tensor' payload: 'sglang' (SGLang's pickle: CUDA IPC handles, or shared-memory CPU tensors) or
    'safetensors' (base64, pickle-free: lcr serve, vLLM); None: 'sglang' between GPUs, else per engine."""
    backend: Literal["nccl", "gloo"] | None = None
    """Mode 'distributed' update-group backend; None: 'nccl' when trainer and engines are on GPUs, else
    'gloo' (the CPU reference server joins over gloo only)."""

    def __post_init__(self) -> None:
        if self.backend not in (None, "nccl", "gloo"):
            raise ValueError(f"backend must be nccl or gloo (or unset), got {self.backend!r}")
        if self.tensor_format is not None and self.tensor_format not in TENSOR_FORMATS:
            raise ValueError(f"tensor_format must be one of {', '.join(TENSOR_FORMATS)}, got {self.tensor_format!r}")
        if self.engine_tp_size < 1:
            raise ValueError(f"engine_tp_size must be >= 1, got {self.engine_tp_size}")
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.mode == "disk" and not self.disk_dir:
            raise ValueError("mode 'disk' needs disk_dir (a directory every engine can read)")
        if self.disk_keep < 1:
            raise ValueError(f"disk_keep must be >= 1 (the copy the engines just loaded), got {self.disk_keep}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def resolve_sync_config(cfg: WeightSyncConfig, *, cuda: bool, gpu_engines: bool) -> WeightSyncConfig:
    """``cfg`` with its unset choices made: NCCL and CUDA IPC handles only between GPU processes. Off
    GPUs an unset tensor format stays None: :func:`engine_tensor_format` picks it per engine."""
    gpu = cuda and gpu_engines
    return dataclasses.replace(cfg, backend=cfg.backend or ("nccl" if gpu else "gloo"),
                               tensor_format=cfg.tensor_format or ("sglang" if gpu else None))


def engine_tensor_format(engines: Iterable[str]) -> str:
    """The tensor payload the engines read, off GPUs: real SGLang only its own pickled form (shared-memory
    CPU tensors); ``lcr serve`` and vLLM our pickle-free safetensors (they never unpickle network data)."""
    formats = {"sglang" if engine == "sglang" else "safetensors" for engine in engines}
    if len(formats) != 1:
        raise ValueError(f"mode 'tensor' needs one payload for every engine, but these engines read {sorted(formats)}: "
                         "set rollout.sync.tensor_format, or use mode 'distributed' or 'disk'")
    return formats.pop()


def _url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def update_group_address(configured: str, engine_urls: Sequence[str], environ: Mapping[str, str]) -> tuple[str, str]:
    """``(address, origin)``: where the engines reach the update group's store (rank 0 of the trainer, this
    process, hosts it on every interface), and where that address came from, for messages.

    The first that applies: ``configured`` (rollout.sync.master_address); 127.0.0.1 when every engine
    URL's host is loopback; ``MASTER_ADDR`` (torchrun's, or SLURM's first node: rank 0's node) unless
    loopback; this host's address on the interface that routes to the first remote engine; this host's
    name, resolved (which may be loopback: :func:`check_update_group_address` then says so).
    """
    if configured:
        return configured, "rollout.sync.master_address"
    remote = [(host, port) for host, port in map(_url_host_port, engine_urls) if not is_loopback(host)]
    if not remote:
        return DEFAULT_MASTER_ADDR, "every engine is on this host"
    master = environ.get("MASTER_ADDR", "")
    if master and not is_loopback(master):
        return master, "MASTER_ADDR"
    host, port = remote[0]
    routed = routable_address(host, port)
    if routed is not None and not is_loopback(routed):
        return routed, f"the route to {host}"
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name), f"host name {name!r}"
    except OSError:  # the engines may still resolve it
        return name, "host name"


def check_update_group_address(address: str, engine_urls: Sequence[str], origin: str = "") -> None:
    """Raise ValueError (one line, naming both) when ``address`` is loopback but an engine URL is on another
    host: that engine would look for the store on its own loopback and wait out the group's timeout. An
    empty ``address`` (auto) is resolved later and checked then; host names count as other hosts."""
    if not address or not is_loopback(address):
        return
    for url in engine_urls:
        if not is_loopback(_url_host_port(url)[0]):
            how = f" (auto: {origin})" if origin else ""
            raise ValueError(f"rollout.sync.master_address {address!r}{how} is loopback but engine {url} is on "
                             "another host: set it to this node's routable address")


def prune_weight_copies(disk_dir: Path, written: Sequence[Path], keep: int,
                        protected: Collection[str | Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` weight copies (``weights-*`` directories) in ``disk_dir``, and
    atomic_dir's leftovers of crashed writes (``.weights-*.tmp-*``, ``.old-*``); returns the deleted paths.

    ``written``: the copies this run wrote, oldest first: newest by write order (versions are strings:
    '10' sorts before '9'). Other copies (an earlier run's) are older than those, newest by mtime.
    ``protected`` (the directories the engines were launched from) is never deleted. A directory that
    cannot be deleted is logged and skipped: disk space is no reason to stop training.
    """
    disk_dir = Path(disk_dir).resolve()
    spared = {Path(p).resolve() for p in protected}
    entries = [p for p in disk_dir.iterdir() if p.is_dir() and not p.is_symlink() and p not in spared] \
        if disk_dir.is_dir() else []
    newest_first = dict.fromkeys(Path(p).resolve() for p in reversed(written))
    ours = [p for p in newest_first if p in entries]
    others = sorted((p for p in entries if _DISK_COPY.fullmatch(p.name) and p not in newest_first),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    deleted = []
    for path in (ours + others)[keep:] + [p for p in entries if _DISK_TEMP.fullmatch(p.name)]:
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError as exc:
            log.warning("could not delete old weight copy %s: %s", path, exc)
    return deleted


def _stage_tensors(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's HF tensors on its TP rank 0 (all TP ranks must iterate: all-gathers inside)."""
    from megatron.core import parallel_state as ps

    vp_size = ps.get_virtual_pipeline_model_parallel_world_size()
    te = use_transformer_engine(policy.model_cfg)
    for vp_stage, chunk in enumerate(policy.chunks):
        maps = maps_for_rank(policy.arch, te=te, padded_vocab=policy.model_cfg.padded_vocab_size,
                             vp_stage=vp_stage if vp_size else None)
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or bare
        yield from export_chunk_to_hf(module, maps, tp_group=ps.get_tensor_model_parallel_group())


def hf_tensors_on_source(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """Every Hugging Face tensor of the policy, yielded on global rank 0 (nothing elsewhere).

    Every rank must exhaust this iterator. The ranks of data-parallel replica 0 (context-parallel
    rank 0) export: each stage all-gathers its TP shards; stage roots (TP rank 0) of stages > 0 send
    their tensors to rank 0 point to point. Other replicas hold the same weights and do nothing.
    Order: stage 0's tensors, then stage 1's, ...
    """
    from megatron.core import parallel_state as ps

    exporter = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    if torch.distributed.get_rank() == 0:
        # Rank 0's pipeline group is exactly the stage roots (same TP/CP/DP coordinates), in order.
        roots = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        yield from _stage_tensors(policy)
        for src in roots[1:]:
            yield from _receive_stage(src)
    elif exporter:
        for name, tensor in _stage_tensors(policy):  # yields only on TP rank 0 (a stage root)
            torch.distributed.send_object_list([(name, tensor.dtype, tuple(tensor.shape))], dst=0)
            torch.distributed.send(tensor.contiguous(), dst=0)
        if ps.get_tensor_model_parallel_rank() == 0:
            torch.distributed.send_object_list([None], dst=0)


def _receive_stage(src: int) -> Iterator[tuple[str, torch.Tensor]]:
    while True:
        box = [None]
        torch.distributed.recv_object_list(box, src=src)
        if box[0] is None:
            return
        name, dtype, shape = box[0]
        tensor = torch.empty(shape, dtype=dtype, device=collective_device())
        torch.distributed.recv(tensor, src=src)
        yield name, tensor


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs in order into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# ---- transport (source rank) ------------------------------------------------------------------


class EventLoopThread:
    """An asyncio loop in a daemon thread, so the (synchronous) trainer can drive the async client
    while its own thread runs the broadcasts the engines are waiting for."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lcr-weight-sync", daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # stop the coroutine too, or it runs on unnoticed
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a stopped loop is closed, or Python warns at exit
            self.loop.close()


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype spelling in update requests (``bfloat16``, not ``torch.bfloat16``)."""
    return str(dtype).removeprefix("torch.")


class WeightSyncer:
    """Drives weight updates of a set of engines (a ``RolloutClient``) from the trainer.

    Construct it on every rank; only global rank 0 talks to engines (pass ``client`` there; the
    syncer owns it from then on and closes it). ``connect()`` once, then ``sync(policy, version)``
    after every optimizer step (every rank calls it), ``close()`` at the end. Client calls made
    outside the syncer must go through ``syncer.run(coro)``: the client lives on the syncer's loop.

    Limits come from ``cfg`` (``timeout_s``: the update group) and from the client's own config (each
    HTTP request); ``run`` adds none unless asked. In mode 'distributed' the engines reach the group at
    ``cfg.master_address``, or at the address :func:`update_group_address` picks (checked, once).

    A sync goes to the servers that are healthy or waiting for a catch-up (a restarted server), or to
    the ``urls`` given (a catch-up of restarted servers alone, with the weights they missed). In mode
    'distributed' the update group holds exactly the servers of the sync: it is formed again (under a
    new name and port) whenever that set changes, e.g. after a server died and came back.
    """

    def __init__(self, cfg: WeightSyncConfig, client=None, *, gpu_engines: bool = True, master_port: int = 0) -> None:
        self.cfg = resolve_sync_config(cfg, cuda=torch.cuda.is_available(), gpu_engines=gpu_engines)
        self.client = client
        self.master_address = ""  # resolved when the first group is formed
        self.master_port = master_port
        self.is_source = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self._loop = EventLoopThread() if self.is_source else None
        self._group = None
        self._members: list[tuple[str, int]] = []  # (url, incarnation) of the servers in the update group
        self._group_name = cfg.group_name
        self._formed = 0  # groups formed so far (names and ports of later ones differ)
        self._disk_copies: list[Path] = []  # mode 'disk': the copies this syncer wrote, oldest first
        self._launch_paths: set[str] = set()  # what the engines loaded at connect(): never deleted

    def connect(self, infos: dict | None = None) -> None:
        """Note what the engines were launched from (``infos``: their ``model_info()``, if the caller has
        read it already), and form the trainer+engines process group (mode 'distributed')."""
        if not self.is_source:
            return
        infos = infos if infos is not None else self.run(self.client.model_info())
        self._launch_paths = {info.model_path for info in infos.values() if info.model_path}
        if self.cfg.mode == "distributed":
            self._form_group(self.client.urls)

    def _rendezvous_address(self) -> str:
        """The update group's master address: configured, or picked and checked once."""
        if not self.master_address:
            address, origin = update_group_address(self.cfg.master_address, self.client.urls, os.environ)
            check_update_group_address(address, self.client.urls, "" if self.cfg.master_address else origin)
            log.info("weight-update group: engines connect to %s (%s)", address, origin)
            self.master_address = address
        return self.master_address

    def _group_port(self, address: str) -> int:
        if self._formed == 0 and self.master_port:
            return self.master_port
        try:  # the store listens on every interface; binding here proves the address is this host's
            return free_port(address)
        except OSError as exc:
            raise ValueError(f"rollout.sync.master_address {address!r} is not an address of this host (the "
                             f"trainer's rank 0, which hosts the update group): {exc}") from None

    def _form_group(self, urls: list[str]) -> None:
        """An update group of the source and exactly ``urls`` (the old one is left first)."""
        self._leave_group()
        name = self.cfg.group_name if self._formed == 0 else f"{self.cfg.group_name}_{self._formed}"
        address = self._rendezvous_address()
        port = self._group_port(address)
        self._formed += 1
        world = 1 + len(urls) * self.cfg.engine_tp_size
        joined = self._loop.submit(self.client.init_weights_update_group(
            master_address=address, master_port=port, world_size=world, group_name=name,
            backend=self.cfg.backend, ranks_per_engine=self.cfg.engine_tp_size, urls=urls,
        ))
        try:
            group = join_update_group(backend=self.cfg.backend, master_address=address, master_port=port,
                                      world_size=world, rank=0, group_name=name, timeout_s=self.cfg.timeout_s)
        except BaseException:
            joined.cancel()
            raise
        joined.result()  # every rank has joined: the engines answer now (the client bounds the call)
        self._group, self._members, self._group_name = group, self.client.incarnations(urls), name

    def _leave_group(self) -> None:
        """Destroy the current update group on its servers that still run the process that joined it,
        and here. A server that cannot leave is only logged: the group is abandoned either way."""
        if self._group is None:
            return
        group, members, self._group, self._members = self._group, self._members, None, []
        healthy = set(self.client.healthy_urls())
        alive = [url for url, life in members if url in healthy and self.client.incarnations([url]) == [(url, life)]]
        try:
            if alive:
                self.run(self.client.destroy_weights_update_group(self._group_name, urls=alive))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not leave weight-update group %s: %s", self._group_name, exc)
        finally:
            torch.distributed.destroy_process_group(group)

    def sync(self, policy, version: str, urls: list[str] | None = None) -> dict:
        """Push every weight of ``policy`` to the engines as ``version`` (every rank calls this;
        ``urls``, on the source rank: only these servers)."""
        return self.sync_stream(hf_tensors_on_source(policy), version, urls=urls)

    def sync_stream(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                    urls: list[str] | None = None) -> dict:
        """Every rank: drive ``tensors`` (an iterator that yields HF tensors on the source rank and
        gathers shards elsewhere); the source pushes them."""
        if not self.is_source:
            for _ in tensors:  # drives this rank's part of the gather
                pass
            return {}
        return self.sync_tensors(tensors, version, urls=urls)

    def sync_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                     urls: list[str] | None = None) -> dict:
        """Push ``(hf_name, tensor)`` pairs to the engines as ``version`` (source rank only).

        Returns ``{"bytes", "seconds", "weight_version"}`` and, with checksums on,
        ``"checksum_mismatches"`` (0 means every engine holds exactly these tensors).
        """
        started = time.perf_counter()
        catch_up = urls is not None
        targets = self._prepare(list(urls) if catch_up else self.run(self._targets()), catch_up)
        if not targets:  # a catch-up whose servers died again: their next restart asks for another
            for _ in tensors:  # the other ranks gather these tensors with this one
                pass
            return {"bytes": 0, "seconds": time.perf_counter() - started, "weight_version": version}
        sent, checksums = 0, {}
        try:
            if self.cfg.mode == "disk":
                sent, checksums = self._push_disk(tensors, version, targets)
            else:
                sent, checksums = self._push_buckets(tensors, version, targets)
            self.run(self.client.flush_cache(urls=targets))
        finally:
            self.run(self.client.resume(urls=targets))
        self.run(self._synced(targets, version, catch_up))
        stats = {"bytes": sent, "seconds": time.perf_counter() - started, "weight_version": version}
        if self.cfg.checksum:
            stats["checksum_mismatches"] = self._compare_checksums(checksums, version, targets)
        return stats

    def _prepare(self, targets: list[str], catch_up: bool) -> list[str]:
        """Form the update group if its servers changed, and pause ``targets``. A server found dead
        meanwhile (a control call to it failed and its /health probe too) is left out: a regular sync
        waits for its restart and pushes to it as well, a catch-up goes on without it. Returns the
        servers to sync (empty: a catch-up's servers all died)."""
        for _ in range(_PREPARE_TRIES):
            before = self.client.incarnations(targets)
            try:
                if self.cfg.mode == "distributed" and before != self._members:
                    self._form_group(targets)
                self.run(self.client.pause(urls=targets))
                return targets
            except RolloutRequestError:
                if catch_up:
                    targets = [u for u in targets if u in self.client.healthy_urls() or u in self.client.stale_urls()]
                else:
                    targets = self.run(self._targets())
                if self.client.incarnations(targets) == before:
                    raise  # no server died: a real failure
                if not targets:
                    return []
                log.warning("a rollout server died before the weight sync; syncing %s", ", ".join(targets))
        raise RolloutRequestError(f"rollout servers kept dying before the weight sync ({_PREPARE_TRIES} tries)")

    async def _targets(self) -> list[str]:
        """Servers of a regular sync: the healthy ones and those waiting for a catch-up."""
        await self.client.wait_for_any_server()
        stale = self.client.stale_urls()
        return [u for u in self.client.urls if u in stale or u in self.client.healthy_urls()]

    async def _synced(self, targets: list[str], version: str, catch_up: bool) -> None:
        """Record a regular sync's version; take back restarted servers this sync brought up to date."""
        if not catch_up:
            self.client.synced_version = version
        self.client.readmit([u for u in targets if u in self.client.stale_urls()])

    def _push_buckets(self, tensors, version: str, targets: list[str]) -> tuple[int, dict]:
        """Modes 'distributed' and 'tensor', inside the engines' weight-update session."""
        push = {"distributed": self._broadcast_bucket, "tensor": self._post_tensor_bucket}[self.cfg.mode]
        sent, checksums = 0, {}
        self.run(self.client.begin_weight_update(urls=targets))
        for bucket in buckets(tensors, self.cfg.bucket_bytes):
            push(bucket, version, targets)
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
            if self.cfg.checksum:
                checksums.update((name, tensor_checksum(t)) for name, t in bucket)
        self.run(self.client.end_weight_update(urls=targets))
        return sent, checksums

    def run(self, coro, timeout_s: float | None = None):
        """Run a coroutine (e.g. a client call) on the syncer's event loop and return its result; source rank
        only. No limit unless ``timeout_s`` is given (then the coroutine is cancelled when it passes): the
        client bounds every request itself, and a whole batch takes as long as its size needs."""
        return self._loop.run(coro, timeout_s)

    def submit(self, coro) -> concurrent.futures.Future:
        """Start a coroutine on the syncer's event loop without waiting for it; source rank only."""
        return self._loop.submit(coro)

    def _broadcast_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: str, targets: list[str]) -> None:
        done = self._loop.submit(self.client.update_weights_from_distributed(
            names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for _, t in bucket],
            shapes=[list(t.shape) for _, t in bucket], group_name=self._group_name,
            weight_version=version, flush_cache=False, urls=targets,
        ))
        for _, tensor in bucket:
            # gloo from a GPU trainer: staged through host memory (the receivers are on CPU).
            staged = tensor if self.cfg.backend == "nccl" else tensor.cpu()
            broadcast_from_source(self._group, staged.contiguous())
        done.result()  # the client bounds the request (control_timeout_s), the group each broadcast

    def _post_tensor_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: str, targets: list[str]) -> None:
        # The bucket stays referenced until every engine has answered: with tensor_format 'sglang' the
        # engines read this process's GPU memory through the IPC handles.
        fmt = self.cfg.tensor_format or engine_tensor_format(
            self.run(self.client.api(url)).engine for url in targets)
        entries, load_format = serialize_bucket(bucket, fmt, tp_size=self.cfg.engine_tp_size)
        self.run(self.client.update_weights_from_tensor(serialized_named_tensors=entries, load_format=load_format,
                                                        weight_version=version, flush_cache=False, urls=targets))

    def _push_disk(self, tensors, version: str, targets: list[str]) -> tuple[int, dict]:
        out = Path(self.cfg.disk_dir).resolve() / f"weights-{version}"  # engines may run elsewhere: absolute
        sent, checksums = 0, {}
        with atomic_dir(out, overwrite=True) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=self.cfg.bucket_bytes)
            for name, tensor in tensors:
                writer.add(name, tensor)
                sent += tensor.numel() * tensor.element_size()
                if self.cfg.checksum:
                    checksums[name] = tensor_checksum(tensor)
            writer.close()
            finalize_shards(tmp, [writer.part])
        self.run(self.client.update_weights_from_disk(str(out), weight_version=version, urls=targets))
        # Every target now holds this copy: older ones are never read again.
        self._disk_copies = [p for p in self._disk_copies if p != out] + [out]
        deleted = prune_weight_copies(out.parent, self._disk_copies, self.cfg.disk_keep, self._launch_paths)
        self._disk_copies = [p for p in self._disk_copies if p not in deleted]
        return sent, checksums

    def _compare_checksums(self, expected: dict[str, str], version: str, targets: list[str]) -> int:
        """Number of (engine, tensor) pairs whose checksum differs from the trainer's (0 = exact)."""
        answers = self.run(self.client.weights_checksums(urls=targets))
        mismatches = 0
        for url, answer in answers.items():
            if answer.get("weight_version") != version:
                raise RuntimeError(f"{url} reports weight_version {answer.get('weight_version')!r}, expected {version!r}")
            got = answer.get("checksums", {})
            mismatches += sum(got.get(name) != digest for name, digest in expected.items())
        return mismatches

    def close(self) -> None:
        """Leave the update group and close the client (its HTTP session lives on this syncer's loop);
        the client is closed even when the servers are gone."""
        if self._loop is None:
            return
        try:
            self._leave_group()
        finally:
            try:
                self.run(self.client.close())
            finally:
                self._loop.close()
