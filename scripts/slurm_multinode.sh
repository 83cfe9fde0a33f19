#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads the SLURM environment (ranks, master address).
#   sbatch scripts/slurm_multinode.sh configs/finetune/epg_xl16_dm_in256.yaml
# Resubmitting the same job resumes from the last checkpoint (--ckpt_path last); on pre-emption SLURM sends
# SIGUSR1/SIGTERM before the kill and Lightning's SLURM plugin saves and requeues.
#SBATCH --job-name=epg
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_multinode.sh CONFIG.yaml [extra epg fit args]}
shift
srun .venv/bin/epg fit -c "$CONFIG" \
  --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --ckpt_path last "$@"
