#!/usr/bin/env bash
# Launch a training entrypoint through torchrun: on this machine, or on every node of a SLURM job.
#
#   launch/run.sh train.decoder model/decoder=base64            # every local GPU (1 process on a CPU box)
#   NPROC=2 launch/run.sh train.clip debug=fast                  # 2 CPU processes (gloo)
#   srun --ntasks-per-node=1 launch/run.sh train.prior ...       # inside an sbatch script: one per node
#   DRY_RUN=1 launch/run.sh train.clip                           # print the torchrun command, run nothing
#
# Under SLURM with more than one node, the rendezvous comes from the job: master = the first host of
# SLURM_JOB_NODELIST, node rank = SLURM_NODEID, nodes = SLURM_JOB_NUM_NODES, port derived from the
# job id (the same after a requeue). Processes per node: NPROC, else SLURM_GPUS_ON_NODE, else the
# GPUs torch sees, else 1.
#
# Signals: SIGUSR1 (sbatch --signal=B:USR1@...) makes this script touch a node-local file that every
# worker checks at each step, so workers still starting up see it too; they agree on a step, save and
# stop. torchrun itself is shielded from USR1 (it would die of it). SIGTERM goes to torchrun, which
# forwards it. Exit code: the trainer's requeue code (75) when the workers stopped for a preemption,
# otherwise torchrun's own.
set -uo pipefail

module=${1:?usage: launch/run.sh MODULE [hydra overrides...]}
shift
# the project's environment when there is one (make setup), else the python on PATH
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$(dirname "$0")/../.venv/bin/python" ]]; then
        PYTHON="$(dirname "$0")/../.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
REQUEUE_EXIT_CODE=75

# Signals are handled from the first moment: a warning that comes while torchrun starts is not lost.
launch_dir=$(mktemp -d "${TMPDIR:-/tmp}/unclip-launch.XXXXXX")     # this node's files, removed on exit
export UNCLIP_PREEMPT_FILE=$launch_dir/preempt   # touched on USR1; the workers poll it every step
export UNCLIP_REQUEUE_MARKER=$launch_dir/requeue  # a worker writes it when it stopped for a preemption
child=""
trap 'rm -rf "$launch_dir"' EXIT
trap 'touch "$UNCLIP_PREEMPT_FILE"' USR1
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; else exit 143; fi' TERM INT

if [ -z "${NPROC:-}" ]; then
    NPROC=${SLURM_GPUS_ON_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
    NPROC=${NPROC%%(*}                     # SLURM may write "8(x2)"
    [ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
fi

if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)}
    MASTER_ADDR=${MASTER_ADDR:-$("$PYTHON" -m train.slurm first-host "$SLURM_JOB_NODELIST")}
    MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -m train.slurm port "$SLURM_JOB_ID")}
    rendezvous=(--nnodes "$SLURM_JOB_NUM_NODES" --node_rank "${SLURM_NODEID:-0}" --rdzv_backend c10d
                --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID")
else
    rendezvous=(--standalone --nnodes 1)
fi

# train.torchrun is torchrun, ending in one line instead of its own tracebacks (see its docstring)
cmd=("$PYTHON" -m train.torchrun "${rendezvous[@]}" --nproc_per_node "$NPROC" -m "$module" "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

( trap '' USR1; exec "${cmd[@]}" ) &
child=$!

code=0
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
done
if [ -f "$UNCLIP_REQUEUE_MARKER" ]; then
    exit "$REQUEUE_EXIT_CODE"
fi
exit "$code"
