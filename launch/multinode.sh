#!/usr/bin/env bash
# Multi-node launch without passwordless ssh: run this once on every node with that node's rank.
#
#   launch/multinode.sh HOSTFILE NODE_RANK MASTER_ADDR [MASTER_PORT] -- --recipe recipes/<name>.yaml [--set ...]
#
# Every node runs `deepspeed --no_ssh --node_rank K`, which starts the local ranks of node K and meets the
# others at MASTER_ADDR:MASTER_PORT (node 0's address). The hostfile is checked first, so a typo is one
# clear line instead of a launcher traceback. Set NCCL_SOCKET_IFNAME / NCCL_IB_* in the environment as needed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -lt 4 ]; then
  echo "usage: $0 HOSTFILE NODE_RANK MASTER_ADDR [MASTER_PORT] -- TRAIN_ARGS..." >&2
  exit 2
fi
hostfile=$1; node_rank=$2; master_addr=$3; shift 3
master_port=29500
if [ "$1" != "--" ]; then master_port=$1; shift; fi
if [ "${1:-}" != "--" ]; then
  echo "error: expected '--' before the training arguments" >&2
  exit 2
fi
shift

python -m toolkit.distributed.hostfile "$hostfile" >/dev/null
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
  --master_addr "$master_addr" --master_port "$master_port" \
  launch/train.py "$@"
