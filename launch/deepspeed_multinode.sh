#!/usr/bin/env bash
# Pretraining on several nodes with the DeepSpeed launcher, started once, from the repository
# root, on the first node.
#
#   HOSTFILE=launch/hostfile launch/deepspeed_multinode.sh configs/pretrain/vit_base_k400.yaml \
#       data.shards=/shared/k400/train out_dir=/shared/runs/vit_b
#
# Environment:
#   HOSTFILE     hostfile ("<host> slots=<n>" per line; default launch/hostfile)
#   MASTER_ADDR  rendezvous host reachable from every node (default: first host of HOSTFILE)
#   MASTER_PORT  free TCP port on MASTER_ADDR (default 29500)
#   DEEPSPEED    the launcher command (default: deepspeed, from the active environment)
#   LAUNCHER_ARGS  extra launcher options, e.g. "--launcher openmpi", "--exclude node3:0",
#                "--no_ssh_check" (the launcher first checks ssh access to every host)
# Variables the ranks need on remote nodes (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) go in a
# ".deepspeed_env" file (KEY=VALUE lines) in the home directory or the working directory.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
config=$1
shift
hostfile=${HOSTFILE:-launch/hostfile}
if [[ ! -f $hostfile ]]; then
    echo "$0: hostfile '$hostfile' not found (copy launch/hostfile.example)" >&2
    exit 2
fi
master_addr=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ { print $1; exit }' "$hostfile")}
master_port=${MASTER_PORT:-29500}

# shellcheck disable=SC2086  # DEEPSPEED and LAUNCHER_ARGS are word lists
exec ${DEEPSPEED:-deepspeed} --hostfile "$hostfile" --master_addr "$master_addr" \
    --master_port "$master_port" ${LAUNCHER_ARGS:-} --module pretrain --config "$config" "$@"
