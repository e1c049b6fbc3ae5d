# Body shared by tokenizer.sbatch and transformer.sbatch, which lie beside it (magvit.resources.SLURM_DIR; in a
# checkout also launch/slurm/). Sourced, not run.
#
# Inputs (set by the sourcing batch script or the environment):
#   TRAIN_MODULE     training module, run as `python -m` (magvit.launch.train_tokenizer, ...)
#   MAGVIT_WORKDIR   the job's working directory: relative paths in arguments and configs are read from here
#                    (default: the directory sbatch was called from)
#   MAGVIT_PYTHON    interpreter (default: python on PATH, i.e. the environment sbatch was called from)
#   "$@"             arguments of the training script: --config FILE [--run-dir DIR] [key.path=value ...]
#
# What it does: one task per GPU (or per CPU task) on every node via srun; every task gets RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR (first host of the allocation) and MASTER_PORT (derived from the job id, as
# magvit.distributed does), so DeepSpeed needs no launcher of its own. Training always runs with --resume auto.
# When training exits with status 3 after SIGUSR1 (checkpoint saved: --signal=USR1@120 before the time limit, sent
# to the ranks or, with B:, to this shell, which forwards it to every rank), the job requeues itself and the next
# start resumes from that checkpoint. After SIGTERM (scancel, scontrol requeue, preemption) every rank checkpoints
# and stops, and SLURM decides: a cancelled job stays cancelled, a requeued or preempted one is requeued.

set -uo pipefail

EXIT_CODE_PREEMPTED=3  # magvit.distributed.EXIT_CODE_PREEMPTED

log() { echo "[$(date '+%Y-%m-%dT%H:%M:%S')] magvit-slurm: $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: this is a SLURM batch script: submit it with sbatch (or magvit-submit)" >&2
    exit 2
fi
if [ -z "${TRAIN_MODULE:-}" ]; then
    echo "error: TRAIN_MODULE is not set (source this file from tokenizer.sbatch or transformer.sbatch)" >&2
    exit 2
fi

WORKDIR=${MAGVIT_WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${MAGVIT_PYTHON:-python}
cd "$WORKDIR" || { echo "error: working directory $WORKDIR not found (set MAGVIT_WORKDIR)" >&2; exit 2; }

# The run directory: --run-dir from the arguments, else runs/<job name> (matches the default #SBATCH --output).
ARGS=("$@")
RUN_DIR=""
HAS_RESUME=0
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
        --run-dir | --run_dir) RUN_DIR=${ARGS[i + 1]:-} ;;
        --run-dir=* | --run_dir=*) RUN_DIR=${ARGS[i]#*=} ;;
        --resume | --resume=*) HAS_RESUME=1 ;;
    esac
done
if [ -z "$RUN_DIR" ]; then
    RUN_DIR="runs/${SLURM_JOB_NAME}"
    ARGS+=(--run-dir "$RUN_DIR")
fi
# Every start of the job (first or requeued) continues from the latest complete checkpoint.
[ "$HAS_RESUME" = 1 ] || ARGS+=(--resume auto)
# --overwrite deletes the run dir's previous run: on the first start only, never the checkpoints of this job's own
# earlier starts (a requeue).
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    KEPT=()
    for a in "${ARGS[@]}"; do [ "$a" = --overwrite ] || KEPT+=("$a"); done
    ARGS=("${KEPT[@]}")
fi
mkdir -p "$RUN_DIR/logs"

# Rendezvous: the first host of the allocation, by the address SLURM itself reaches it at (NodeAddr; its name
# when that is unknown); port from the job id (same formula as magvit.distributed) so a requeued job gets the
# same one and two jobs sharing a node rarely collide.
FIRST_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NODE_ADDR=$(scontrol show node "$FIRST_HOST" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
export MASTER_ADDR=${NODE_ADDR:-$FIRST_HOST}
# (Always derived: a MASTER_PORT exported from the submitting shell would be shared by every job.)
export MASTER_PORT=$((15000 + ${SLURM_JOB_ID//[^0-9]/} % 20000))

# CPU-only nodes: DeepSpeed on CPU (gloo), without its accelerator-detection warning. On GPU nodes every task
# sees the node's allocated GPUs and picks cuda:LOCAL_RANK.
if [ "${SLURM_GPUS_ON_NODE:-0}" = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}

log "job ${SLURM_JOB_ID} start $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NTASKS} tasks on ${SLURM_JOB_NUM_NODES} node(s)" \
    "(${SLURM_JOB_NODELIST}), master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
log "command: ${PYTHON} -m ${TRAIN_MODULE} ${ARGS[*]} (in ${WORKDIR})"

# Stop signals. SLURM delivers SIGTERM (scancel, `scontrol requeue`, preemption, the time limit) to every rank
# itself, and this shell too. A USR1 meant for the ranks may reach only this shell (`--signal=B:USR1@120`,
# `scancel --batch --signal=USR1`): untrapped, it would kill the shell and leave the job FAILED, unrequeued. So srun
# runs in the background (bash runs a trap only between commands, never during a foreground one) and each signal
# is forwarded through srun, which hands it to every task on every node: every rank checkpoints and exits 3.
STOP_SIGNAL=""
SRUN_PID=""
forward() {
    STOP_SIGNAL=$1
    log "got SIG$1: forwarding it to every rank"
    [ -z "$SRUN_PID" ] || kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One process per task. srun of Slurm 22.05 does not inherit --cpus-per-task from the allocation: pass it.
# Per-rank logs: RUN_DIR/logs/<job name>-<job id>-rank<N>.log, appended across requeues; each start of a rank
# first says where it runs. NODE_RANK: the node's index in the allocation (SLURM_NODEID), torchrun's name for it.
# shellcheck disable=SC2016  # the inner variables are expanded by each task, not here
srun --kill-on-bad-exit=0 --cpus-per-task="$CPUS_PER_TASK" --open-mode=append \
    --output="$RUN_DIR/logs/%x-%j-rank%t.log" \
    bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID
             echo "magvit-slurm: rank $RANK of $WORLD_SIZE on node $SLURMD_NODENAME (node rank $NODE_RANK," \
                  "local rank $LOCAL_RANK), master $MASTER_ADDR:$MASTER_PORT"
             exec "$@"' magvit-rank \
    "$PYTHON" -m "$TRAIN_MODULE" "${ARGS[@]}" &
SRUN_PID=$!
[ -z "$STOP_SIGNAL" ] || kill -s "$STOP_SIGNAL" "$SRUN_PID" 2>/dev/null  # a signal that came before srun did
# A trapped signal ends `wait` early (status 128 + n) while srun runs on: wait again until it has exited, then
# once more for its own status (bash keeps the status of a background process it has reaped).
while wait "$SRUN_PID"; kill -0 "$SRUN_PID" 2>/dev/null; do :; done
wait "$SRUN_PID"
STATUS=$?

# SIGTERM: SLURM ends this start of the job. A cancelled job stays cancelled and a requeued or preempted one is
# requeued by SLURM itself, so this script never requeues after it (a requeue here would revive a cancelled job).
if [ "$STOP_SIGNAL" = TERM ]; then
    log "stopped by SIGTERM (scancel, scontrol requeue, preemption or the time limit; training status ${STATUS})"
    exit "$STATUS"
fi

# 3: checkpoint saved after the signal. 128 + SIGUSR1: the signal came while Python was still starting, before
# the trainer's handler was installed; the latest earlier checkpoint (if any) is where the next start resumes.
if [ "$STATUS" -eq "$EXIT_CODE_PREEMPTED" ] || [ "$STATUS" -eq $((128 + 10)) ]; then
    if [ "$STATUS" -eq "$EXIT_CODE_PREEMPTED" ]; then
        log "training saved a checkpoint after a stop signal: requeueing job ${SLURM_JOB_ID}"
    else
        log "SIGUSR1 arrived before training could checkpoint: requeueing job ${SLURM_JOB_ID}"
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed: resubmit this script to resume from ${RUN_DIR}/checkpoints"
elif [ "$STATUS" -ne 0 ]; then
    log "training failed with status ${STATUS}: see ${RUN_DIR}/logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}-rank*.log"
else
    log "training finished"
fi
exit "$STATUS"
