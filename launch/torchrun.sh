#!/usr/bin/env bash
# One node, N processes (one per GPU / NPU; on CPU: gloo processes). Extra arguments are Hydra overrides.
#
#   launch/torchrun.sh 8 experiment=voxcpm2_2b_pretrain run.dir=/ckpt/voxcpm2-2b
#   NPROC=2 launch/torchrun.sh experiment=demo platform=cpu          # NPROC from the env also works
#
# Re-running the same command on the same run.dir resumes from its latest checkpoint.
set -euo pipefail
# no cd: relative paths of the overrides resolve against the caller's directory (like voxcpm-train)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC="$1"; shift
fi
NPROC="${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}"
PYTHON="${PYTHON:-$( [[ -x "${REPO}/.venv/bin/python" ]] && echo "${REPO}/.venv/bin/python" || echo python3)}"
MASTER_PORT="${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # megatron TP/SP overlap ordering

echo "torchrun: ${NPROC} processes on $(hostname), overrides: $*"
exec "${PYTHON}" -m torch.distributed.run \
  --standalone --nnodes=1 --nproc-per-node="${NPROC}" --master-port="${MASTER_PORT}" \
  -m voxcpm_train.train "$@"
