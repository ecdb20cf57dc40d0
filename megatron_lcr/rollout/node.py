"""``lcr rollout-servers``: a run config's rollout servers on a node of their own.

In the disaggregated layout (``parallel/placement.py``) the engines run on rollout nodes, not beside
the trainer: the SLURM script starts this command there, waits for the URLs it writes, and hands them
to the trainer as ``rollout.urls`` (with ``rollout.sync.master_address`` set to the trainer's node).
The servers are the config's ``rollout.server`` section (SGLang or vLLM on this node's GPUs), loading
``rollout.server.model_path`` or else the policy's ``model.hf_path``. A server that dies is restarted
here (the trainer cannot restart servers on another node); the trainer then sees a new incarnation
and catches it up with the current weights. SIGTERM / SIGINT stops them all.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
from pathlib import Path

from megatron_lcr.atomic import atomic_write_text
from megatron_lcr.rollout.sglang import SGLangLaunchConfig, launch_servers, stop_servers

# How often dead servers are looked for (seconds).
_WATCH_S = 5.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def advertised_url(url: str, advertise: str) -> str:
    """``url`` with its host replaced by ``advertise`` (a wildcard bind address is no address to call)."""
    scheme, rest = url.split("://", 1)
    port = rest.rsplit(":", 1)[1]
    host = f"[{advertise}]" if ":" in advertise else advertise
    return f"{scheme}://{host}:{port}"


def run_rollout_node(server: SGLangLaunchConfig, *, urls_file: str | None, advertise: str = "",
                     stop: threading.Event | None = None) -> None:
    """Launch ``server``'s servers, write their URLs (one per line) to ``urls_file`` once all are ready,
    restart any that dies, and stop them all when ``stop`` is set (SIGTERM / SIGINT set it)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    advertise = advertise or (socket.getfqdn() if server.host in _WILDCARD_HOSTS else server.host)
    handles = launch_servers(server)
    try:
        urls = [advertised_url(h.url, advertise) for h in handles]
        if urls_file:
            Path(urls_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(urls_file), "".join(f"{url}\n" for url in urls))
        print(f"lcr rollout-servers: ready {' '.join(urls)}", flush=True)
        while not stop.wait(_WATCH_S):
            for handle in handles:
                if not handle.alive():
                    print(f"lcr rollout-servers: {handle.name} ({handle.url}) died; restarting (log "
                          f"{handle.log_path})", flush=True)
                    handle.restart()
    finally:
        stop_servers(handles)


def node_server_config(rollout_server: SGLangLaunchConfig, *, model_path: str, host: str, log_dir: str) -> SGLangLaunchConfig:
    """The config's server section with the model filled in and this node's bind address and logs."""
    return dataclasses.replace(rollout_server, model_path=rollout_server.model_path or model_path, host=host,
                               log_dir=log_dir)
