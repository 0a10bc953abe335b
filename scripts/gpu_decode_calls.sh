#!/usr/bin/env bash
# The decode measurements of docs/gpu-runs.md's next-session plan, one device call each (random-weight
# SmolLM2-135M: nothing to stage but the wheels; carry [".whl"] in call 1):
#
#   bash scripts/gpu_decode_calls.sh 1 SHA   # GPU tests of the new kernels; all-linear compiled rows with a
#                                            # kernel profile; the softmax decode kernel alone
#   bash scripts/gpu_decode_calls.sh 2 SHA   # the retr10 layout (kept layers on the kernel), base, basek
#   bash scripts/gpu_decode_calls.sh 3 SHA   # the 16K-token rows (issue 6's >= 10x goal)
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
    timeout 150 python3 -m pytest -q -x tests/gpu/test_softmax_decode_cuda.py tests/gpu/test_decode_cuda.py \
      -k "softmax or compiled_decode or fused" 2>&1 | tail -30 | tee "$out/tests.log"
    timeout 230 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models ours,base --batches 64 --no-fit \
      --profile-steps 20 --budget-s 200" > "$out/bench-all-linear.log" 2>&1
    tail -40 "$out/bench-all-linear.log"
    timeout 90 python3 benchmarks/softmax_decode.py --copy-to "$out" --commit "$sha" > "$out/bench-softmax-decode.log" 2>&1
    tail -45 "$out/bench-softmax-decode.log"
    ;;
  2)
    timeout 480 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean,compiled --models ours,base,basek --batches 64 \
      --no-fit --profile-steps 20 --budget-s 450 ${RETR10[*]@Q}" > "$out/bench-retr10.log" 2>&1
    tail -60 "$out/bench-retr10.log"
    ;;
  3)
    timeout 540 bash -c "$(declare -f gen); out=$out sha=$sha; gen --tokens 16384 --batches 64 --loops lean,compiled --no-fit \
      --budget-s 500" > "$out/bench-16k.log" 2>&1
    tail -30 "$out/bench-16k.log"
    ;;
  *) echo "call must be 1, 2 or 3" >&2; exit 2 ;;
esac
