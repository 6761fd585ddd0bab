#!/bin/bash
# DPO on several machines under Slurm: one `accelerate launch` per node (srun, one task per node), each
# starting one process per GPU; machine counts, ranks and the main address come from Slurm. Arguments after
# the recipe go to train.py; CONFIG= picks another launch config (default accelerate_configs/multi_node.yaml).
#   sbatch --nodes 2 accelerate_configs/slurm_multinode.sh recipes/smollm2_arith_full.yaml \
#       --set train.max_steps=100   # needs a GPU
#   CONFIG=accelerate_configs/deepspeed_zero3.yaml sbatch --nodes 4 accelerate_configs/slurm_multinode.sh \
#       recipes/smollm2_arith_full.yaml   # needs a GPU
# One node's share by hand (what srun runs on each node; NODE_RANK=1 on the second machine):
#   NODE_RANK=0 NNODES=2 MASTER_ADDR=host0 GPUS_PER_NODE=8 bash accelerate_configs/slurm_multinode.sh \
#       recipes/smollm2_arith_full.yaml   # needs a GPU
#SBATCH --job-name=dpo_accel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch accelerate_configs/slurm_multinode.sh RECIPE.yaml [train.py arguments]}
shift
CONFIG=${CONFIG:-accelerate_configs/multi_node.yaml}
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-29500}

# The node's rank is read where the launch runs: srun gives each node's task its own SLURM_NODEID.
launch() {
  "$PYTHON" -m accelerate.commands.launch --config_file "$CONFIG" \
    --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank "$1" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    dpo_accel/train.py --recipe "$RECIPE" "${@:2}"
}

if [ -n "${NODE_RANK:-}" ]; then
  launch "$NODE_RANK" "$@"
else
  export -f launch
  export RECIPE CONFIG PYTHON NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'launch "$SLURM_NODEID" "$@"' _ "$@"
fi
