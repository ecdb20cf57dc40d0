"""Check an ``lcr launch slurm`` job against its run config before anything is written or submitted.

What a job that passes here cannot fail on at start-up any more, each as a one-line error:

- the trainer's GPUs (trainer nodes x processes per node) fit the TP/PP/CP layout (``validate_layout``:
  a multiple of tp x pp x cp, and of tp x ep x pp) and the model's dimensions when its config.json is
  readable from here; the same for a Megatron teacher, on the student's layout or on its own
  (``distill.teacher.tensor_parallel_size`` / ``pipeline_parallel_size``);
- rollout nodes have the GPUs their servers need (num_servers x tp_size, or gpu_ids), no more, no fewer;
- servers rank 0 launches on node 0 (rollout servers without rollout nodes, teacher servers) use GPUs
  that exist and no trainer process uses (``parallel/placement.py``'s checks, on the job's numbers);
- servers given by URL (``rollout.urls``, ``distill.teacher.engine.urls``) answer ``/health``.

GPU decisions are made for the job's nodes, not for this (login) node: a server with ``device: auto``
counts as a GPU server when the job's nodes have GPUs.
"""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_lcr.launch.config import SlurmLaunchConfig
from megatron_lcr.models.megatron_checkpoint import config_dir
from megatron_lcr.parallel.layout import ModelDims, validate_layout
from megatron_lcr.parallel.placement import check_rollout_placement, check_teacher_placement
from megatron_lcr.rollout.sglang import SGLangLaunchConfig

# /health probe of a server given by URL (seconds): it answers at once when it is up.
PROBE_TIMEOUT_S = 3.0
# CPUs per GPU when --cpus-per-node is not given (data loading, the CPU side of each rank).
CPUS_PER_GPU = 8


class LaunchError(ValueError):
    """A job that cannot run as asked; one line naming the flag or config key."""


@dataclass(frozen=True, kw_only=True)
class JobPlan:
    """What the job will run where: the numbers the sbatch script is written from."""

    trainer_nodes: int
    """Nodes running torchrun (the first ones of the allocation)."""
    procs_per_node: int
    """Trainer processes per trainer node."""
    world_size: int
    """Trainer processes in all."""
    data_parallel_size: int
    """world_size / (tp x pp x cp)."""
    layout: str
    """TP/PP/CP/DP, as the summary prints it."""
    rollout_nodes: int
    """Nodes running ``lcr rollout-servers`` (the last ones)."""
    rollout: str
    """Where the rollout servers run, in words."""
    cpus_per_node: int
    """CPUs of each node's one task."""
    rollout_startup_s: float
    """How long a rollout node's servers may take to come up (rollout.server.startup_timeout_s)."""
    notes: tuple[str, ...] = ()
    """What could not be checked from here."""

    def summary(self) -> str:
        lines = [f"trainer: {self.trainer_nodes} node(s) x {self.procs_per_node} process(es) = {self.world_size} "
                 f"ranks, {self.layout}", f"rollout: {self.rollout}"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def _dims(hf_dir: str) -> ModelDims | None:
    """The model dimensions of a Hugging Face directory, or None when its config.json is not here."""
    if not hf_dir or not (Path(hf_dir) / "config.json").is_file():
        return None
    from megatron_lcr.models.families import hf_arch, model_dims
    from megatron_lcr.models.hf_checkpoint import load_hf_config

    return model_dims(hf_arch(load_hf_config(hf_dir)))


def _on_nodes(server: SGLangLaunchConfig, gpus_per_node: int) -> bool:
    """Whether ``server`` runs on GPUs on the job's nodes (device 'auto' follows the nodes, not us)."""
    if server.backend == "reference" or server.device == "cpu":
        return False
    if server.device == "cuda" and gpus_per_node == 0:
        raise LaunchError(f"the {server.backend} servers have device 'cuda' but --gpus-per-node is 0")
    return gpus_per_node > 0


def _server_gpus(server: SGLangLaunchConfig) -> list[int]:
    return list(server.gpu_ids) or list(range(server.num_servers * server.tp_size))


def _check_url(url: str, key: str, api_key: str | None) -> None:
    request = urllib.request.Request(url.rstrip("/") + "/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered: the server is up, whatever it thinks of the probe
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LaunchError(f"{key}: {url} does not answer /health ({reason}); start it first, drop it, or pass "
                          "--no-check-urls if only the compute nodes reach it") from None


def _check_layout(parallel, world: int, dims: ModelDims | None, seq_length: int, what: str, gpus: str) -> int:
    try:
        return validate_layout(parallel, world_size=world, dims=dims, seq_length=seq_length)
    except ValueError as err:
        raise LaunchError(f"{gpus} for the {what}: {err}") from None


def _procs_per_node(launch: SlurmLaunchConfig, node0_servers: list[int]) -> int:
    if launch.ntasks_per_node is not None:
        return launch.ntasks_per_node
    if launch.gpus_per_node == 0:
        return 1
    free = launch.gpus_per_node - len(set(node0_servers))
    if free < 1:
        raise LaunchError(f"the servers rank 0 launches take GPUs {sorted(set(node0_servers))}: no GPU of "
                          f"--gpus-per-node {launch.gpus_per_node} is left for a trainer process")
    return free


def _rollout_node_servers(launch: SlurmLaunchConfig, run) -> str:
    """Checks rollout nodes' servers against their GPUs; returns where they run, in words."""
    server, sync = run.rollout.server, run.rollout.sync
    if run.rollout.urls:
        raise LaunchError(f"--rollout-nodes {launch.rollout_nodes} starts servers, but rollout.urls already names "
                          f"{len(run.rollout.urls)}: use one or the other")
    if sync.mode == "tensor":
        raise LaunchError("rollout.sync.mode 'tensor' hands over CUDA IPC handles, which servers on rollout nodes "
                          "cannot open: use 'distributed' or 'disk' with --rollout-nodes")
    count = f"{server.num_servers} {server.backend} server(s) x tp_size {server.tp_size}"
    if launch.gpus_per_node == 0 and sync.backend == "nccl":
        raise LaunchError("rollout.sync.backend 'nccl' needs GPUs, but --gpus-per-node is 0: use 'gloo' (or leave it "
                          "unset)")
    if not _on_nodes(server, launch.gpus_per_node):
        return f"{launch.rollout_nodes} node(s) of their own, {count} on CPU each"
    gpus = _server_gpus(server)
    if len(gpus) != launch.gpus_per_node or max(gpus) >= launch.gpus_per_node:
        raise LaunchError(f"rollout.server needs GPUs {gpus} on each rollout node ({count}), but the nodes have "
                          f"--gpus-per-node {launch.gpus_per_node}: make them use every GPU (num_servers x "
                          "tp_size, or gpu_ids), no more and no fewer")
    return f"{launch.rollout_nodes} node(s) of their own, {count} each"


def _teacher_plan(run, launch: SlurmLaunchConfig) -> tuple[list[int], bool, list[str]]:
    """(node 0 GPUs of teacher servers rank 0 launches, whether a Megatron teacher runs in the job,
    teacher URLs to probe)."""
    from megatron_lcr.train.rl.objectives import build_objective
    from megatron_lcr.train.rl.teacher import _scores, teacher_server_gpus  # the trainer's own rules

    needs = build_objective(run).needs
    teacher = run.distill.teacher
    server = teacher.engine.server
    device = "cuda" if _on_nodes(server, launch.gpus_per_node) else "cpu"
    if server.backend != "reference":
        server = dataclasses.replace(server, device=device)
    on_nodes = dataclasses.replace(run, distill=dataclasses.replace(
        run.distill, teacher=dataclasses.replace(teacher, engine=dataclasses.replace(teacher.engine, server=server))))
    gpus = teacher_server_gpus(on_nodes, needs)
    scores = _scores(needs)
    megatron = scores and teacher.scorer == "megatron"
    uses_urls = needs.teacher_rollouts or (scores and teacher.scorer == "engine")
    return gpus, megatron, list(teacher.engine.urls) if uses_urls else []


def plan_job(launch: SlurmLaunchConfig, run) -> JobPlan:
    """Check ``launch`` against ``run`` (an ``RLRunConfig``); the plan the script is written from."""
    notes = []
    if launch.rollout_nodes:
        rollout, node0_rollout = _rollout_node_servers(launch, run), []
    elif run.rollout.urls:
        rollout, node0_rollout = f"given by rollout.urls ({len(run.rollout.urls)} server(s))", []
    else:
        on_gpus = _on_nodes(run.rollout.server, launch.gpus_per_node)
        node0_rollout = run.rollout.launched_gpus(on_gpus=on_gpus)
        where = f"GPUs {node0_rollout} of node 0" if node0_rollout else "CPU of node 0"
        rollout = f"launched by trainer rank 0 on {where}"
    teacher_gpus, megatron_teacher, teacher_urls = _teacher_plan(run, launch)
    for gpu in node0_rollout + teacher_gpus:
        if gpu >= launch.gpus_per_node:
            raise LaunchError(f"a server rank 0 launches on node 0 uses GPU {gpu}, but --gpus-per-node is "
                              f"{launch.gpus_per_node}")
    procs = _procs_per_node(launch, node0_rollout + teacher_gpus)
    trainer_gpus = list(range(procs)) if launch.gpus_per_node else []
    if launch.gpus_per_node and procs > launch.gpus_per_node:
        raise LaunchError(f"--ntasks-per-node {procs} trainer processes need one GPU each, but --gpus-per-node is "
                          f"{launch.gpus_per_node}")
    try:
        check_rollout_placement(trainer_gpus=trainer_gpus, rollout_gpus=node0_rollout, sync_mode=run.rollout.sync.mode)
        check_teacher_placement(trainer_gpus=trainer_gpus, rollout_gpus=node0_rollout, teacher_gpus=teacher_gpus)
    except ValueError as err:
        raise LaunchError(str(err)) from None

    world = launch.trainer_nodes * procs
    unit = "GPUs" if launch.gpus_per_node else "CPU processes"
    gpus = f"{launch.trainer_nodes} trainer node(s) x {procs} = {world} {unit}"
    seq = run.trainer.token_budget
    model_dir = str(config_dir(run.model.hf_path, run.trainer.load))
    dims = _dims(model_dir)
    if dims is None:
        notes.append(f"model dimensions not checked: {model_dir}/config.json is not readable here")
    dp = _check_layout(run.parallel, world, dims, seq, "policy", gpus)
    if megatron_teacher:
        teacher = run.distill.teacher
        teacher_dims = _dims(teacher.hf_dir)
        if teacher_dims is None:
            notes.append(f"teacher dimensions not checked: {teacher.hf_dir}/config.json is not readable here")
        own = teacher.own_layout
        what = "Megatron teacher (its own layout)" if own else "Megatron teacher (the student's layout)"
        _check_layout(own or run.parallel, world, teacher_dims, seq, what, gpus)
    if launch.check_urls:
        for url in run.rollout.urls:
            _check_url(url, "rollout.urls", run.rollout.server.api_key)
        for url in teacher_urls:
            _check_url(url, "distill.teacher.engine.urls", run.distill.teacher.engine.server.api_key)
    par = run.parallel
    layout = (f"TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
              f"CP={par.context_parallel_size} DP={dp}")
    cpus = launch.cpus_per_node or (CPUS_PER_GPU * launch.gpus_per_node if launch.gpus_per_node else procs)
    return JobPlan(trainer_nodes=launch.trainer_nodes, procs_per_node=procs, world_size=world, data_parallel_size=dp,
                   layout=layout, rollout_nodes=launch.rollout_nodes, rollout=rollout, cpus_per_node=cpus,
                   rollout_startup_s=run.rollout.server.startup_timeout_s, notes=tuple(notes))
