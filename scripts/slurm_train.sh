#!/bin/bash
# fastmveb on SLURM: one torchrun launcher per node (srun), all nodes in one process group, requeued on
# preemption and resumed from the newest checkpoint (the run directory must be on a shared filesystem).
#
#   sbatch --nodes 4 scripts/slurm_train.sh --rc rcs/rn50.yaml [section.key=value ...]
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), MASTER_PORT (29500), MAX_RESTARTS (3:
# torchrun restarts a group that lost a process, the job keeps its nodes), PYTHON (.venv/bin/python).
# Preemption: SLURM sends USR1 to this script 180 s before the end (--signal below); the script passes SIGTERM
# to the launchers, torchrun forwards it to the workers, which agree to stop at the next logging step, write a
# checkpoint and exit 75 (fastmveb/train.py); the job is then requeued and the rerun resumes from there.
# torchrun gives the workers 30 s after its SIGTERM: keep train.log_every steps plus one save under that.
#SBATCH --job-name=fastmveb
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?run this under sbatch or salloc}"
NNODES=${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is not set}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# The first node of the allocation hosts torchrun's rendezvous store.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # (sed reads all: no SIGPIPE)
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-.venv/bin/python}

# The c10d rendezvous (endpoint + id) rather than --node_rank: node ranks come from the rendezvous, so the same
# command runs on every node, and a restart (--max-restarts) re-forms the group.
cmd=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
     "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "fastmveb-$SLURM_JOB_ID"
     --max-restarts "${MAX_RESTARTS:-3}"
     fastmveb/train.py "$@")
echo "fastmveb: ${cmd[*]}"

preempted=0
on_usr1() {
    preempted=1
    echo "fastmveb: preemption signal: stopping the launchers at the next logging step"
    kill -TERM "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1

"${cmd[@]}" &
srun_pid=$!
status=0
# `wait` returns early when the trap runs; wait again until srun has really ended.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" && status=0 || status=$?
done
if [[ $preempted == 1 ]]; then
    echo "fastmveb: requeueing job $SLURM_JOB_ID (it resumes from the newest checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
