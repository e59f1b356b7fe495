#!/usr/bin/env bash
# Ascend 910B node(s): one process per NPU with torchrun (torch_npu + HCCL; MindSpeed-style CUDA->NPU
# transfer is done by the platform layer). Extra arguments are Hydra overrides.
#
#   launch/ascend_910.sh experiment=voxcpm2_2b_pretrain parallel=ascend_2b run.dir=/ckpt/voxcpm2-2b
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/ascend_910.sh ...     # on every node
set -euo pipefail
# no cd: relative paths of the overrides resolve against the caller's directory (like voxcpm-train)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

# CANN environment (default install path; override ASCEND_HOME)
ASCEND_HOME="${ASCEND_HOME:-/usr/local/Ascend/ascend-toolkit}"
if [[ -f "${ASCEND_HOME}/set_env.sh" ]]; then
  # shellcheck disable=SC1091
  source "${ASCEND_HOME}/set_env.sh"
fi

export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}"
NPROC="${NPROC:-$(awk -F, '{print NF}' <<< "${ASCEND_RT_VISIBLE_DEVICES}")}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

export PYTORCH_NPU_ALLOC_CONF="expandable_segments:True"
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}"
export HCCL_IF_BASE_PORT="${HCCL_IF_BASE_PORT:-64000}"
export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-200}"
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
export CPU_AFFINITY_CONF="${CPU_AFFINITY_CONF:-1}"
export COMBINED_ENABLE=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export WANDB_MODE="${WANDB_MODE:-offline}"
PYTHON="${PYTHON:-$( [[ -x "${REPO}/.venv/bin/python" ]] && echo "${REPO}/.venv/bin/python" || echo python3)}"

echo "ascend: ${NNODES} node(s) x ${NPROC} NPUs (${ASCEND_RT_VISIBLE_DEVICES}), node rank ${NODE_RANK}, master ${MASTER_ADDR}:${MASTER_PORT}"
exec "${PYTHON}" -m torch.distributed.run \
  --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${NPROC}" \
  --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" \
  -m voxcpm_train.train platform=npu "$@"
