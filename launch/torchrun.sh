#!/usr/bin/env bash
# One node, N processes (one per GPU / NPU; on CPU: gloo processes). Extra arguments are Hydra overrides.
#
#   launch/torchrun.sh 8 experiment=voxcpm2_2b run.dir=/ckpt/voxcpm2-2b
#   NPROC=2 launch/torchrun.sh experiment=demo platform=cpu          # NPROC from the env also works
#
# Re-running the same command on the same run.dir resumes from its latest checkpoint. Runs the installed
# `voxcpm-train` console script (the repo's .venv when there is one, else the one on PATH; VOXCPM_TRAIN
# overrides) in the current directory: relative paths in the overrides are relative to where you launch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VOXCPM_TRAIN="${VOXCPM_TRAIN:-$( [[ -x "${ROOT}/.venv/bin/voxcpm-train" ]] && echo "${ROOT}/.venv/bin/voxcpm-train" || command -v voxcpm-train || true)}"
[[ -x "${VOXCPM_TRAIN}" ]] || { echo "voxcpm-train not found: install the project (README) or set VOXCPM_TRAIN" >&2; exit 1; }

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC="$1"; shift
fi
NPROC="${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}"
MASTER_PORT="${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # megatron TP/SP overlap ordering

echo "torchrun: ${NPROC} processes on $(hostname), overrides: $*"
exec "$(dirname "${VOXCPM_TRAIN}")/torchrun" \
  --standalone --nnodes=1 --nproc-per-node="${NPROC}" --master-port="${MASTER_PORT}" \
  --no-python "${VOXCPM_TRAIN}" "$@"
