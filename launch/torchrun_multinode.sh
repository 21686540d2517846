#!/usr/bin/env bash
# Pretraining with torchrun's c10d rendezvous: start this script on every node (by hand, pdsh,
# or a scheduler); the nodes find each other at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=gpu-node-001 RUN_ID=vitb-k400 \
#       launch/torchrun_multinode.sh configs/pretrain/vit_base_k400.yaml out_dir=/shared/runs/vit_b
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes (GPUs) per node (default 1)
#   MASTER_ADDR     host running the rendezvous, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     free TCP port on MASTER_ADDR (default 29400)
#   RUN_ID          the same string on every node of one job, unique per job (default: pretrain)
#   TORCHRUN        the launcher command (default: torchrun)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
config=$1
shift

exec ${TORCHRUN:-torchrun} --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-1}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29400}" \
    --rdzv_id "${RUN_ID:-pretrain}" -m pretrain --config "$config" "$@"
