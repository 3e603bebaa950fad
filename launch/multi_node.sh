#!/usr/bin/env bash
# Train on several machines listed in an MPI-style hostfile.
#
# Usage:
#   [VAR=value ...] launch/multi_node.sh [--resume] [key.sub=value ...]
#
#   # passwordless ssh (+ pdsh) from this node to all: run once, on the first host of the hostfile
#   HOSTFILE=hostfile CONFIG=configs/part_large.yaml launch/multi_node.sh --resume
#
#   # no ssh between nodes: run the same command on every node, each with its own NODE_RANK
#   NO_SSH=1 NODE_RANK=0 HOSTFILE=hostfile MASTER_ADDR=node-a launch/multi_node.sh --resume   # on node-a
#   NO_SSH=1 NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=node-a launch/multi_node.sh --resume   # on node-b
#
# The hostfile has one line per node, `<hostname> slots=<GPUs on it>`, e.g.
#   node-a slots=8
#   node-b slots=8
# (NO_SSH=1: the same file on every node, in the same order; line i is node rank i.)
#
# Arguments are handed to train.py unchanged: `--resume` and `key.sub=value` config overrides. Put `--resume`
# first: train.py reads the overrides as one list, which an option in its middle would split.
#
# First `python train.py --config $CONFIG --check` validates the config and the data for the whole world size
# (the sum of the slots; exit 2 naming the field, before any rank starts); then
#   deepspeed --hostfile $HOSTFILE --master_addr $MASTER_ADDR --master_port $MASTER_PORT train.py ...
# or with NO_SSH=1
#   deepspeed --no_ssh --node_rank $NODE_RANK --hostfile ... --master_addr ... --master_port ... train.py ...
# which starts only this node's ranks (global ranks NODE_RANK * slots + local rank).
# The repo must be at the same path on every node (shared filesystem); the script cds to the repo root, and
# relative paths are relative to it.
#
# Variables:
#   HOSTFILE     the hostfile                                   (default: hostfile at the repo root)
#   MASTER_ADDR  address of node rank 0, reachable from all     (default: first host of the hostfile)
#   MASTER_PORT  rendezvous port on MASTER_ADDR                 (default 29500: every node must name the same
#                port, so it cannot be a free port picked on one of them; set it to run two jobs at once)
#   CONFIG       YAML config                                    (default configs/tiny_part.yaml)
#   NO_SSH=1     launch only this node's ranks (no ssh/pdsh); needs NODE_RANK
#   NODE_RANK    0-based index of this node in the hostfile     (NO_SSH=1 only; default $SLURM_NODEID)
#   NUM_NODES    use only the first NUM_NODES hosts             (default: all)
#   NUM_GPUS     ranks per node, ids 0..NUM_GPUS-1              (default: each host's slots)
#   LAUNCHER     deepspeed multi-node backend without NO_SSH: pdsh (default), openmpi, mpich, impi, mvapich,
#                slurm; LAUNCHER_ARGS: extra arguments for it (one string)
#   SSH_PORT     ssh port for the pdsh launcher and its ssh check
#   PYTHON, DEEPSPEED  the interpreter and the launcher         (default: python, deepspeed from PATH)
#   DRY_RUN=1    print the two commands instead of running them
#
# With pdsh, DeepSpeed forwards to the other nodes only the environment variables starting with PYTHON,
# MLFLOW, MV2 or UCX (plus the accelerator's own, e.g. NCCL_* on CUDA); put anything else (OMP_NUM_THREADS,
# HF_HOME, ...) as KEY=value lines in ./.deepspeed_env or ~/.deepspeed_env. With NO_SSH=1 every node keeps
# its own environment.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/tiny_part.yaml}
NO_SSH=${NO_SSH:-0}
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
DRY_RUN=${DRY_RUN:-0}


[[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: no such file (one '<hostname> slots=<n>' line per node)"

# Parse the hostfile as deepspeed does: '<host> slots=<n>' lines, '#' comments and blank lines skipped.
hosts=()
slots=()
while read -r line || [[ -n "$line" ]]; do
    line=${line#"${line%%[![:space:]]*}"}
    [[ -z "$line" || "$line" == \#* ]] && continue
    if [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]]; then
        hosts+=("${BASH_REMATCH[1]}")
        slots+=("${BASH_REMATCH[2]}")
    else
        die "$HOSTFILE: bad line '$line' (expected '<hostname> slots=<n>')"
    fi
done <"$HOSTFILE"
[[ ${#hosts[@]} -gt 0 ]] || die "$HOSTFILE: no hosts"

nodes=${#hosts[@]}
launch_args=(--hostfile "$HOSTFILE")
if [[ -n "${NUM_NODES:-}" ]]; then
    [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ && "$NUM_NODES" -le "$nodes" ]] \
        || die "NUM_NODES=$NUM_NODES: need 1..$nodes (hosts in $HOSTFILE)"
    nodes=$NUM_NODES
    launch_args+=(--num_nodes "$NUM_NODES")
fi
if [[ -n "${NUM_GPUS:-}" ]]; then
    [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS=$NUM_GPUS: need a positive number"
    launch_args+=(--num_gpus "$NUM_GPUS")
fi
world=0
for ((i = 0; i < nodes; i++)); do
    world=$((world + ${NUM_GPUS:-${slots[i]}}))
done
[[ "$world" -gt 0 ]] || die "$HOSTFILE: no slots"

MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
launch_args+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

if [[ "$NO_SSH" == 1 ]]; then
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$nodes" ]] \
        || die "NO_SSH=1 needs NODE_RANK in 0..$((nodes - 1)) (this node's line in $HOSTFILE), got '$NODE_RANK'"
    launch_args+=(--no_ssh --node_rank "$NODE_RANK")
else
    [[ -n "${LAUNCHER:-}" ]] && launch_args+=(--launcher "$LAUNCHER")
    [[ -n "${LAUNCHER_ARGS:-}" ]] && launch_args+=(--launcher_args "$LAUNCHER_ARGS")
    [[ -n "${SSH_PORT:-}" ]] && launch_args+=(--ssh_port "$SSH_PORT")
fi

# The check validates the data sharding for this world size (train.py reads WORLD_SIZE before --world-size).
run env WORLD_SIZE="$world" "$PYTHON" train.py --config "$CONFIG" --check --world-size "$world" "$@"
run_last "$DEEPSPEED" "${launch_args[@]}" train.py --config "$CONFIG" "$@"
