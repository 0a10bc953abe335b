#!/usr/bin/env bash
# The decode measurements of docs/gpu-runs.md's next-session plan, one device call each (random-weight
# SmolLM2-135M: nothing to stage but the wheels; carry [".whl"] in call 1):
#
#   bash scripts/gpu_decode_calls.sh 1 SHA   # GPU tests of the softmax decode kernel (both loops) and of
#                                            # CompiledDecode; the kernel alone (branchy vs bounded loop, in
#                                            # CUDA graphs); the retr10 layout's compiled step, full length
#   bash scripts/gpu_decode_calls.sh 2 SHA   # the compiled step with fused projections (4K and 16K), the base on
#                                            # the softmax kernel (basek), the launch sweep at Gemma/Qwen shapes
#   bash scripts/gpu_decode_calls.sh 3 SHA   # the largest batch at 4096 tokens: all linear, per-KV-head key
#                                            # maps, retr10, the base (issue 6's >= 8x goal)
#
# Everything goes to $OUT (logs, JSON, markdown); each step has its own timeout so that the call ends before
# the device's 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?call number 1, 2 or 3}
sha=${2:-unknown}
out=${OUT:-$HOME/out}
mkdir -p "$out"
bash scripts/gpu_convert.sh --stage-only > "$out/stage.log" 2>&1 || true
export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gen() { python3 benchmarks/generate.py --model benchmarks/configs/smollm2-135m.json --copy-to "$out" --commit "$sha" "$@"; }
RETR10=(--set 'softmax_layers=[7,8,14,15,17,18,20,21,22,23]' --set sink_tokens=4 --set feature_rope=false)
case "$call" in
  1)
    timeout 170 python3 -m pytest -q -x tests/gpu/test_softmax_decode_cuda.py tests/gpu/test_decode_cuda.py \
      -k "softmax or compiled_decode" 2>&1 | tail -30 | tee "$out/tests.log"
    timeout 100 python3 benchmarks/softmax_decode.py --copy-to "$out" --commit "$sha" > "$out/bench-softmax-decode.log" 2>&1
    tail -60 "$out/bench-softmax-decode.log"
    timeout 240 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled,lean --models ours,base --batches 64 --no-fit \
      --profile-steps 20 --budget-s 220 ${RETR10[*]@Q}" > "$out/bench-retr10.log" 2>&1
    tail -45 "$out/bench-retr10.log"
    ;;
  2)
    timeout 150 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models ours --batches 64 --no-fit \
      --fuse-projections --profile-steps 10 --budget-s 130" > "$out/bench-fused-proj.log" 2>&1
    tail -30 "$out/bench-fused-proj.log"
    timeout 120 bash -c "$(declare -f gen); out=$out sha=$sha; gen --tokens 16384 --loops compiled --models ours --batches 64 \
      --no-fit --fuse-projections --budget-s 100" > "$out/bench-fused-proj-16k.log" 2>&1
    tail -12 "$out/bench-fused-proj-16k.log"
    timeout 150 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models basek --batches 64 --no-fit \
      --budget-s 130" > "$out/bench-basek.log" 2>&1
    tail -30 "$out/bench-basek.log"
    timeout 150 python3 benchmarks/tune_decode.py --quick --presets gemma3,qwen2.5 --copy-to "$out" --commit "$sha" \
      > "$out/tune-decode.log" 2>&1
    tail -60 "$out/tune-decode.log"
    ;;
  3)
    timeout 250 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean --models ours,base --batches 64 --budget-s 240" \
      > "$out/fit-all-linear.log" 2>&1
    tail -30 "$out/fit-all-linear.log"
    timeout 250 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean --models ours --batches 64 --budget-s 240 \
      --set feature_map_per_kv_head=true" > "$out/fit-kvmaps.log" 2>&1
    tail -30 "$out/fit-kvmaps.log"
    ;;
  *) echo "call must be 1, 2 or 3" >&2; exit 2 ;;
esac
