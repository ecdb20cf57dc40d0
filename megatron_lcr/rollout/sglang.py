"""Start and stop rollout servers: SGLang on GPUs, or ``lcr serve`` reference servers on CPU.

:func:`launch_servers` builds one command line per server, starts the processes (each in its own
process group, output to ``{log_dir}/server{k}.log``), and returns when every server answers
``/health`` *and* its own process tree listens on its port (so a server that failed to bind a port
some other process holds is not mistaken for ready). A server that exits or does not become ready
in time stops the whole launch with one line naming it, its log, and the tail of that log.

The same code launches both backends; only the command differs:

``sglang``     ``python -m sglang.launch_server --model-path P --tp-size T --host H --port N --dtype D
              [--mem-fraction-static F] [--api-key K] [--random-seed S] [--skip-tokenizer-init] ...``,
              with ``CUDA_VISIBLE_DEVICES`` set to that server's ``tp_size`` GPUs. Flag names checked in
              sglang's ``python/sglang/srt/server_args.py`` (``ServerArgs`` fields ``model_path``,
              ``tp_size``, ``host``, ``port``, ``dtype``, ``mem_fraction_static``, ``api_key``,
              ``random_seed``, ``skip_tokenizer_init``, ``enable_deterministic_inference``).
``reference``  ``python -m megatron_lcr.cli serve --model P --host H --port N [--dtype D] [--seed S]
              [--api-key K]`` (CPU, for tests and demos).

The optional SGLang router (``python -m sglang_router.launch_router --worker-urls U... --host H
--port N --policy P``, flags as in sgl-router's ``router_args.py``) gives one URL in front of the
servers for tools that want one; the trainer's :class:`~megatron_lcr.rollout.client.SGLangClient`
balances over the servers itself.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from megatron_lcr.parallel.env import free_ports

ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# SGLang dtype names -> the reference server's --dtype ("auto" keeps its float32 default).
_REFERENCE_DTYPES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
                     "float32": "float32"}
# Lines of a failed server's log quoted in the error (joined into one line).
_LOG_TAIL_LINES = 15
_LOG_TAIL_CHARS = 2000


@dataclass(kw_only=True)
class SGLangLaunchConfig:
    """Which rollout servers to start and how."""

    backend: Literal["sglang", "reference"] = "sglang"
    """'sglang': python -m sglang.launch_server on GPUs; 'reference': lcr serve on CPU."""
    model_path: str = ""
    """Hugging Face model directory every server loads; empty: the trainer fills in its policy's weights."""
    num_servers: int = 1
    """Independent servers (data-parallel engines)."""
    tp_size: int = 1
    """GPUs per SGLang server (its tensor-parallel degree)."""
    host: str = "127.0.0.1"
    """Interface the servers listen on (clients reach them at http://host:port)."""
    ports: list[int] = field(default_factory=list)
    """One port per server; empty: base_port, base_port + 1, ..."""
    base_port: int = 30000
    """First port when ports is empty; 0: ports the OS reports free (loopback runs, tests)."""
    gpu_ids: list[int] = field(default_factory=list)
    """GPUs, tp_size per server in order (numbered as this process sees them); empty: 0 .. servers * tp - 1."""
    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV cache; None: SGLang's default."""
    dtype: str = "auto"
    """Weight/activation dtype of the SGLang servers."""
    api_key: str | None = None
    """Servers require 'Authorization: Bearer KEY'; None: no key."""
    random_seed: int | None = None
    """SGLang's --random-seed; None: SGLang's default."""
    skip_tokenizer_init: bool = False
    """SGLang's --skip-tokenizer-init (token ids in, token ids out; no stop strings)."""
    deterministic: bool = False
    """SGLang's --enable-deterministic-inference (batch-invariant kernels: a seed gives the same sample)."""
    extra_args: list[str] = field(default_factory=list)
    """More command-line arguments appended to every server's command."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for every server (e.g. NCCL_*, SGLANG_*, OMP_NUM_THREADS)."""
    log_dir: str = "rollout_logs"
    """Directory of the servers' logs (server{k}.log, router.log)."""
    startup_timeout_s: float = 900.0
    """How long a server may take to answer /health (seconds)."""
    python: str = ""
    """Python interpreter that runs the servers; empty: this one."""
    router: bool = False
    """Also start sglang_router in front of the servers (backend sglang only)."""
    router_port: int = 30100
    """Port of the router."""
    router_policy: str = "cache_aware"
    """Router load-balancing policy: random, round_robin, cache_aware or power_of_two."""

    def __post_init__(self) -> None:
        if self.backend not in ("sglang", "reference"):
            raise ValueError(f"backend must be 'sglang' or 'reference', got {self.backend!r}")
        if self.num_servers < 1 or self.tp_size < 1:
            raise ValueError(f"num_servers ({self.num_servers}) and tp_size ({self.tp_size}) must be >= 1")
        if self.ports and len(self.ports) != self.num_servers:
            raise ValueError(f"ports lists {len(self.ports)} ports but num_servers is {self.num_servers}")
        if self.ports and len(set(self.ports)) != self.num_servers:
            raise ValueError(f"ports must be distinct, got {self.server_ports()}")
        if self.gpu_ids and len(self.gpu_ids) != self.num_servers * self.tp_size:
            raise ValueError(f"gpu_ids lists {len(self.gpu_ids)} GPUs but num_servers ({self.num_servers}) "
                             f"x tp_size ({self.tp_size}) = {self.num_servers * self.tp_size}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.dtype not in SGLANG_DTYPES:
            raise ValueError(f"dtype must be one of {SGLANG_DTYPES}, got {self.dtype!r}")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {ROUTER_POLICIES}, got {self.router_policy!r}")
        if self.router and self.backend != "sglang":
            raise ValueError(f"router=True needs backend 'sglang', got backend {self.backend!r}")
        if self.backend == "reference" and self.tp_size != 1:
            raise ValueError(f"the reference server runs on one CPU process: tp_size must be 1, got {self.tp_size}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")

    def server_ports(self) -> list[int]:
        return list(self.ports) if self.ports else [self.base_port + k for k in range(self.num_servers)]

    def server_urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.server_ports()]

    def interpreter(self) -> str:
        return self.python or sys.executable


# --------------------------------------------------------------------------- command lines


def sglang_server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    """``python -m sglang.launch_server ...`` for one server."""
    cmd = [cfg.interpreter(), "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--tp-size", str(cfg.tp_size), "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype]
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.random_seed is not None:
        cmd += ["--random-seed", str(cfg.random_seed)]
    if cfg.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if cfg.deterministic:
        cmd.append("--enable-deterministic-inference")
    return cmd + list(cfg.extra_args)


def reference_server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    """``python -m megatron_lcr.cli serve ...`` (the CPU reference server) for one server."""
    cmd = [cfg.interpreter(), "-m", "megatron_lcr.cli", "serve", "--model", cfg.model_path,
           "--host", cfg.host, "--port", str(port)]
    if cfg.dtype != "auto":
        cmd += ["--dtype", _REFERENCE_DTYPES[cfg.dtype]]
    if cfg.random_seed is not None:
        cmd += ["--seed", str(cfg.random_seed)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    return cmd + list(cfg.extra_args)


def server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    builder = sglang_server_command if cfg.backend == "sglang" else reference_server_command
    return builder(cfg, port)


def server_env(cfg: SGLangLaunchConfig, index: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of server ``index``: its own ``tp_size`` GPUs in CUDA_VISIBLE_DEVICES (sglang backend).

    GPU ids count as the launcher's own process sees them: under an inherited CUDA_VISIBLE_DEVICES
    (SLURM, a container) id k is the k-th GPU it lists.
    """
    env = {**(os.environ if base is None else base), **cfg.env}
    if cfg.backend != "sglang":
        return env
    ids = cfg.gpu_ids or list(range(cfg.num_servers * cfg.tp_size))
    mine = [str(g) for g in ids[index * cfg.tp_size:(index + 1) * cfg.tp_size]]
    inherited = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if inherited:
        visible = [d.strip() for d in inherited.split(",")]
        if max(int(g) for g in mine) >= len(visible):
            raise ValueError(f"server {index} needs GPUs {','.join(mine)} but CUDA_VISIBLE_DEVICES={inherited} "
                             f"lists {len(visible)}")
        mine = [visible[int(g)] for g in mine]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


def router_command(cfg: SGLangLaunchConfig, worker_urls: Sequence[str]) -> list[str]:
    """``python -m sglang_router.launch_router --worker-urls ...``."""
    cmd = [cfg.interpreter(), "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
           "--host", cfg.host, "--port", str(cfg.router_port), "--policy", cfg.router_policy]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    return cmd


# --------------------------------------------------------------------------- processes


class ServerStartError(RuntimeError):
    """A rollout server exited or did not become ready; the message quotes its log."""


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES, chars: int = _LOG_TAIL_CHARS) -> str:
    """The last non-empty lines of a log, joined into one line with ' | '."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    tail = " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
    return tail[-chars:] if tail else "(log is empty)"


def _health_ok(url: str, api_key: str | None, timeout_s: float = 5.0) -> bool:
    request = urllib.request.Request(url + "/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(eq=False)
class ServerHandle:
    """One launched server process: its URL, command, log, and how to stop or restart it."""

    name: str
    url: str
    port: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    api_key: str | None = None
    startup_timeout_s: float = 900.0
    process: subprocess.Popen | None = None
    _started_at: float = field(default=0.0, repr=False)

    def start(self) -> None:
        """Start the process (output appended to the log); does not wait for it to be ready."""
        if self.alive():
            raise RuntimeError(f"{self.name} ({self.url}) is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.command)}\n")
            log.flush()
            self._started_at = time.time()
            # Own process group: stop() reaches the server's worker processes too.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def listening(self) -> bool:
        """Whether this server's own process tree listens on its port."""
        if not self.alive():
            return False
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in conns):
                return True
        return False

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until /health answers 200 from this process; raise ServerStartError with the log tail."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll() if self.process is not None else -1
            if code is not None:
                raise ServerStartError(self._failure(f"exited with code {code}"))
            if self.listening() and _health_ok(self.url, self.api_key):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(self._failure(f"was not ready after {timeout_s:.0f} s"))
            time.sleep(0.25)

    def _failure(self, what: str) -> str:
        return f"rollout {self.name} ({self.url}) {what}; log {self.log_path}: {log_tail(self.log_path)}"

    def _group_members(self) -> list[psutil.Process]:
        """Processes of this server's process group started since it was: the server, its workers,
        and workers left behind by a server that died (they would hold its GPUs and port)."""
        members = []
        for proc in psutil.process_iter(["create_time"]):
            try:
                if os.getpgid(proc.pid) == self.process.pid and proc.info["create_time"] >= self._started_at - 1:
                    members.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return members

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``timeout_s``."""
        if self.process is None:
            return
        members = self._group_members()
        # Signal the group only while its leader is unreaped, so the group id is still ours.
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # psutil checks each is still the process we listed (pid and start time) before signalling it.
        _, left = psutil.wait_procs(members, timeout=5.0)
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def restart(self) -> None:
        """Stop (if running), start again with the same command, and wait until ready."""
        self.stop()
        self.start()
        self.wait_ready()


def _make_handles(cfg: SGLangLaunchConfig) -> list[ServerHandle]:
    log_dir = Path(cfg.log_dir)
    return [
        ServerHandle(name=f"server{k}", url=url, port=port, command=server_command(cfg, port),
                     env=server_env(cfg, k), log_path=log_dir / f"server{k}.log", api_key=cfg.api_key,
                     startup_timeout_s=cfg.startup_timeout_s)
        for k, (url, port) in enumerate(zip(cfg.server_urls(), cfg.server_ports()))
    ]


def _start_and_wait(handles: Sequence[ServerHandle], timeout_s: float) -> None:
    """Start all, wait for all (they load in parallel); on any failure stop all and re-raise."""
    try:
        for handle in handles:
            handle.start()
        deadline = time.monotonic() + timeout_s
        for handle in handles:
            handle.wait_ready(max(deadline - time.monotonic(), 1.0))
    except BaseException:
        stop_servers(handles)
        raise


def launch_servers(cfg: SGLangLaunchConfig) -> list[ServerHandle]:
    """Start ``cfg.num_servers`` servers and return once every one is ready."""
    if not cfg.model_path:
        raise ValueError("model_path must name a Hugging Face model directory")
    if not cfg.ports and cfg.base_port == 0:
        cfg = dataclasses.replace(cfg, ports=free_ports(cfg.num_servers))
    handles = _make_handles(cfg)
    _start_and_wait(handles, cfg.startup_timeout_s)
    return handles


def launch_router(cfg: SGLangLaunchConfig, worker_urls: Sequence[str]) -> ServerHandle:
    """Start sglang_router in front of ``worker_urls`` and return once it answers /health."""
    url = f"http://{cfg.host}:{cfg.router_port}"
    handle = ServerHandle(name="router", url=url, port=cfg.router_port, command=router_command(cfg, worker_urls),
                          env=dict(os.environ), log_path=Path(cfg.log_dir) / "router.log", api_key=cfg.api_key,
                          startup_timeout_s=cfg.startup_timeout_s)
    _start_and_wait([handle], cfg.startup_timeout_s)
    return handle


def stop_servers(handles: Sequence[ServerHandle]) -> None:
    for handle in handles:
        handle.stop()


def restart_callback(handles: Sequence[ServerHandle]) -> Callable[[str], None]:
    """``on_server_dead`` for :class:`SGLangClient`: restart the handle serving that URL (blocking)."""
    by_url = {h.url: h for h in handles}

    def restart(url: str) -> None:
        by_url[url].restart()

    return restart
