#!/usr/bin/env bash
# Train on one machine: every GPU of this node, or NPROC ranks on a CPU-only machine.
#
# Usage:
#   [VAR=value ...] launch/single_node.sh [--resume] [key.sub=value ...]
#
#   CONFIG=configs/part_large.yaml NUM_GPUS=8 launch/single_node.sh --resume stages.0.lr=5e-4
#   CONFIG=configs/tiny_part.yaml NPROC=2 launch/single_node.sh          # CPU-only machine
#   DRY_RUN=1 launch/single_node.sh                                      # print the commands only
#
# Arguments are handed to train.py unchanged: `--resume` and `key.sub=value` config overrides. Put
# `--resume` first: train.py reads the overrides as one list, which an option in its middle would split.
#
# First `python train.py --config $CONFIG --check ...` validates the config and every stage's data for the
# world size about to be launched (exit 2, naming the field, before any rank starts); then
# `deepspeed ... train.py --config $CONFIG ...` starts the ranks. Relative paths are relative to the repo root
# (the script cds there).
#
# Variables (all optional):
#   CONFIG       YAML config                                   (default configs/tiny_part.yaml)
#   NUM_GPUS     GPUs to use on this node, ids 0..NUM_GPUS-1   (default: all GPUs; when CUDA_VISIBLE_DEVICES
#                is set, its first NUM_GPUS ids, or all of them -- deepspeed drops CUDA_VISIBLE_DEVICES when
#                given --num_gpus, so the script turns it into --include localhost:<ids> instead)
#   NPROC        ranks on a CPU-only machine                   (default 2)
#   MASTER_PORT  rendezvous port on 127.0.0.1                  (default: a free port, so two jobs can run at once)
#   OMP_NUM_THREADS  CPU-only: threads per rank                (default: cores / NPROC, at least 1)
#   PYTHON, DEEPSPEED  the interpreter and the launcher        (default: python, deepspeed from PATH)
#   DRY_RUN=1    print the two commands instead of running them
#
# CPU-only mode is chosen when nvidia-smi is missing or lists no GPU, or when DS_ACCELERATOR=cpu. There the
# launcher flag for N local ranks is `--num_gpus N` (alias --num_accelerators): DeepSpeed's CPU accelerator
# counts NUMA nodes as devices (usually 1), so without it you get one rank, and `--include localhost:0,1`
# fails ("No slot '1' specified on host 'localhost'"). The ranks talk over gloo (ccl if
# oneccl_bindings_for_pytorch is installed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

CONFIG=${CONFIG:-configs/tiny_part.yaml}
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-python}
# a free port unless one is given: a second run on the same machine must not collide with the first
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'from part.train.launcher import free_port; print(free_port())')}
DEEPSPEED=${DEEPSPEED:-deepspeed}
DRY_RUN=${DRY_RUN:-0}

for var in NPROC NUM_GPUS; do
    if [[ -n "${!var:-}" && ! "${!var}" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $var=${!var}: need a positive number of ranks" >&2
        exit 2
    fi
done


gpu_count() {
    if [[ "${DS_ACCELERATOR:-}" == cpu ]] || ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
        return
    fi
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

launch_env=()   # CPU-only: env OMP_NUM_THREADS=N for the launcher (and so every rank)
launch_args=(--master_port "$MASTER_PORT")
n_gpus=$(gpu_count)
if [[ "$n_gpus" -gt 0 ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
        world=${NUM_GPUS:-${#visible[@]}}
        if [[ "$world" -gt "${#visible[@]}" ]]; then
            echo "error: NUM_GPUS=$world but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES has ${#visible[@]} ids" >&2
            exit 2
        fi
        ids=$(IFS=,; echo "${visible[*]:0:$world}")
        launch_args+=(--include "localhost:$ids")
    else
        world=${NUM_GPUS:-$n_gpus}
        launch_args+=(--num_gpus "$world")
    fi
else
    world=$NPROC
    launch_args+=(--num_gpus "$world")
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cores=$(nproc 2>/dev/null || echo 1)
        launch_env=(env "OMP_NUM_THREADS=$(( cores / world > 0 ? cores / world : 1 ))")
    fi
fi

# The check validates the data sharding for this world size (train.py reads WORLD_SIZE before --world-size).
run env WORLD_SIZE="$world" "$PYTHON" train.py --config "$CONFIG" --check --world-size "$world" "$@"
run_last "${launch_env[@]}" "$DEEPSPEED" "${launch_args[@]}" train.py --config "$CONFIG" "$@"
