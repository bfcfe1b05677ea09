#!/usr/bin/env bash
# Pretrain a SynergyLM on a SLURM cluster:  sbatch slurm/pretrain.sh [dotted overrides...]
#
# Every #SBATCH line below can be overridden on the sbatch command line, e.g.
#   sbatch --nodes=4 --time=48:00:00 --partition=gpu slurm/pretrain.sh train.max_steps=100000
# and the script reads these environment variables (sbatch exports your environment):
#   CONFIG          trainer YAML (default configs/tiny-cpu.yaml)
#   RUN_DIR         run directory: checkpoints, metrics.jsonl, logs/ (default runs/<job name>-<job id>)
#   LAUNCHER        srun (one task per GPU, default) | deepspeed (deepspeed launcher, one per node)
#   GPUS_PER_NODE   GPUs per node; 0 = CPU + gloo (default: what SLURM allocated)
#   MAX_RESTARTS    requeues allowed before giving up (default 20)
#   TRAIN_CMD       trainer executable (default: synergy-train found on PATH)
#   MASTER_PORT     rendezvous port (default: derived from the job id)
#   TASK_EXIT_WAIT  seconds srun gives the other ranks once one rank ended, then kills them (default 60)
# Dotted overrides can also come from OVERRIDES="a.b=1 c.d=2". See docs/CLUSTER.md.
#
# CPU variant of the same template (gloo backend, e.g. for testing the whole path):
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/pretrain.sh
#
#SBATCH --job-name=synergy-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
# Ask SLURM for USR1 to this batch shell 5 minutes before the time limit; the trainer then
# checkpoints and exits 75, and this script requeues the job (also on 76, a hung step).
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
# Append: a requeued job keeps the same log files, and truncating them would lose earlier attempts.
#SBATCH --open-mode=append
# stdout and stderr of this script (a copy also goes to $RUN_DIR/logs/slurm-<job id>.log).
#SBATCH --output=%x-%j.out
# Site-specific knobs: uncomment and fill in.
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --exclusive
set -euo pipefail

# The trainer's "I checkpointed on a signal, requeue me" status and its watchdog's "a step hung, my
# stacks are in the log" status (synergy_dist/train/distributed.py); both are requeued.
readonly REQUEUE_EXIT_CODE=75
readonly WATCHDOG_EXIT_CODE=76

die() { echo "pretrain.sh: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job; submit it with: sbatch slurm/pretrain.sh"
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG="${CONFIG:-configs/tiny-cpu.yaml}"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-synergy}-${SLURM_JOB_ID}}"
LAUNCHER="${LAUNCHER:-srun}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
TRAIN_CMD="${TRAIN_CMD:-synergy-train}"

[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist (set CONFIG to a trainer YAML, e.g. CONFIG=configs/tiny-cpu.yaml)"
TRAIN_EXE="$(command -v "$TRAIN_CMD")" \
    || die "TRAIN_CMD=$TRAIN_CMD is not on PATH (activate the virtualenv before sbatch, or set TRAIN_CMD to its full path)"
mkdir -p "$RUN_DIR/logs"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
# Everything this script and the trainer print also goes to the run directory. The tee ignores
# the signals SLURM sends the whole job, so it outlives this script's last words.
exec > >(trap '' TERM INT USR1; exec tee -a "$RUN_DIR/logs/slurm-${SLURM_JOB_ID}.log") 2>&1

# GPUs per node: from --gpus-per-node (SLURM writes e.g. "8" or "h100:8"; keep the count), else
# from the GPU list of a --gres=gpu:N job, else none (CPU).
if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        GPUS_PER_NODE="${SLURM_GPUS_PER_NODE##*:}"
    elif [ -n "${SLURM_JOB_GPUS:-}" ]; then
        GPUS_PER_NODE="$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .)"
    else
        GPUS_PER_NODE=0
    fi
fi
case "$GPUS_PER_NODE" in ''|*[!0-9]*) die "GPUS_PER_NODE='$GPUS_PER_NODE' is not a number (0 = CPU)";; esac

# ---- rendezvous ------------------------------------------------------------------------------
NNODES="${SLURM_JOB_NUM_NODES:-1}"
# One process per GPU; on CPU one per task SLURM gave us on each node.
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    PROCS_PER_NODE="$GPUS_PER_NODE"
else
    PROCS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NNODES ))}"
    PROCS_PER_NODE="${PROCS_PER_NODE%%(*}"  # "2(x3)" -> "2"
fi
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
# Distinct per job (two jobs sharing a node) and per attempt (the old port may linger in TIME_WAIT),
# and below Linux's ephemeral range (32768+) so that no outgoing connection holds it.
export MASTER_PORT="${MASTER_PORT:-$(( 15000 + (SLURM_JOB_ID % 4000) * 4 + RESTARTS % 4 ))}"
WORLD_SIZE=$(( NNODES * PROCS_PER_NODE ))

# ---- runtime defaults (override by exporting them before sbatch) ----------------------------
export PYTHONUNBUFFERED=1
# One math thread pool per process sized to its CPUs; the default (all cores) oversubscribes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$CPUS_PER_TASK}"
if [ "$GPUS_PER_NODE" -eq 0 ]; then
    export DS_ACCELERATOR=cpu  # the trainer then uses the gloo backend
else
    # A rank that dies makes the others fail fast instead of hanging in a collective.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # Sites with several networks: pin NCCL to the fast one, e.g. NCCL_SOCKET_IFNAME=ib0 or
    # NCCL_IB_HCA=mlx5; leave unset to let NCCL choose.
fi

OVERRIDES_ARR=()
[ -n "${OVERRIDES:-}" ] && read -r -a OVERRIDES_ARR <<<"$OVERRIDES"
TRAIN_ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR" "${OVERRIDES_ARR[@]}" "$@")

echo "pretrain.sh: job $SLURM_JOB_ID attempt $((RESTARTS + 1)) on $SLURM_JOB_NODELIST:" \
     "$NNODES node(s) x $PROCS_PER_NODE process(es), launcher=$LAUNCHER," \
     "master=$MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR, $(date -u +%FT%TZ)"

# ---- signals ---------------------------------------------------------------------------------
# SLURM signals only this shell with --signal=B:USR1 (the time limit is near): pass it on to every
# rank through the launch step. SIGTERM comes from scancel or preemption, and SLURM signals the
# ranks itself then; forward it too, but leave the requeue decision to SLURM (see the end).
# A rank ignores USR1 until the trainer has installed its handler (see the launch below), and SLURM
# may signal up to a minute early, even while the ranks start: so USR1 is passed on again every
# RESIGNAL_S seconds until the launch ends (the trainer only sets a flag, however often it comes).
readonly RESIGNAL_S=15
LAUNCH_PID=""
SIGNALLED=""
INTERRUPTED=""
RESIGNALLER=""
forward() {
    SIGNALLED="$1"; INTERRUPTED=1
    echo "pretrain.sh: got SIG$1, asking the trainer to checkpoint and stop"
    if [ -n "$LAUNCH_PID" ]; then
        kill -s "$1" "$LAUNCH_PID" 2>/dev/null || true
        if [ "$1" = USR1 ] && [ -z "$RESIGNALLER" ]; then
            (trap - USR1 TERM; while sleep "$RESIGNAL_S" && kill -s USR1 "$LAUNCH_PID" 2>/dev/null; do :; done) &
            RESIGNALLER=$!
        fi
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# ---- launch ----------------------------------------------------------------------------------
# The launched tree ignores USR1 in its shell wrapper so that launcher processes (deepspeed's
# runner) survive it; the trainer installs its own handler, which overrides the inherited ignore.
# A rank that ends (killed, crashed, its watchdog fired) leaves the others at most TASK_EXIT_WAIT
# seconds: they usually end sooner by themselves (a collective with a dead peer fails, or times out
# after distributed.timeout_s; a hung step trips the watchdog), and srun kills what is left. Not
# --kill-on-bad-exit=1: it terminates the other ranks the moment one exits non-zero, also when
# every rank is about to exit 75 or 76 itself, and srun then reports 143 (measured), which would
# hide the requeue statuses.
case "$LAUNCHER" in
    srun)
        srun --ntasks-per-node="$PROCS_PER_NODE" --ntasks="$WORLD_SIZE" --cpus-per-task="$CPUS_PER_TASK" \
             --kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-60}" \
             bash -c 'trap "" USR1; exec "$@"' bash "$TRAIN_EXE" "${TRAIN_ARGS[@]}" &
        ;;
    deepspeed)
        HOSTFILE="$RUN_DIR/hostfile-${SLURM_JOB_ID}"
        scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$PROCS_PER_NODE" '{print $1 " slots=" slots}' > "$HOSTFILE"
        # One launcher per node, no ssh: each starts its node's ranks and knows its node rank.
        srun --ntasks-per-node=1 --ntasks="$NNODES" --cpus-per-task=$(( PROCS_PER_NODE * CPUS_PER_TASK )) \
             --kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-60}" \
             bash -c 'trap "" USR1; exec deepspeed --hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID" \
                        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${@:2}"' \
             bash "$HOSTFILE" "$TRAIN_EXE" "${TRAIN_ARGS[@]}" &
        ;;
    *) die "LAUNCHER=$LAUNCHER is not supported (use srun or deepspeed)";;
esac
LAUNCH_PID=$!
# A signal that came while the launch was being set up is delivered now.
if [ -n "$SIGNALLED" ]; then forward "$SIGNALLED"; fi

# `wait` returns early (status > 128) when a trapped signal arrives; then wait for srun again.
while :; do
    INTERRUPTED=""
    set +e; wait "$LAUNCH_PID"; STATUS=$?; set -e
    if [ -n "$INTERRUPTED" ] && [ "$STATUS" -gt 128 ]; then continue; fi
    break
done
if [ -n "$RESIGNALLER" ]; then kill "$RESIGNALLER" 2>/dev/null || true; fi

if [ "$STATUS" -eq 0 ]; then
    echo "pretrain.sh: training finished (exit 0); checkpoints and metrics in $RUN_DIR"
    exit 0
fi
if [ "$STATUS" -eq "$REQUEUE_EXIT_CODE" ] && [ "$SIGNALLED" = TERM ]; then
    # scancel must not turn into a requeue; a preemption with PreemptMode=REQUEUE is requeued by SLURM.
    echo "pretrain.sh: trainer checkpointed on SIGTERM (scancel or preemption); not requeueing" \
         "from here. Resume by resubmitting with RUN_DIR=$RUN_DIR"
    exit "$REQUEUE_EXIT_CODE"
fi
if [ "$STATUS" -eq "$REQUEUE_EXIT_CODE" ] || [ "$STATUS" -eq "$WATCHDOG_EXIT_CODE" ]; then
    if [ "$STATUS" -eq "$WATCHDOG_EXIT_CODE" ]; then
        WHAT="trainer's watchdog found a hung step (exit $STATUS; stack traces above)"
    else
        WHAT="trainer checkpointed (exit $STATUS)"
    fi
    if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
        echo "pretrain.sh: $WHAT, but the job was already requeued $RESTARTS times" \
             "(MAX_RESTARTS=$MAX_RESTARTS); not requeueing. Resume by resubmitting with RUN_DIR=$RUN_DIR"
        exit "$STATUS"
    fi
    echo "pretrain.sh: $WHAT; requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS)"
    # scontrol requeue ends this shell at once, so nothing may follow it.
    scontrol requeue "$SLURM_JOB_ID"
    exit "$STATUS"
fi
echo "pretrain.sh: trainer failed with exit $STATUS${SIGNALLED:+ after SIG$SIGNALLED}; not requeueing" \
     "(only exit $REQUEUE_EXIT_CODE, a checkpoint on a signal, and $WATCHDOG_EXIT_CODE, a hung step, are" \
     "requeued). Logs: $RUN_DIR/logs/"
exit "$STATUS"
