#!/usr/bin/env bash
# A SLURM cluster on this one machine, for the `slurm` tests and for trying `lcr launch slurm`.
#
#   bash tools/slurm_local.sh install   # Debian: apt-get install slurmctld slurmd slurm-client munge (root)
#   bash tools/slurm_local.sh start     # write slurm.conf, start munged, slurmctld, slurmd; wait for the nodes
#   bash tools/slurm_local.sh status    # exit 0 if the cluster answers and all its nodes are up
#   bash tools/slurm_local.sh stop      # stop the SLURM daemons this script started (munged stays)
#   export SLURM_CONF=$(bash tools/slurm_local.sh conf)   # what sbatch/squeue/sinfo then talk to
#
# Everything lives under $LCR_SLURM_DIR (default /tmp/lcr_slurm): slurm.conf, state, spool, pid files
# and the daemons' logs; /etc is not touched (munge's key excepted: `mungekey` makes one if missing).
# $LCR_SLURM_NODES SLURM nodes (default 3), all on this host: one slurmd each (`slurmd -N NAME` on a
# port of its own), named HOST-1, HOST-2, ... and reached at this host's name. Jobs then span several
# nodes (torchrun's rendezvous across nodes, rollout servers on a node of their own) on one machine;
# with LCR_SLURM_NODES=1 the one node is this host under its own name. Every node has this machine's
# CPU count and a share of its memory, no GPUs (no gres); partition $LCR_SLURM_PARTITION (default
# `debug`). No cgroups: processes are tracked through /proc (proctrack/linuxproc) and not bound
# (task/none), so it runs in containers. Needs root (munged runs as user munge, slurmd as root).
# `start` is idempotent: a cluster that answers with all its nodes up is left as it is. Output: one line
# saying what happened; on failure the reason and the tail of the daemon's log, exit status 1.
set -euo pipefail

DIR=${LCR_SLURM_DIR:-/tmp/lcr_slurm}
CONF=$DIR/slurm.conf
PARTITION=${LCR_SLURM_PARTITION:-debug}
NODES=${LCR_SLURM_NODES:-3}
SLURMD_PORT=${LCR_SLURMD_PORT:-6818}
# Seconds to wait for the nodes to turn idle after the daemons start.
WAIT_S=${LCR_SLURM_WAIT_S:-60}
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)

die() {
    echo "slurm_local: $*" >&2
    exit 1
}

node_names() {
    if ((NODES == 1)); then echo "$HOST"; else seq -f "$HOST-%g" 1 "$NODES"; fi
}

install_packages() {
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    command -v apt-get >/dev/null || die "install needs apt-get (Debian/Ubuntu)"
    mkdir -p "$DIR"
    export DEBIAN_FRONTEND=noninteractive
    # Debian 12 ships SLURM 22.05 as these packages (slurm-wlm is a meta package that pulls in more).
    # A machine that never ran `apt-get update` has no package lists: update once and retry.
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" </dev/null >"$DIR/apt.log" 2>&1 \
        || { apt-get update </dev/null >>"$DIR/apt.log" 2>&1 \
             && apt-get install -y --no-install-recommends "${PACKAGES[@]}" </dev/null >>"$DIR/apt.log" 2>&1; } \
        || die "apt-get install ${PACKAGES[*]} failed: $(tail -n 3 "$DIR/apt.log" | tr '\n' ' ')"
    echo "slurm_local: installed SLURM $(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null)"
}

write_conf() {
    local cpus mem_mb name port=$SLURMD_PORT
    cpus=$(nproc --all)
    # RealMemory a little under each node's share: slurmd drains a node that reports less than configured.
    mem_mb=$(awk -v n="$NODES" '/^MemTotal:/ {print int($2 / 1024 * 0.95 / n)}' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/log"
    {
        echo "# Written by tools/slurm_local.sh: a test cluster on one host (no cgroups, no GPUs, no accounting)."
        echo "ClusterName=lcr-local"
        echo "SlurmctldHost=$HOST"
        echo "SlurmctldPort=${LCR_SLURMCTLD_PORT:-6817}"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "# A requeued job waits cred_expire seconds before it may start again (default 120): short here, so"
        echo "# the preemption test does not idle for two minutes. Job-step credentials live as long."
        echo "AuthInfo=cred_expire=${LCR_SLURM_CRED_EXPIRE_S:-15}"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool-%n"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=sched_interval=2"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "# Seconds between SIGTERM and SIGKILL when a job ends early (cancel, requeue, time limit)."
        echo "KillWait=30"
        echo "# Finished jobs stay visible to scontrol this long (seconds): the tests read their restart count."
        echo "MinJobAge=600"
        for name in $(node_names); do
            echo "NodeName=$name NodeHostname=$HOST NodeAddr=$HOST Port=$port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            port=$((port + 1))
        done
        echo "PartitionName=$PARTITION Nodes=$(node_names | paste -sd, -) Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

answers() {
    local up
    up=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated|completing)') \
        || true
    [ "${up:-0}" -ge "$NODES" ]
}

pid_alive() {
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [ -s /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || die "mungekey --create failed"
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged >"$DIR/log/munged.out" 2>&1 \
        || die "munged did not start: $(tr '\n' ' ' <"$DIR/log/munged.out") $(tail -n 3 /var/log/munge/munged.log 2>/dev/null | tr '\n' ' ')"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged started but does not answer (see /var/log/munge/munged.log)"
}

start() {
    [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs as root, munged as user munge)"
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] \
            || die "$cmd is not installed (bash tools/slurm_local.sh install)"
    done
    mkdir -p "$DIR"
    if [ -f "$CONF" ] && answers; then
        echo "slurm_local: already running (SLURM_CONF=$CONF, $NODES node(s), partition $PARTITION)"
        return
    fi
    stop_daemons
    write_conf
    mkdir -p "$DIR/log"
    start_munge
    export SLURM_CONF=$CONF
    /usr/sbin/slurmctld -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 \
        || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
    local name
    for name in $(node_names); do
        /usr/sbin/slurmd -f "$CONF" -N "$name" >"$DIR/log/slurmd-$name.out" 2>&1 \
            || die "slurmd $name did not start: $(tail -n 5 "$DIR/log/slurmd-$name.log" 2>/dev/null | tr '\n' ' ')"
    done
    local deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        if answers; then
            echo "slurm_local: running (SLURM_CONF=$CONF, nodes $(node_names | paste -sd, -) on $HOST," \
                 "$(nproc --all) CPUs each, partition $PARTITION)"
            return
        fi
        # A node that registered in a bad state (e.g. left down by an earlier run) is brought back.
        for name in $(node_names); do scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true; done
        sleep 1
    done
    die "nodes not idle after ${WAIT_S}s: $(sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ' ') slurmctld:" \
        "$(tail -n 3 "$DIR/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        [ -e "$pidfile" ] || continue
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop_daemons; echo "slurm_local: stopped" ;;
    status) { [ -f "$CONF" ] && answers; } || die "not running with $NODES node(s) up (SLURM_CONF=$CONF)"
            echo "slurm_local: running (SLURM_CONF=$CONF)" ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 install|start|status|stop|conf" >&2; exit 2 ;;
esac
