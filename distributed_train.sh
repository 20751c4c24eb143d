#!/usr/bin/env bash
# Launch train.py on NUM_PROC processes per node with torchrun (through noah_mlp.launch, which exits
# with the failing worker's status instead of printing a launcher traceback).
#
#   bash distributed_train.sh NUM_PROC DATA [train.py options...]
#   bash distributed_train.sh NUM_PROC [torchrun options...] DATA [train.py options...]
#
# torchrun options (--nnodes, --node-rank, --master-addr, --master-port, --rdzv-*, ...) placed right
# after NUM_PROC, or in $TORCHRUN_ARGS, go to torchrun; everything else goes to train.py. Without
# node / rendezvous options the run is single-node on a free port (torchrun --standalone).
# Two nodes of 8 GPUs each (run on both, node rank 0 and 1):
#   bash distributed_train.sh 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \
#       /data/imagenet --config configs/default_noah.yaml --model noah_gmlp_ti16_224
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash $0 NUM_PROC [torchrun options] DATA [train.py options]" >&2
    exit 2
fi
NUM_PROC=$1
shift
if ! [[ "$NUM_PROC" =~ ^[0-9]+$ ]] || [ "$NUM_PROC" -lt 1 ]; then
    echo "error: NUM_PROC must be a positive number of processes per node, got '$NUM_PROC'" >&2
    exit 2
fi
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

TORCHRUN_OPTS=()
MULTI_NODE=0
# torchrun options that take a value / that are flags
VALUE_OPTS=" --nnodes --node-rank --node_rank --master-addr --master_addr --master-port --master_port \
 --rdzv-backend --rdzv_backend --rdzv-endpoint --rdzv_endpoint --rdzv-id --rdzv_id --rdzv-conf --rdzv_conf \
 --max-restarts --max_restarts --monitor-interval --monitor_interval --start-method --start_method \
 --log-dir --log_dir --redirects --tee --local-addr --local_addr --role "
FLAG_OPTS=" --standalone --no-python --no_python "
while [ $# -gt 0 ]; do
    opt="${1%%=*}"
    if [[ "$VALUE_OPTS" == *" $opt "* ]]; then
        case "$opt" in --nnodes|--node-rank|--node_rank|--master-addr|--master_addr|--master-port|--master_port|--rdzv*) MULTI_NODE=1 ;; esac
        if [[ "$1" == *=* ]]; then TORCHRUN_OPTS+=("$1"); shift
        else TORCHRUN_OPTS+=("$1" "${2:?missing value for $1}"); shift 2; fi
    elif [[ "$FLAG_OPTS" == *" $opt "* ]]; then
        TORCHRUN_OPTS+=("$1"); shift
    else
        break
    fi
done
if [[ " ${TORCHRUN_ARGS:-} " == *"--nnodes"* || " ${TORCHRUN_ARGS:-} " == *"--rdzv"* || " ${TORCHRUN_ARGS:-} " == *"--master"* ]]; then
    MULTI_NODE=1
fi
# the command as typed, for the resume command a stopped run prints (noah_mlp.launch.launch_command)
NOAH_MLP_LAUNCH="$(printf '%q ' bash "$0" "$NUM_PROC" "${TORCHRUN_OPTS[@]}")"
if [ -n "${TORCHRUN_ARGS:-}" ]; then
    NOAH_MLP_LAUNCH="TORCHRUN_ARGS=$(printf '%q' "$TORCHRUN_ARGS") $NOAH_MLP_LAUNCH"
fi
export NOAH_MLP_LAUNCH
if [ "$MULTI_NODE" -eq 0 ] && [[ " ${TORCHRUN_OPTS[*]:-} " != *" --standalone "* ]]; then
    TORCHRUN_OPTS+=(--standalone)
fi
# shellcheck disable=SC2086
exec "$PYTHON" -m noah_mlp.launch --nproc-per-node="$NUM_PROC" ${TORCHRUN_ARGS:-} "${TORCHRUN_OPTS[@]}" \
    "$SCRIPT_DIR/train.py" "$@"
