#!/usr/bin/env bash
# On the lent 2-GPU machine (nvidia-h200-x2), from the repository root, in one call:
#   bash scripts/bench_distributed.sh [OUT_DIR]        # default results/distributed-bench-h200x2
# Stages the carried GGUF/wheels (scripts/device_stage.sh), then measures stage-2 tokens/s on 1 and 2 GPUs
# with the same per-GPU batch (scripts/bench_distributed.py). NVLink multicast stays off.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash scripts/device_stage.sh
export LINEARIZE_CACHE="${LINEARIZE_CACHE:-$HOME/lcache}"
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 scripts/bench_distributed.py --model smollm2-135m --gpus 1,2 --per-gpu-batch 8 --seq-len 1024 --steps 40 --warmup 5 \
    --out "${1:-results/distributed-bench-h200x2}"
# the correctness check on CUDA/NCCL: 2 processes against 1 on a tiny model (bf16 tolerances)
python3 -m pytest -q tests/gpu/test_distributed_cuda.py
