#!/bin/bash
# train.py on several SLURM nodes: one `accelerate launch` per node, each with its machine rank (docs/multinode.md).
#   sbatch configs/slurm_train.sh DATA TOK OUT --streaming [more train.py flags...]
#SBATCH --job-name=cell-translator
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
set -euo pipefail
DATA=${1:?usage: sbatch configs/slurm_train.sh DATA TOK OUT [train.py flags...]}
TOK=${2:?give the tokenizer folder}
OUT=${3:?give the model folder, on a filesystem every node sees}
shift 3
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
# Single quotes: SLURM_NODEID is read on each node, not here.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file configs/accelerate_multinode.yaml \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip '"$MAIN_IP"' --main_process_port '"$MAIN_PORT"' \
    train.py configs/default.yaml --dataset_dir "$0" --tokenizer_dir "$1" --output_dir "$2" "${@:3}"' \
    "$DATA" "$TOK" "$OUT" "$@"
