"""Who am I in the job: rank, world size and rendezvous address from torchrun, SLURM or nothing.

`read_dist_env` is a pure function of an environment mapping, so every launcher's variables can be
tested without launching anything; `init_process_group` turns its result into a default
`torch.distributed` process group (NCCL on GPU, gloo on CPU).

`is_loopback` and `routable_address` tell whether an address reaches other nodes, and at which of
this host's addresses another node reaches us (the weight-update group's rendezvous address).

Precedence: torchrun-style variables (RANK, WORLD_SIZE, ...) win over SLURM's, because a job that
runs `torchrun` inside `srun` has both and the torchrun ones describe the actual worker processes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping

import torch
import torch.distributed as dist

Launcher = Literal["torchrun", "slurm", "single"]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500  # torchrun's own default, so a bare `torchrun` and we agree.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000  # derived ports fall in [20000, 29999], below Linux's ephemeral range.
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """This process's place in the distributed job, as its launcher described it."""

    rank: int
    """Global rank of this process (0 .. world_size-1)."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank of this process among those on its node; also its CUDA device index."""
    local_world_size: int
    """Number of processes on this node."""
    master_addr: str
    """Host name or IP address of the rank-0 rendezvous store."""
    master_port: int
    """TCP port of the rank-0 rendezvous store."""
    launcher: Launcher
    """Which launcher's variables these values came from."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(
                f"local_world_size {self.local_world_size} must be in "
                f"1..world_size {self.world_size}"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local_rank {self.local_rank} is outside local_world_size {self.local_world_size}"
            )
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port {self.master_port} is not a TCP port (1..65535)")
        if self.launcher not in ("torchrun", "slurm", "single"):
            raise ValueError(f"launcher {self.launcher!r} is not one of torchrun, slurm, single")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports on ``host`` that were free a moment ago.

    All sockets are held open together so the OS hands out different ports; `base_port + k` is not
    safe because a neighbouring port may already be taken.
    """
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it; we release it)."""
    return free_ports(1, host)[0]


def is_loopback(host: str) -> bool:
    """Whether a connection to ``host`` (a name or IP literal, as written: no DNS lookup) stays on the
    host that makes it: ``localhost`` and ``*.localhost``, 127.0.0.0/8, ::1, ::ffff:127.x.y.z, and the
    unspecified 0.0.0.0 / :: (a connect to them reaches the connecting host too)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False  # a host name: only its own node's resolver knows where it points
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_loopback or ip.is_unspecified


def routable_address(peer: str, port: int = 9) -> str | None:
    """This host's address on the interface that routes to ``peer`` (where ``peer`` would see our
    packets come from), or None when ``peer`` does not resolve or no route leads there.

    A UDP ``connect`` only asks the kernel for a route and a source address; no packet is sent, so
    this works for any address, reachable or not.
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(peer, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.connect(sockaddr)
            return sock.getsockname()[0]
    except OSError:  # socket.gaierror included: no such name, no route, no interface
        return None


def read_dist_env(environ: Mapping[str, str]) -> DistEnv:
    """Reads the launcher's variables from `environ` (pass `os.environ` in production).

    torchrun (RANK and WORLD_SIZE set) wins over SLURM (SLURM_PROCID set); with neither, this is a
    single process. Raises ValueError naming the variable and its value when they are inconsistent.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _read_torchrun(environ)
    if "SLURM_PROCID" in environ:
        return _read_slurm(environ)
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=_int_var(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher="single",
    )


def _read_torchrun(environ: Mapping[str, str]) -> DistEnv:
    for present, missing in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if present in environ and missing not in environ:
            raise ValueError(f"{present}={environ[present]!r} is set but {missing} is missing")
    rank = _int_var(environ, "RANK")
    world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
    _check_below("RANK", rank, "WORLD_SIZE", world_size)
    # A hand-set RANK/WORLD_SIZE launch (no LOCAL_*) is taken as one node; torchrun sets all four.
    local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", world_size, minimum=1)
    local_rank = _int_var(environ, "LOCAL_RANK", rank if local_world_size == world_size else None)
    _check_below("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size)
    if local_world_size > world_size:
        raise ValueError(
            f"LOCAL_WORLD_SIZE={local_world_size} is larger than WORLD_SIZE={world_size}"
        )
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=_int_var(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher="torchrun",
    )


def _read_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int_var(environ, "SLURM_PROCID")
    if "SLURM_NTASKS" not in environ:
        raise ValueError(
            f"SLURM_PROCID={environ['SLURM_PROCID']!r} is set but SLURM_NTASKS is missing"
        )
    world_size = _int_var(environ, "SLURM_NTASKS", minimum=1)
    _check_below("SLURM_PROCID", rank, "SLURM_NTASKS", world_size)
    # An sbatch script itself also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but only srun's
    # tasks have SLURM_STEP_ID (seen on SLURM 22.05). Without this check a script that forgot `srun`
    # would wait for its missing peers until the rendezvous timeout.
    if world_size > 1 and "SLURM_STEP_ID" not in environ:
        raise ValueError(
            f"SLURM_NTASKS={world_size} but SLURM_STEP_ID is missing: this is the batch script, "
            "not an srun task; start the tasks with srun (or torchrun)"
        )

    # The step's node list is exact for `srun` inside a bigger allocation; the job's is a fallback.
    nodelist_var = next((v for v in SLURM_NODELIST_VARS if v in environ), None)
    hosts = expand_slurm_hostlist(environ[nodelist_var]) if nodelist_var else []
    local_world_size = _slurm_local_world_size(environ, world_size, num_nodes=len(hosts))
    local_rank = _int_var(environ, "SLURM_LOCALID", 0 if local_world_size == 1 else None)
    _check_below("SLURM_LOCALID", local_rank, "tasks on this node", local_world_size)

    # Task 0 runs on the first node of the list under SLURM's default block distribution. An
    # explicit MASTER_ADDR (e.g. an InfiniBand interface name) overrides that guess.
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif hosts:
        master_addr = hosts[0]
    elif world_size == 1:
        master_addr = DEFAULT_MASTER_ADDR
    else:
        raise ValueError(
            f"SLURM_NTASKS={world_size} but none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, "
            "SLURM_NODELIST or MASTER_ADDR is set"
        )
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=_slurm_master_port(environ),
        launcher="slurm",
    )


def _slurm_local_world_size(environ: Mapping[str, str], world_size: int, *, num_nodes: int) -> int:
    """Tasks on this node: the step's or job's tasks-per-node, else an even split over nodes."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if var not in environ:
            continue
        try:
            per_node = parse_slurm_tasks_per_node(environ[var])
        except ValueError:
            raise ValueError(f"{var}={environ[var]!r} is not SLURM tasks-per-node syntax") from None
        if var == "SLURM_NTASKS_PER_NODE" or len(set(per_node)) == 1:
            return per_node[0]
        node_id = _int_var(environ, "SLURM_NODEID")
        _check_below("SLURM_NODEID", node_id, f"the {len(per_node)} nodes of {var}", len(per_node))
        return per_node[node_id]
    if num_nodes <= 1:
        return world_size
    if world_size % num_nodes:
        raise ValueError(
            f"SLURM_NTASKS={world_size} does not split evenly over {num_nodes} nodes and "
            "SLURM_TASKS_PER_NODE is missing"
        )
    return world_size // num_nodes


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else one derived from the job id, so every task computes the same."""
    if "MASTER_PORT" in environ:
        return _int_var(environ, "MASTER_PORT")
    if "SLURM_JOB_ID" in environ:
        return SLURM_PORT_BASE + _int_var(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    return DEFAULT_MASTER_PORT


def parse_slurm_tasks_per_node(spec: str) -> list[int]:
    """Expands SLURM's tasks-per-node syntax, one entry per node: "4(x2),3" -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*([0-9]+)(?:\(x([0-9]+)\))?\s*", part)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"bad tasks-per-node entry {part!r} in {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def expand_slurm_hostlist(spec: str) -> list[str]:
    """Expands SLURM's compressed host list, in SLURM's order.

    "node[01-03,07],gpu-a[1-2]-ib,login1" -> node01 node02 node03 node07 gpu-a1-ib gpu-a2-ib login1.
    Commas separate hosts only outside brackets; a range keeps the zero padding of its lower bound;
    several bracket groups in one name expand as a product, the leftmost group varying slowest.
    Checked against `scontrol show hostnames` (SLURM 22.05), which agrees on all of the above except
    that it rejects text after the last bracket ("gpu-a[1-2]-ib"); newer sites use such names, so we
    accept them.
    """
    hosts: list[str] = []
    for name in _split_top_level(spec):
        hosts.extend(_expand_host(name, spec))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i} in host list {spec!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' at position {i} in host list {spec!r}")
        elif char == "," and depth == 0:
            names.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in host list {spec!r}")
    names.append(spec[start:])
    # SLURM's own parser skips empty entries ("a,,b", "" -> no hosts); so do we.
    return [name.strip() for name in names if name.strip()]


def _expand_host(name: str, spec: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, suffix = name[: match.start()], name[match.end() :]
    return [
        prefix + value + rest
        for value in _expand_range_group(match.group(1), spec)
        for rest in _expand_host(suffix, spec)
    ]


def _expand_range_group(group: str, spec: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]."""
    values: list[str] = []
    for item in group.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item.strip())
        if match is None:
            raise ValueError(f"bad range {item!r} in host list {spec!r}")
        low_text, high_text = match.group(1), match.group(2) or match.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"descending range {item!r} in host list {spec!r}")
        width = len(low_text)  # "01-10" -> width 2; "1-10" -> no padding, as SLURM prints them.
        values.extend(str(n).zfill(width) for n in range(low, high + 1))
    return values


def init_process_group(
    env: DistEnv, *, backend: str | None = None, timeout_s: float = 1800
) -> None:
    """Creates the default process group for `env`; a no-op if one of the same size exists.

    backend: "nccl" when CUDA is available, else "gloo", unless given. timeout_s: seconds a
    collective may wait before the job fails.
    """
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(
                f"process group already initialised with world size {dist.get_world_size()} "
                f"rank {dist.get_rank()}, but env says world size {env.world_size} rank {env.rank}"
            )
        return
    # Later consumers (Megatron's gloo groups, the weight-sync group to rollout engines) read these.
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timedelta(seconds=timeout_s)
    if env.launcher == "torchrun":
        # env:// reuses torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE) on MASTER_PORT.
        dist.init_process_group(
            backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    elif env.world_size == 1:
        # An in-memory store: a lone process binds no port, so parallel single-process runs
        # (tests, notebooks) cannot collide on the default port.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{_url_host(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )


def collective_device() -> torch.device:
    """Where a tensor must live for a collective over the job's groups: NCCL (GPU jobs) takes only
    CUDA tensors, gloo only CPU ones. For small host-side values such as step metrics and flags."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _url_host(addr: str) -> str:
    """IPv6 literals need brackets inside a tcp:// URL."""
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def _int_var(
    environ: Mapping[str, str], name: str, default: int | None = None, *, minimum: int = 0
) -> int:
    if name not in environ:
        if default is None:
            raise ValueError(f"{name} is missing")
        return default
    text = environ[name]
    # Stricter than int(), which also takes "1_0" and non-ASCII digits.
    if re.fullmatch(r"\s*-?[0-9]+\s*", text) is None:
        raise ValueError(f"{name}={text!r} is not an integer")
    value = int(text)
    if value < minimum:
        raise ValueError(f"{name}={text!r} must be >= {minimum}")
    return value


def _check_below(name: str, value: int, limit_name: str, limit: int) -> None:
    if value >= limit:
        raise ValueError(f"{name}={value} must be < {limit_name}={limit}")
