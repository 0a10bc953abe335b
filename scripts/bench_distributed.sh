#!/usr/bin/env bash
# On the lent 2-GPU machine (nvidia-h200-x2), from the repository root, after the SmolLM2 staging calls of
# docs/gpu-runs.md (the GGUF must be staged; or pass BENCH_MODEL=<an HF dir>):
#   bash scripts/bench_distributed.sh [OUT_DIR]        # default ~/distributed-bench; with $OUT set, also
#                                                      # $OUT/distributed-bench.tar.gz and $OUT/bench-batch{8-replicate,8-sharded,32-replicate}.md
# Measures stage-2 tokens/s on 1 and 2 GPUs with the same per-GPU batch (scripts/bench_distributed.py), at
# 8 rows per GPU (the pipeline's default; host-bound for a 135M model, see
# benchmarks/results/train-step-h200-20261123) and at 32 rows per GPU, then runs the 2-GPU correctness test.
# NVLink multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LINEARIZE_CACHE="${LINEARIZE_CACHE:-$HOME/lcache}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
site=${LINEARIZE_SITE:-$HOME/site}
if compgen -G ".whl/*.whl" > /dev/null && [ ! -e "$site/transformers" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m linearize.pipelines.carry stage --carry .carry --stage "$HOME/stage" || true
out=${1:-$HOME/distributed-bench}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# The replicate placement's stage 2 is DDP: one bucketed all-reduce of the LoRA gradients, no per-layer hooks
# (linearize/pipelines/replicate.py); sharded, the default with several processes, is FSDP2 over everything (1.25x
# on 2 x H200 at 8 rows, 2026-11-23). Both at 8 rows a GPU, side by side, then replicate at 32.
# BENCH_RUNS picks others: ROWS:PLACEMENT[:compile], e.g. BENCH_RUNS="8:replicate:compile" (compile=true; its
# warm-up steps hold the compiles, ~1 min in each process) as a call of its own.
runs=${BENCH_RUNS:-8:replicate 8:sharded 32:replicate}
for run in $runs; do
  IFS=: read -r rows pl comp <<< "$run"
  # steps 10-12 profiled on every rank (left out of the timed median): where the 2-GPU step's extra time goes
  timeout "${BENCH_RUN_SECONDS:-160}" python3 scripts/bench_distributed.py --model "${BENCH_MODEL:-smollm2-135m}" --gpus 1,2 \
    --per-gpu-batch "$rows" --placement "$pl" ${comp:+--compile} --seq-len 1024 --steps 30 --warmup 5 --profile 10:3 \
    --out "$out/batch$rows-$pl${comp:+-compile}" | tail -8
done
# the correctness checks on CUDA/NCCL that need only the two set-up runs (2 processes sharded against 1, the
# layers each rank held, the export); the whole file (+ a kill/resume and a 1.6 GB model's per-rank peaks)
# takes 4-6 min: `python3 -m pytest -q -s tests/gpu/test_distributed_cuda.py` as a call of its own
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_distributed_cuda.py -k "equal_one or hold_only or matches_one_gpu" 2>&1 | tail -3
# the device returns at most 8 files: one archive, plus the two tables to read at once
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/distributed-bench.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
  for run in $runs; do
    IFS=: read -r rows pl comp <<< "$run"
    cp "$out/batch$rows-$pl${comp:+-compile}/bench.md" "$OUT/bench-batch$rows-$pl${comp:+-compile}.md" 2>/dev/null || true
  done
fi
