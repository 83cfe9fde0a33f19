#!/usr/bin/env bash
# Multi-node training with torchrun (no SLURM): run this on every node with the same MASTER_ADDR.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun_multinode.sh configs/finetune/epg_xl16_dm_in256.yaml
# Lightning detects the TorchElastic environment; the global batch in the config is split over all ranks.
set -euo pipefail
CONFIG=${1:?usage: scripts/torchrun_multinode.sh CONFIG.yaml [extra epg fit args]}
shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=29500}" "${GPUS_PER_NODE:=8}"
exec .venv/bin/torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m epg.cli fit -c "$CONFIG" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --ckpt_path last "$@"
