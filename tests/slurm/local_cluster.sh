#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the `slurm`-marked tests.
#
#   tests/slurm/local_cluster.sh start    install (if missing), configure, start, wait for an idle node
#   tests/slurm/local_cluster.sh stop     cancel every job, stop slurmd, slurmctld and munged
#   tests/slurm/local_cluster.sh status   exit 0 when the node answers and is usable
#
# Needs root (it installs Debian packages and starts system daemons). It never overwrites a
# slurm.conf it did not write: a machine that is already a SLURM node is left alone.
# Knobs: SLURM_LOCAL_CPUS (default 2), SLURM_LOCAL_STATE (default /var/spool/synergy-slurm).
set -euo pipefail

CPUS="${SLURM_LOCAL_CPUS:-2}"
STATE_DIR="${SLURM_LOCAL_STATE:-/var/spool/synergy-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by synergy-dist tests/slurm/local_cluster.sh"
NODE="$(hostname -s)"

log() { echo "[local_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "SLURM is missing (${missing[*]}) and apt-get is not available to install it"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real SLURM setup"
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/d" "$STATE_DIR/log"
    # The smallest configuration that runs batch jobs, steps, arrays and requeues: no cgroups
    # (containers rarely allow them), no accounting database, daemons running as root.
    cat > "$CONF" <<EOF
$MARKER
ClusterName=synergy-local
SlurmctldHost=$NODE
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for a while (there is no accounting database).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL on scancel and at a time limit: time for the trainer to checkpoint.
KillWait=30
# No grace past a job's time limit (the default, stated for the time-limit test). SLURM checks limits and
# sends --signal warnings from a 30 s timer (compiled in), so a warning may come up to a minute early.
OverTimeLimit=0
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if pid_alive /run/munge/munged.pid; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_slurm() {
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        # -c: forget jobs of an earlier run, so a test cluster always starts empty.
        slurmctld -c
    fi
    if ! pid_alive "$STATE_DIR/slurmd.pid"; then
        slurmd
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(node_state)"
        case "$state" in
            idle) log "node $NODE is idle"; return 0 ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE did not become idle (last state: '${state:-none}'); logs in $STATE_DIR/log/"
}

stop_all() {
    if command -v scancel >/dev/null && pid_alive "$STATE_DIR/slurmctld.pid"; then
        scancel --full --quiet --user=root 2>/dev/null || true
        scancel --quiet --state=PENDING --user=root 2>/dev/null || true
        # Give running jobs a moment to leave before the daemons go.
        for _ in $(seq 40); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    local pidfile
    for pidfile in "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid" /run/munge/munged.pid; do
        if pid_alive "$pidfile"; then
            local pid; pid="$(cat "$pidfile")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    log "stopped"
}

case "${1:-start}" in
    start)
        [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts system daemons)"
        install_packages
        write_config
        start_munge
        start_slurm
        wait_idle
        ;;
    stop) stop_all ;;
    status)
        command -v sinfo >/dev/null || exit 1
        [ "$(node_state)" = idle ] || [ "$(node_state)" = mixed ] || [ "$(node_state)" = allocated ]
        ;;
    *) die "unknown command '$1' (use start, stop or status)" ;;
esac
