#!/usr/bin/env bash
# What every sbatch template in slurm/ runs after its #SBATCH header:
#   run_job MODULE [hydra overrides...]
# - the run is named after the job (NAME, default the job name), so a requeued job resumes its own run;
# - wandb runs offline on compute nodes (sync afterwards: wandb sync runs/<name>/wandb/offline-run-*);
# - one `srun launch/run.sh` per node, with the job's CPUs per task; USR1 from --signal=B:USR1@... is
#   forwarded to it;
# - when the trainer stopped for a preemption (exit code 75), the job requeues itself.
set -uo pipefail

REQUEUE_EXIT_CODE=75

run_job() {
    local module=$1
    shift
    cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
    export NAME=${NAME:-${SLURM_JOB_NAME:-unclip}}
    export WANDB_MODE=${WANDB_MODE:-offline}
    export PYTHONUNBUFFERED=1
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation: without this, each
    # node's torchrun, its 8 workers and their data loaders would share one core.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
    if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
    mkdir -p logs
    echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-localhost}: $module name=$NAME $*"

    local step=""  # traps first: a warning that comes while srun starts must not kill this shell
    trap 'echo "preemption warning: forwarding USR1"; [ -n "$step" ] && kill -USR1 "$step" 2>/dev/null' USR1
    trap '[ -n "$step" ] && kill -TERM "$step" 2>/dev/null' TERM
    srun --ntasks-per-node=1 --kill-on-bad-exit=0 launch/run.sh "$module" "name=$NAME" "$@" &
    step=$!
    local code=0
    while kill -0 "$step" 2>/dev/null; do
        wait "$step"
        code=$?
    done
    if [ "$code" -eq "$REQUEUE_EXIT_CODE" ]; then
        echo "stopped for preemption: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$code"
}
