"""The shape of an ``lcr launch slurm`` job: nodes, GPUs, where it runs, how it is warned before its end.

Every value that ends up in an ``#SBATCH`` line or a shell command is checked here, so that a typo (a
partition name with a space, a malformed time limit) fails in one line before anything is written,
instead of as an sbatch error about a script the user never wrote, or as a broken script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# SLURM's names (partition, account, job name, QOS): no spaces, no shell metacharacters. SLURM itself
# is more lenient for some, but these also end up unquoted in #SBATCH lines.
_NAME = r"[A-Za-z0-9_.+-]+"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# SLURM caps a --signal lead time at 65535 s and sends it up to 60 s early (sbatch(1), --signal).
MAX_SIGNAL_LEAD_S = 65535
UNLIMITED_TIMES = ("UNLIMITED", "INFINITE")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds of a SLURM time limit, or None for UNLIMITED / INFINITE. SLURM's formats (sbatch(1),
    --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Raises ValueError for anything else."""
    if text.upper() in UNLIMITED_TIMES:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"--time {text!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, first, second, third = match.groups()
    if days is None:  # M | M:S | H:M:S
        if third is not None:
            hours, minutes, seconds = int(first), int(second), int(third)
        else:
            hours, minutes, seconds = 0, int(first), int(second or 0)
    else:  # D-H | D-H:M | D-H:M:S
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(kw_only=True)
class SlurmLaunchConfig:
    """One ``lcr train`` run as a SLURM job: trainer nodes (torchrun on each) and rollout nodes."""

    config: str
    """The ``lcr train`` YAML config."""
    out: str
    """Run directory (``--out`` of ``lcr train``); the script and the job's logs go to ``out/slurm/``."""
    overrides: list[str] = field(default_factory=list)
    """Dotted ``key=value`` overrides of the run config, as for ``lcr train``."""
    nodes: int = 1
    """Nodes of the job, trainer and rollout together (count)."""
    gpus_per_node: int = 8
    """GPUs of each node (count); 0: CPU nodes (gloo, ``ntasks_per_node`` trainer processes)."""
    ntasks_per_node: int | None = None
    """Trainer processes per trainer node (torchrun --nproc-per-node); None: one per GPU not taken by the
    servers rank 0 launches on node 0 (CPU nodes: 1)."""
    cpus_per_node: int | None = None
    """CPUs for each node's task (--cpus-per-task of its one task); None: 8 per GPU, on CPU nodes one per
    trainer process."""
    rollout_nodes: int = 0
    """Nodes of their own for the rollout servers (``lcr rollout-servers``, the last ones); 0: rank 0
    launches the config's servers itself, or ``rollout.urls`` names running ones."""
    partition: str = ""
    """SLURM partition (a comma-separated list for several); empty: the cluster's default."""
    account: str = ""
    """SLURM account to charge; empty: the user's default."""
    time: str = "48:00:00"
    """Time limit (SLURM format: M, H:M:S, D-H:M:S, UNLIMITED)."""
    job_name: str = ""
    """Job name; empty: ``lcr-`` and the config file's name."""
    container: str = ""
    """Container image to run every task in (pyxis: ``srun --container-image``); empty: the host's Python."""
    mounts: list[str] = field(default_factory=list)
    """Container mounts, ``SRC:DST[:FLAGS]`` each (pyxis ``--container-mounts``)."""
    signal_lead_s: int = 600
    """Seconds before the time limit SLURM warns the job (SIGUSR1 to the batch shell): the trainer then
    finishes its step, saves a checkpoint and the job requeues itself."""
    python: str = ""
    """Python interpreter on the nodes; empty: this one (``python`` inside a container)."""
    env: list[str] = field(default_factory=list)
    """More ``KEY=VALUE`` environment variables for every task (e.g. NCCL_SOCKET_IFNAME=ib0)."""
    check_urls: bool = True
    """Probe ``rollout.urls`` and the teacher's URLs from here before submitting (off: addresses only
    compute nodes reach)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if not 0 <= self.rollout_nodes < self.nodes:
            raise ValueError(f"--rollout-nodes {self.rollout_nodes} must leave a trainer node among --nodes "
                             f"{self.nodes} (0 .. {self.nodes - 1})")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        for name in ("ntasks_per_node", "cpus_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        self._check_names()
        limit = slurm_time_seconds(self.time)
        if not 0 < self.signal_lead_s <= MAX_SIGNAL_LEAD_S:
            raise ValueError(f"--signal-lead {self.signal_lead_s} must be in 1..{MAX_SIGNAL_LEAD_S} seconds")
        if limit is not None and self.signal_lead_s >= limit:
            raise ValueError(f"--signal-lead {self.signal_lead_s}s is not shorter than --time {self.time} "
                             f"({limit}s): the job would be told to stop before it starts")
        for mount in self.mounts:
            if re.fullmatch(r"[^\s,:]+(:[^\s,:]+)?(:[a-z+]+)?", mount) is None:
                raise ValueError(f"--mounts {mount!r} is not SRC[:DST[:FLAGS]] (no spaces or commas)")
        for item in self.env:
            name = item.split("=", 1)[0]
            if "=" not in item or not _ENV_NAME.fullmatch(name):
                raise ValueError(f"--env {item!r} is not KEY=VALUE with KEY a variable name")

    def _check_names(self) -> None:
        if self.partition and not re.fullmatch(rf"{_NAME}(,{_NAME})*", self.partition):
            raise ValueError(f"--partition {self.partition!r} is not a SLURM partition name (letters, digits, "
                             "'_', '-', '.', no spaces; a comma-separated list for several)")
        if self.account and not re.fullmatch(_NAME, self.account):
            raise ValueError(f"--account {self.account!r} is not a SLURM account name (letters, digits, "
                             "'_', '-', '.', no spaces)")
        if self.job_name and not re.fullmatch(_NAME, self.job_name):
            raise ValueError(f"--job-name {self.job_name!r} must be letters, digits, '_', '-', '.', no spaces")

    @property
    def trainer_nodes(self) -> int:
        return self.nodes - self.rollout_nodes

    @property
    def name(self) -> str:
        return self.job_name or "lcr-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(self.config).stem)
