"""The sbatch script of an ``lcr launch slurm`` job: readable, self-contained, resubmittable as it is.

Layout of the job (the ideas of the static script it replaces, examples/slurm/):

- one task per node. The first ``trainer_nodes`` nodes run ``torchrun`` (static rendezvous on the first
  of them: its node rank is the step's ``SLURM_NODEID``; rank 0, the rendezvous store and the weight
  update group all live there). The last ``rollout_nodes`` nodes run ``lcr rollout-servers``, which
  writes its servers' URLs once they all answer; the trainer starts after that, with ``rollout.urls``
  set to them and ``rollout.sync.master_address`` set to the first trainer node (the engines connect to
  it; a loopback address would point them at themselves). Node addresses are SLURM's NodeAddr.
- one log per role under ``OUT/slurm/``: ``job-<id>.log`` (this script), ``trainer-<id>-node<k>.log``,
  ``rollout-<id>-<node>.log``; the servers' own logs in ``OUT/rollout_logs/<node>/``; a preemption's
  record as ``preempted-<id>-<restart>.json``.
- preemption: ``--signal=B:USR1@LEAD`` warns the batch shell; it writes the request file the trainer
  polls at every step boundary (``train/preemption.py`` says why a file and not the signal), waits for
  the checkpoint, and requeues the job (``--requeue``); the requeued job runs this script again and
  ``lcr train`` resumes from the newest checkpoint. SIGTERM (SLURM's preemption, ``scancel``) reaches the
  trainer's processes directly: they checkpoint the same way within the grace time, and SLURM's
  preemption mode decides about requeueing (the script requeues only on its own warning).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from megatron_lcr import __version__
from megatron_lcr.launch.config import SlurmLaunchConfig
from megatron_lcr.launch.plan import JobPlan
from megatron_lcr.parallel.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from megatron_lcr.train.preemption import RECORD_NAME, REQUEST_ENV

SCRIPT_NAME = "job.sbatch"
LOG_DIR = "slurm"


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _array(values: list[str]) -> str:
    return "(" + " ".join(_q(v) for v in values) + ")"


def launch_command(launch: SlurmLaunchConfig) -> str:
    """The ``lcr launch slurm`` command line that writes this script again."""
    args = ["lcr", "launch", "slurm", launch.config, "--out", launch.out, "--nodes", str(launch.nodes),
            "--gpus-per-node", str(launch.gpus_per_node)]
    for flag, value in (("--ntasks-per-node", launch.ntasks_per_node), ("--cpus-per-node", launch.cpus_per_node),
                        ("--rollout-nodes", launch.rollout_nodes or None), ("--partition", launch.partition),
                        ("--account", launch.account), ("--time", launch.time), ("--job-name", launch.job_name),
                        ("--container", launch.container), ("--signal-lead", launch.signal_lead_s),
                        ("--python", launch.python)):
        if value:
            args += [flag, str(value)]
    if launch.mounts:
        args += ["--mounts", ",".join(launch.mounts)]
    for item in launch.env:
        args += ["--env", item]
    return " ".join(_q(a) for a in [*args, *launch.overrides])


def _header(launch: SlurmLaunchConfig, plan: JobPlan, out: Path) -> list[str]:
    gpus = launch.gpus_per_node
    lines = [
        "#!/bin/bash",
        f"# lcr train on SLURM, written by `lcr launch slurm` (megatron_lcr {__version__}). Regenerate in {Path.cwd()} with:",
        f"#   {launch_command(launch)}",
        f"# Resubmit as it is: sbatch {out / LOG_DIR / SCRIPT_NAME}  (the run resumes from its newest checkpoint)",
        "#",
        "# Checked before it was written:",
        *(f"#   {line}" for line in plan.summary().splitlines()),
        "#",
        f"# Logs, one per role, in {out / LOG_DIR}/:",
        "#   job-ID.log            this script: nodes, rollout URLs, preemption, requeue",
        "#   trainer-ID-nodeK.log  torchrun and the trainer's ranks on trainer node K",
        "#   rollout-ID-NODE.log   lcr rollout-servers on rollout node NODE (the servers' own logs: rollout_logs/NODE/)",
        f"# Preemption: SLURM sends SIGUSR1 to this shell {launch.signal_lead_s} s before the time limit. The trainer",
        f"# finishes its step, saves a checkpoint and writes {RECORD_NAME}; this script requeues the job, which resumes.",
        f"#SBATCH --job-name={launch.name}",
        f"#SBATCH --nodes={launch.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={plan.cpus_per_node}",
    ]
    if gpus:
        lines += [f"#SBATCH --gpus-per-node={gpus}", "#SBATCH --exclusive", "#SBATCH --mem=0"]
    if launch.partition:
        lines.append(f"#SBATCH --partition={launch.partition}")
    if launch.account:
        lines.append(f"#SBATCH --account={launch.account}")
    lines += [
        f"#SBATCH --time={launch.time}",
        f"#SBATCH --output={out / LOG_DIR}/job-%j.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{launch.signal_lead_s}",
    ]
    return lines


def _settings(launch: SlurmLaunchConfig, plan: JobPlan, out: Path) -> list[str]:
    python = launch.python or ("python" if launch.container else sys.executable)
    gpus = launch.gpus_per_node
    threads = max(1, plan.cpus_per_node // max(1, plan.procs_per_node))
    lines = [
        "",
        "set -eo pipefail",
        f"cd {_q(Path.cwd())}  # relative paths in the config are relative to where the job was launched",
        "",
        f"CONFIG={_q(Path(launch.config).absolute())}",
        f"OUT={_q(out)}",
        f"OVERRIDES={_array(launch.overrides)}",
        f"PY={_q(python)}",
        f"TRAINER_NODES={plan.trainer_nodes}",
        f"ROLLOUT_NODES={plan.rollout_nodes}",
        f"PROCS_PER_NODE={plan.procs_per_node}  # trainer processes per trainer node",
        f"LOGS=\"$OUT\"/{LOG_DIR}",
        f"export {REQUEST_ENV}=\"$LOGS/preempt_request\"  # written on SIGUSR1; the trainer polls it",
        "",
        "# Every task's environment.",
        "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}  # the node's CPUs over its processes",
    ]
    if gpus:
        lines += [
            "# Megatron overlaps tensor/sequence-parallel communication with compute in kernel issue order.",
            "export CUDA_DEVICE_MAX_CONNECTIONS=1",
            "# A failed or stuck collective ends the job (then requeue by hand) instead of hanging it.",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        ]
    lines += [
        "# torchrun passes SIGUSR1 on to its ranks too (torch >= 2.8 reads these; older ones ignore them) and",
        "# gives them the warning's lead time to checkpoint before it kills them.",
        "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={launch.signal_lead_s}",
        *(f"export {item.split('=', 1)[0]}={_q(item.split('=', 1)[1])}" for item in launch.env),
    ]
    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
            f"--cpus-per-task={plan.cpus_per_node}", "--open-mode=append"]
    if gpus:
        srun.append(f"--gpus-per-node={gpus}")
    if launch.container:
        srun += [f"--container-image={launch.container}", "--container-workdir=$PWD"]
        if launch.mounts:
            srun.append(f"--container-mounts={','.join(launch.mounts)}")
    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): every step names its own.
    lines += ["", "SRUN=(" + " ".join(s if "$" in s else _q(s) for s in srun) + ")"]
    return lines


_BODY = r"""
log() { echo "[$(date +%Y-%m-%dT%H:%M:%S)] $*"; }

mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${#HOSTS[@]} != TRAINER_NODES + ROLLOUT_NODES )); then
    log "got ${#HOSTS[@]} node(s), need $TRAINER_NODES trainer + $ROLLOUT_NODES rollout"; exit 1
fi
TRAIN_HOSTS=("${HOSTS[@]:0:TRAINER_NODES}")
ROLLOUT_HOSTS=("${HOSTS[@]:TRAINER_NODES}")
# A node's address as SLURM reaches it (NodeAddr; on most clusters the node's name itself).
node_addr() {
    local addr
    addr=$(scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    echo "${addr:-$1}"
}
# Rank 0 and the rendezvous store run on the first trainer node; so does the weight-update group.
MASTER_ADDR=$(node_addr "${HOSTS[0]}")
MASTER_PORT=$((PORT_BASE + SLURM_JOB_ID % PORT_SPAN))
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): trainer ${TRAIN_HOSTS[*]}, rollout ${ROLLOUT_HOSTS[*]:-none}"

WARNED=0
STEP_PIDS=()
on_usr1() {
    WARNED=1
    log "SIGUSR1 (time limit ahead): asking the trainer to checkpoint after its current step"
    echo "SIGUSR1 $(date +%s)" > "$LCR_PREEMPT_REQUEST.tmp" && mv "$LCR_PREEMPT_REQUEST.tmp" "$LCR_PREEMPT_REQUEST"
}
on_term() { log "SIGTERM: the trainer checkpoints after its current step if the grace time allows"; }
stop_steps() { if ((${#STEP_PIDS[@]})); then kill "${STEP_PIDS[@]}" 2>/dev/null || true; wait || true; fi; }
trap on_usr1 USR1
trap on_term TERM
trap stop_steps EXIT
mkdir -p "$LOGS"
rm -f "$LCR_PREEMPT_REQUEST" "$OUT/PREEMPT_RECORD"

TRAIN_ARGS=()
if (( ROLLOUT_NODES > 0 )); then
    URLS_DIR="$LOGS/rollout_urls"
    rm -rf "$URLS_DIR" && mkdir -p "$URLS_DIR"
    for host in "${ROLLOUT_HOSTS[@]}"; do
        "${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$host" --output="$LOGS/rollout-%j-$host.log" \
            "$PY" -m megatron_lcr.cli rollout-servers --urls-file "$URLS_DIR/$host" --advertise "$(node_addr "$host")" \
            --log-dir "$OUT/rollout_logs/$host" "$CONFIG" "${OVERRIDES[@]}" &
        STEP_PIDS+=($!)
    done
    # The servers write their URLs once every one of them answers (or their step fails).
    for host in "${ROLLOUT_HOSTS[@]}"; do
        until [ -s "$URLS_DIR/$host" ]; do
            for pid in "${STEP_PIDS[@]}"; do
                kill -0 "$pid" 2>/dev/null || { log "rollout servers failed: see $LOGS/rollout-$SLURM_JOB_ID-*.log"; exit 1; }
            done
            sleep 5
        done
    done
    URLS=$(cat "$URLS_DIR"/* | paste -sd, -)
    log "rollout servers ready: $URLS"
    TRAIN_ARGS=("rollout.urls=[$URLS]" "rollout.sync.master_address=$MASTER_ADDR")
fi

log "trainer: torchrun x $PROCS_PER_NODE on ${TRAIN_HOSTS[*]}, rendezvous $MASTER_ADDR:$MASTER_PORT"
# Static rendezvous: SLURM_NODEID numbers the step's nodes in the order of TRAIN_HOSTS, so node 0 is MASTER_ADDR.
# One log per trainer node: %t is the task, here the node's rank.
"${SRUN[@]}" --nodes="$TRAINER_NODES" --ntasks="$TRAINER_NODES" --nodelist="$(IFS=,; echo "${TRAIN_HOSTS[*]}")" \
    --output="$LOGS/trainer-%j-node%t.log" \
    bash -c 'exec "$0" -m torch.distributed.run --nnodes="$1" --nproc-per-node="$2" --node-rank="$SLURM_NODEID" \
                 --master-addr="$3" --master-port="$4" -m megatron_lcr.cli train "${@:5}"' \
    "$PY" "$TRAINER_NODES" "$PROCS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
    "$CONFIG" --out "$OUT" "${OVERRIDES[@]}" "${TRAIN_ARGS[@]}" &
TRAIN_PID=$!
STEP_PIDS+=("$TRAIN_PID")
# A trapped signal ends `wait` early (status 128+N): wait again until the trainer step is gone.
while :; do
    wait "$TRAIN_PID" && status=0 || status=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break
done
wait "$TRAIN_PID" && status=0 || status=$?  # its own status, not an interrupted wait's

if (( status == 0 )); then
    log "trainer finished: $OUT/results.json"
    exit 0
fi
if (( WARNED )) && [ -f "$OUT/PREEMPT_RECORD" ]; then
    log "trainer checkpointed ($(tr -d '\n ' < "$OUT/PREEMPT_RECORD")); requeueing"
    mv "$OUT/PREEMPT_RECORD" "$LOGS/preempted-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.json"  # kept: the run's history
    stop_steps
    STEP_PIDS=()
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
log "trainer failed (exit $status): see $LOGS/trainer-$SLURM_JOB_ID-*.log"
exit "$status"
"""


def render_sbatch(launch: SlurmLaunchConfig, plan: JobPlan) -> str:
    """The whole script for ``launch`` as checked by ``plan``."""
    out = Path(launch.out).absolute()
    body = (_BODY.replace("PORT_BASE", str(SLURM_PORT_BASE)).replace("PORT_SPAN", str(SLURM_PORT_SPAN))
            .replace("PREEMPT_RECORD", RECORD_NAME))
    return "\n".join(_header(launch, plan, out) + _settings(launch, plan, out)) + "\n" + body
