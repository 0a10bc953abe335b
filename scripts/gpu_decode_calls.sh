#!/usr/bin/env bash
# The decode measurements of docs/gpu-runs.md's next-session plan, one device call each (random-weight
# SmolLM2-135M: nothing to stage but the wheels; carry [".whl"] in call 1). Each call first stages whatever
# pieces it carries (gpu_convert.sh --stage-only), so a model's staging calls can run these too:
#
#   bash scripts/gpu_decode_calls.sh 1 SHA   # GPU tests of the decode kernels (ring, S in row chunks, softmax,
#                                            # Hedgehog maps) and of CompiledDecode; the ring/map launch sweep
#                                            # (tune_decode: smollm2, issue5, gemma3), whose best FC says whether
#                                            # streaming S in row chunks should become the default
#   bash scripts/gpu_decode_calls.sh 2 SHA   # the compiled all-linear step at the defaults (profiled), at 4K and
#                                            # 16K new tokens, then the retr10 layout
#   bash scripts/gpu_decode_calls.sh 3 SHA   # ours and the base at 16K new tokens in one run
#   bash scripts/gpu_decode_calls.sh 4 SHA   # the largest batch at 4096 tokens: all linear and the base, then
#                                            # per-KV-head key maps (issue 6's >= 8x goal)
#   bash scripts/gpu_decode_calls.sh 5 SHA   # not decode: the training kernels' launch (issue 5): segments, BV 64 at 8
#                                            # warps and the forward's one-accumulator form, at B4 H16 D=F=128, T=16K and
#                                            # T=2K (with CUDA-graph timings), by tune_chunk
#   bash scripts/gpu_decode_calls.sh 6 SHA   # issue 6's batch table at the current defaults: ours compiled and the
#                                            # base's lean loop at batch 1, 16, 64 and 256 x 4096 new tokens
#                                            # (T1 / T2: each half's seconds, default 270 / 250)
#   bash scripts/gpu_decode_calls.sh 8 SHA   # not decode: every chunk-kernel GPU test (33 ids: fp32 one (T, W) an id),
#                                            # 14 processes at a time, 300 s an id, 330 s in all; then the default
#                                            # launch at 2K (graph) and 16K with the one-pass segment prefix
#   bash scripts/gpu_decode_calls.sh 9 SHA   # issue 6's decode floor on the other two models (random weights, B=64 x 4096):
#                                            # Qwen2.5-0.5B all linear and in qwen-retr8's layout (compiled, profiled), its
#                                            # base's lean loop; Gemma3-270M in gemma-retr2-stage1's layout and its base
#   bash scripts/gpu_decode_calls.sh 10 SHA  # KV heads kept softmax (softmax_heads): their GPU tests (CompiledDecode,
#                                            # CUDA graph); the Hedgehog map kernels' forward + backward GPU tests and
#                                            # the SmolLM2 training step with the map kernel and with the modules
#                                            # (train_step --map-kernel both, issue 5); then issue 6's largest batch on
#                                            # random-weight Qwen2.5-0.5B, the base (static and grown DynamicCache) against
#                                            # 3 kept KV heads with per-KV-head key maps (qwen-heads3-kvmaps-kl's layout:
#                                            # 6.0 vs 49.5 MiB a sequence), ~570 s at most
#   bash scripts/gpu_decode_calls.sh 12 SHA  # call 10's Qwen heads3 largest-batch row again after the fix of its
#                                            # segfault (kept heads' buffers on a static cache), its GPU test first
#   bash scripts/gpu_decode_calls.sh 13 SHA  # call 9's three Qwen rows alone (~330 s)
#   bash scripts/gpu_decode_calls.sh 14 SHA  # Qwen all linear compiled with max-autotune GEMMs (the floor's GEMM part)
#   bash scripts/gpu_decode_calls.sh 16 SHA  # a random-weight Llama-3.1-8B architecture: the base, then ours with key maps
#                                            # per KV head (the >= 8x largest batch; ~560 s)
#   bash scripts/gpu_decode_calls.sh 15 SHA  # the same 8B in LoLCATs' layout (key maps per query head; ~370 s)
#   bash scripts/gpu_decode_calls.sh 17 SHA  # the ring kernel's chunks loaded one step ahead (PREFETCH): GPU tests, the
#                                            # sweep's P rows, Qwen's compiled step without and with it (~540 s)
#   bash scripts/gpu_decode_calls.sh 18 SHA  # not decode: training with compile=true (eighteenth session, CPU only): its
#                                            # GPU test, then
#                                            # the SmolLM2 training step eager against compiled, both stages, stage 2 on
#                                            # KL + CE, profiled (~330 s)
#   bash scripts/gpu_decode_calls.sh 19 SHA  # not decode: the chunk GPU tests (bf16 / fp16 ids), then the backward's
#                                            # intra kernels on smaller blocks (C_intra) and the two-pass forward
#                                            # (split_forward) at 16K and 2K, by tune_chunk (~540 s)
#   bash scripts/gpu_decode_calls.sh 20 SHA  # call 19 cut to ~350 s: its new GPU tests and the 16K sweep
#   bash scripts/gpu_decode_calls.sh 21 SHA  # the compile test against an fp32 step, the chunk GPU tests at the folded
#                                            # default launch, its 16K / 2K timings, fold against split+fold with the
#                                            # kept chunk sums (~350 s)
#   bash scripts/gpu_decode_calls.sh 22 SHA  # the ring kernel at the 8B's heads: the GPU test of S in row chunks read
#                                            # out by several query heads, tune_decode llama8b-kvmaps / llama8b (~200 s)
#   bash scripts/gpu_decode_calls.sh 23 SHA  # the ring kernel with a KV head's query heads as dot rows (heads_dot): its GPU
#                                            # test, tune_decode llama8b-kvmaps(-nowindow), qwen2.5-kvmaps, the 8B step
#                                            # without and with it (~520 s)
#   bash scripts/gpu_decode_calls.sh 24 SHA  # the 8B step (key maps per KV head) with max-autotuned GEMMs (~520 s)
#   bash scripts/gpu_decode_calls.sh 25 SHA  # not decode: issue 5's attention.py table at the current defaults, and the
#                                            # split forward's block size at 16K (~420 s)
#   bash scripts/gpu_decode_calls.sh 26 SHA  # not decode: skip_empty (block pairs' empty window / linear parts not
#                                            # computed): its GPU test, each default launch without and with it at 16K,
#                                            # 2K (graph) and the real models' heads (~500 s at most)
#   bash scripts/gpu_decode_calls.sh 27 SHA  # deferred folding (RingState.fold: S written every P-th step): its GPU test,
#                                            # the ring kernel at P = 1..32 at four models' heads, the 8B step at P = 1
#                                            # and 16 (~540 s at most)
#   bash scripts/gpu_decode_calls.sh 28 SHA  # call 27 without the 8B steps (~280 s), for a short budget
#   bash scripts/gpu_decode_calls.sh 29 SHA  # the new decode defaults: GPU tests of the dot rows and CompiledDecode, the
#                                            # 8B step at new and old defaults, the 8B base again (~520 s)
#   bash scripts/gpu_decode_calls.sh 30 SHA  # fused projections in place (on at 8B now): their GPU tests, the 8B step
#                                            # fused, and fused with max-autotuned GEMMs (~520 s)
#   bash scripts/gpu_decode_calls.sh 31 SHA  # the 8B base and ours fused on one machine (the >= 3x goal; ~300 s)
#   bash scripts/gpu_decode_calls.sh 32 SHA  # the ring kernel's launches at the 8B's heads, fold 8, budgeted (~200 s)
#   bash scripts/gpu_decode_calls.sh 33 SHA  # RoPE inside the map kernel (off by default until this passes): GPU tests, the 8B step with it, the base, without it (~585 s)
#   bash scripts/gpu_decode_calls.sh 34 SHA  # the ring kernel on the window logits, the RoPE + maps launch sweep at the 8B's heads,
#                                            # the 8B step at the defaults and at the sweep's best, the base (~500 s)
#   bash scripts/gpu_decode_calls.sh 37 SHA  # the 8B base and step at the defaults, then with inductor's multi_kernel and with
#                                            # cooperative reductions (the RMSnorms' looped reductions; ~500 s)
#   bash scripts/gpu_decode_calls.sh 54 SHA  # local_sums as the training default: GPU tests, attention.py, real heads (~500 s)
#   bash scripts/gpu_decode_calls.sh 67 SHA  # the Gluon block kernels (gluon_fwd, gluon_dq, gluon_dk): their GPU tests,
#                                            # then tune_chunk gl128 / gl64 / gdq / gdk / all at 16K, 2K, SmolLM2's heads (~380 s)
#   bash scripts/gpu_decode_calls.sh 68 SHA  # the chunk GPU test ids changed after the thirty-ninth session's device time (~120 s)
#   bash scripts/gpu_decode_calls.sh 69 SHA  # bwd_dk in Gluon in its three forms (gluon_dk 1-3): GPU tests, then tune_chunk
#                                            # with each beside the training default (~200 s)
#   bash scripts/gpu_decode_calls.sh 71 SHA  # call 69 at its shortest: form 3's GPU tests, tune_chunk 16K / 2K (~170 s)
#   bash scripts/gpu_decode_calls.sh 70 SHA  # the training default with gluon_dk=3: its GPU tests, attention.py (~250 s)
#   bash scripts/gpu_decode_calls.sh 59 SHA  # walk_pairs / walk_stages / maxnreg: GPU tests, tune_chunk 16K, 2K, SmolLM2 (~380 s)
#   bash scripts/gpu_decode_calls.sh 60 SHA  # dgamma_in_dq / delta_in_dq: GPU tests, tune_chunk 16K, 2K, SmolLM2 (~330 s)
#   bash scripts/gpu_decode_calls.sh 61 SHA  # overlap (GPU tests, 16K, 2K graph); evaluation's forward one-pass vs split at 16K /
#                                            # 2K / real heads (walk_stages 2 vs 3 there); fwd_blocks on 64 value columns (~420 s)
#   bash scripts/gpu_decode_calls.sh 55 SHA  # every chunk-kernel GPU test at that default, real heads (~490 s)
#   bash scripts/gpu_decode_calls.sh 56 SHA  # bwd_dk over 2-3 launches, blocks of 64, at the local_sums default (~260 s)
#   bash scripts/gpu_decode_calls.sh 57 SHA  # walk_tile: the chunk-sum walks on state tiles, one segment or the default (~330 s)
#   bash scripts/gpu_decode_calls.sh 58 SHA  # the walk_tile training default at B1 H32 16K and B4 H16 16K (~110 s)
#   bash scripts/gpu_decode_calls.sh 59 SHA  # walk_pairs / walk_stages, the block kernels' maxnreg: GPU tests, 16K, 2K, SmolLM2 (~380 s)
#   bash scripts/gpu_decode_calls.sh 46 SHA  # not decode: fwd_blocks / bwd_dq / bwd_dk on blocks of 64 (wgmma) one at a time
#                                            # (LaunchConfig.C_fwd / C_dk), bwd_dk over 2-3 launches (dk_launches), 16K and 2K (graph) by tune_chunk --blocks (~450 s)
#   bash scripts/gpu_decode_calls.sh 47 SHA  # call 46 cut to ~170 s (one test id, 5 configs at 16K, BV 128)
#   bash scripts/gpu_decode_calls.sh 48 SHA  # call 47 at its shortest (~80 s, no test): dk_launches 3 at 16K
#   bash scripts/gpu_decode_calls.sh 49 SHA  # the 64-column heads' new ring default (1 warp, BW 32, no prefetch) against the
#                                            # former in the whole compiled step: SmolLM2, Qwen2.5 (~260 s)
#   bash scripts/gpu_decode_calls.sh 50 SHA  # call 49 at its shortest: SmolLM2 new / former (~80 s)
#   bash scripts/gpu_decode_calls.sh 52 SHA  # 51's issue-5 part at its shortest, then call 50 (~330 s)
#   bash scripts/gpu_decode_calls.sh 53 SHA  # 52's 16K rows alone (~150 s)
#   bash scripts/gpu_decode_calls.sh 51 SHA  # call 49, then the training kernels' state chunk C = 128 (halves the kept
#                                            # chunk sums) and local_sums (no segment-sum passes): GPU test, 16K and
#                                            # 2K (graph) by tune_chunk (~560 s)
#   bash scripts/gpu_decode_calls.sh 38 SHA  # the 8B step with PDL in inductor's kernels, then the base and the step with
#                                            # every GEMM through cuBLASLt (~450 s)
#   bash scripts/gpu_decode_calls.sh 39 SHA  # cuBLASLt with multi_kernel, the step at the defaults, the base on cuBLASLt
#   bash scripts/gpu_decode_calls.sh 40 SHA  # Nsight Compute on the ring kernel (8B heads, issue 5; fold 8), BW 16 / 32
#   bash scripts/gpu_decode_calls.sh 41 SHA  # the ring kernel's mask-load and S-first experiments, each launch's duration
#                                            # under ncu (the folding step), the 8B step at BW 16 and its base
#   bash scripts/gpu_decode_calls.sh 42 SHA  # issue 5's decode row at the defaults, its heads in smaller chunks (~250 s)
#   bash scripts/gpu_decode_calls.sh 43 SHA  # the issue-5 heads' new defaults (FC 16, BW 16): GPU tests, the decode row,
#                                            # the sweep around them (~330 s)
#   bash scripts/gpu_decode_calls.sh 44 SHA  # after 43: 1 warp, BW 32 there: the decode row and the GPU tests (~280 s)
#   bash scripts/gpu_decode_calls.sh 45 SHA  # the 64-column heads (SmolLM2, Qwen2.5) in one wave: the launch sweep (~300 s)
#   bash scripts/gpu_decode_calls.sh 11 SHA  # that layout's compiled step at B=64 x 4096 (profiled), beside qwen-retr8's
#   bash scripts/gpu_decode_calls.sh 7 SHA   # not decode: the chunk kernels after LENGTH_ARGS (unspecialized batch and
#                                            # length ints in the forward): their GPU tests, the compiles over 16
#                                            # evaluation-like shapes (compile_count.py), and the default launch at
#                                            # 16K and 2K against the tenth session's 8.72 / 1.91 ms (no change expected)
#
# Everything goes to $OUT (logs, JSON, markdown); each step has its own timeout so that the call ends before
# the device's 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?call number 1 to 30}
sha=${2:-unknown}
out=${OUT:-$HOME/out}
mkdir -p "$out"
bash scripts/gpu_convert.sh --stage-only > "$out/stage.log" 2>&1 || true
export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gen() { python3 benchmarks/generate.py --model "${model:-benchmarks/configs/smollm2-135m.json}" --copy-to "$out" --commit "$sha" "$@"; }
# the chunk GPU tests as parallel pytest processes: JOBS TEST_TIMEOUT TOTAL_TIMEOUT [grep -v pattern]
chunk_tests() {
  local ids
  ids=$(python3 -m pytest --collect-only -q tests/gpu/test_chunk_cuda.py 2>/dev/null | grep "::" | grep -v "${4:-^$}")
  TEST_TIMEOUT=$2 TOTAL_TIMEOUT=$3 bash scripts/gpu_tests_parallel.sh "$out/tests.log" "$1" $ids
  sed -n '/=== summary/,$p' "$out/tests.log"
}
# the chunk kernels' default launch at 16K (forward, forward+backward) and 2K (also in CUDA graphs): SECONDS_16K SECONDS_2K
tune_default() {
  timeout "$1" python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --out "$out/tune-chunk-16k.json" \
    > "$out/tune-chunk-16k.log" 2>&1
  timeout "$2" python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default --nseg 0 --out "$out/tune-chunk-2k.json" \
    > "$out/tune-chunk-2k.log" 2>&1
  grep -hE "^C=|first call" "$out"/tune-chunk-*.log
}
# one decode row of another model: LOG SECONDS MODEL_CONFIG GEN_ARGS...
row() {
  local log=$1 secs=$2 m=$3; shift 3
  timeout "$secs" bash -c "$(declare -f gen); out=$out sha=$sha model=$m; gen ${*@Q}" > "$out/$log" 2>&1
  tail -8 "$out/$log"
}
# issue 5's decode row (ours against the plain torch step and SDPA decode; attention.py's targets printed):
# SECONDS BUDGET_S LINES
issue5_decode_row() {
  timeout "$1" python3 benchmarks/attention.py --quick --no-check --only ours,torch-linear,sdpa-decode-flash,sdpa-decode-cudnn \
    --groups decode --budget-s "$2" --rep-ms 60 --copy-to "$out" --commit "$sha" > "$out/attention-decode.log" 2>&1
  sed -n '/== targets/,$p' "$out/attention-decode.log" | head -"$3"
}
# the training default at a real model's heads, B8 x 1K, forward+backward in a CUDA graph, without and with
# local_sums: NAME H HKV (D 64, F 128)
local_heads() {
  timeout 75 python3 benchmarks/tune_chunk.py --T 1024 --B 8 --H "$2" --Hkv "$3" --D 64 --F 128 --graph \
    --shapes default --nseg 0 --intra 32x4 --intra-only --forms split+fold --local \
    --out "$out/tune-chunk-local-$1.json" > "$out/tune-chunk-local-$1.log" 2>&1
}
# seconds left of the call's budget (CALL_S, default 585), for rows that run only if they fit
left() { echo $((${CALL_S:-585} - SECONDS)); }
# the chunk GPU tests matching a -k expression, as parallel pytest processes: EXPR JOBS TEST_TIMEOUT
chunk_tests_k() {
  local ids
  ids=$(python3 -m pytest --collect-only -q tests/gpu/test_chunk_cuda.py -k "$1" 2>/dev/null | grep "::")
  TEST_TIMEOUT=$3 TOTAL_TIMEOUT=$(( $3 + 5 )) bash scripts/gpu_tests_parallel.sh "$out/tests-chunk.log" "$2" $ids
  sed -n '/=== summary/,$p' "$out/tests-chunk.log"
}
# issue 5's attention.py table at the current defaults: ours against cuDNN SDPA, FlexAttention and the composition's
# parts at 1K-16K and the decode step, in what is left of the call
attention_table() {
  timeout $(( $(left) - 5 )) python3 benchmarks/attention.py --quick --no-check \
    --only ours,sdpa-cudnn,flex-window,torch-linear,sdpa-decode-flash,sdpa-decode-cudnn --groups main,decode \
    --budget-s $(( $(left) - 40 )) --rep-ms 60 --copy-to "$out" --commit "$sha" > "$out/attention.log" 2>&1
  sed -n '/== targets/,$p' "$out/attention.log" | head -14
}
# launch options beside the training default (tune_chunk, split + fold on blocks of 32): at B4 H16 16K (profiled;
# plus the X16 array's arguments), at 2K in a CUDA graph, then at SmolLM2's heads B8 x 1K in a graph, the last two
# while the budget lasts: TAG SECONDS_16K SECONDS_2K TUNE_ARGS...
tune_opts() {
  local tag=$1 s16=$2 s2=$3; shift 3
  local opts=(--shapes default --nseg 0 --intra 32x4 --intra-only --forms split+fold "$@")
  timeout "$s16" python3 benchmarks/tune_chunk.py --T 16384 "${opts[@]}" "${X16[@]}" \
    --out "$out/tune-chunk-$tag-16k.json" > "$out/tune-chunk-$tag-16k.log" 2>&1
  grep -HE "^C=|first call" "$out/tune-chunk-$tag-16k.log"
  [ "$(left)" -gt 40 ] || return 0
  timeout "$s2" python3 benchmarks/tune_chunk.py --T 2048 --graph "${opts[@]}" --out "$out/tune-chunk-$tag-2k.json" \
    > "$out/tune-chunk-$tag-2k.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-$tag-2k.log"
  [ "$(left)" -gt 40 ] || return 0
  timeout $(( $(left) < 60 ? $(left) - 5 : 55 )) python3 benchmarks/tune_chunk.py --T 1024 --B 8 --H 9 --Hkv 3 --D 64 \
    --F 128 --graph "${opts[@]}" --out "$out/tune-chunk-$tag-smollm2.json" > "$out/tune-chunk-$tag-smollm2.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-$tag-smollm2.log"
}
X16=()
QWEN=benchmarks/configs/qwen2.5-coder-0.5b.json
HEADS3=(--set 'softmax_heads=[[9,1],[16,0],[16,1]]' --set feature_map_per_kv_head=true --set sink_tokens=4 --set feature_rope=false)
RETR10=(--set 'softmax_layers=[7,8,14,15,17,18,20,21,22,23]' --set sink_tokens=4 --set feature_rope=false)
RETR8=(--set 'softmax_layers=[3,7,9,11,13,14,16,17]' --set sink_tokens=4 --set feature_rope=false)
# issue 6's decode floor on Qwen (random weights, B=64 x 4096): all linear and qwen-retr8's layout compiled (profiled),
# the base's lean loop
qwen_floor_rows() {
  row qwen-linear.log 110 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 95
  row qwen-retr8.log 110 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 95 "${RETR8[@]}"
  row qwen-base.log 110 "$QWEN" --loops lean --models base --batches 64 --no-fit --budget-s 95
}
# call 61's / 62's rows: evaluation's / prefill's forward, one-pass (evaluation's default) against the training
# default's split forward, at B4 H16 16K and 2K, SmolLM2's heads B8 x 1K and B1 x 16K and Qwen2.5's B8 x 1K (at the
# heads also walk_stages 2 against 3, in a CUDA graph); then fwd_blocks on 64 value columns at 16K and 2K (graph),
# each while the budget lasts
eval_and_bv_rows() {
  [ "$(left)" -gt 60 ] || return 0
  EVAL=(--shapes default --nseg 0 --intra 32x4 --intra-only --forms split+fold,one-pass --skip)
  timeout $(( $(left) < 85 ? $(left) - 5 : 80 )) python3 benchmarks/tune_chunk.py --T 16384 "${EVAL[@]}" --out "$out/tune-chunk-eval-16k.json" \
    > "$out/tune-chunk-eval-16k.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-eval-16k.log"
  [ "$(left)" -gt 30 ] || return 0
  timeout $(( $(left) < 45 ? $(left) - 5 : 40 )) python3 benchmarks/tune_chunk.py --T 2048 "${EVAL[@]}" --out "$out/tune-chunk-eval-2k.json" \
    > "$out/tune-chunk-eval-2k.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-eval-2k.log"
  for m in "smollm2 9 3 8 1024" "smollm2-16k 9 3 1 16384" "qwen 14 2 8 1024"; do
    set -- $m
    [ "$(left)" -gt 30 ] || return 0
    timeout $(( $(left) < 60 ? $(left) - 5 : 55 )) python3 benchmarks/tune_chunk.py --T $5 --B $4 --H $2 --Hkv $3 \
      --D 64 --F 128 --graph "${EVAL[@]}" --walk-opts s2 --out "$out/tune-chunk-eval-$1.json" \
      > "$out/tune-chunk-eval-$1.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-eval-$1.log"
  done
  OPTS=(--shapes default,64x64x8x2 --nseg 0 --intra 32x4 --intra-only --forms split+fold --blocks fwd64x8)
  [ "$(left)" -gt 60 ] || return 0
  timeout $(( $(left) < 105 ? $(left) - 5 : 100 )) python3 benchmarks/tune_chunk.py --T 16384 "${OPTS[@]}" \
    --out "$out/tune-chunk-bv-16k.json" > "$out/tune-chunk-bv-16k.log" 2>&1
  grep -HE "^C=|first call" "$out/tune-chunk-bv-16k.log"
  [ "$(left)" -gt 30 ] || return 0
  timeout $(( $(left) < 55 ? $(left) - 5 : 50 )) python3 benchmarks/tune_chunk.py --T 2048 --graph "${OPTS[@]}" \
    --out "$out/tune-chunk-bv-2k.json" > "$out/tune-chunk-bv-2k.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-bv-2k.log"
}
# the block kernels' software-pipeline depth (num_stages: 2 in the default, first timed on blocks of 32 with
# skip_empty in call 65, whose loops run 1-2 blocks each), 1 and 3 beside it, at 16K and at 2K in a CUDA graph, each
# while the budget lasts: SECONDS_16K SECONDS_2K (each at most what is left less 5)
stages_rows() {
  local stg=(--shapes default,64x128x8x1,64x128x8x3 --nseg 0 --intra 32x4 --intra-only --forms split+fold)
  [ "$(left)" -gt 40 ] || return 0
  timeout $(( $(left) - 5 < $1 ? $(left) - 5 : $1 )) python3 benchmarks/tune_chunk.py --T 16384 "${stg[@]}" \
    --out "$out/tune-chunk-stages-16k.json" > "$out/tune-chunk-stages-16k.log" 2>&1
  grep -HE "^C=|first call" "$out/tune-chunk-stages-16k.log"
  [ "$(left)" -gt 30 ] || return 0
  timeout $(( $(left) - 5 < $2 ? $(left) - 5 : $2 )) python3 benchmarks/tune_chunk.py --T 2048 --graph "${stg[@]}" \
    --out "$out/tune-chunk-stages-2k.json" > "$out/tune-chunk-stages-2k.log" 2>&1
  grep -HE "^C=" "$out/tune-chunk-stages-2k.log"
}
case "$call" in
  1)
    timeout 200 python3 -m pytest -q -x tests/gpu/test_softmax_decode_cuda.py tests/gpu/test_decode_cuda.py \
      -k "softmax or compiled_decode or map_kernel or chunks or launch_configs" 2>&1 | tail -30 | tee "$out/tests.log"
    timeout 230 python3 benchmarks/tune_decode.py --presets smollm2,issue5,gemma3 --quick --commit "$sha" --copy-to "$out" \
      > "$out/tune.log" 2>&1
    grep -E "^  maps|default|FC|^smollm2|^issue5|^gemma3" "$out/tune.log"
    ;;
  2)
    timeout 120 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models ours --batches 64 --no-fit \
      --profile-steps 10 --budget-s 100" > "$out/bench-4k.log" 2>&1
    tail -24 "$out/bench-4k.log"
    timeout 150 bash -c "$(declare -f gen); out=$out sha=$sha; gen --tokens 16384 --loops compiled --models ours \
      --batches 64 --no-fit --budget-s 130" > "$out/bench-16k.log" 2>&1
    tail -12 "$out/bench-16k.log"
    timeout 150 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models ours --batches 64 --no-fit \
      --budget-s 130 ${RETR10[*]@Q}" > "$out/bench-retr10.log" 2>&1
    tail -12 "$out/bench-retr10.log"
    ;;
  3)
    # ours and the base at 16K new tokens in one run (the base alone takes ~320 s)
    timeout 530 bash -c "$(declare -f gen); out=$out sha=$sha; gen --tokens 16384 --loops compiled,lean --models ours,base \
      --batches 64 --no-fit --budget-s 510" > "$out/bench-16k.log" 2>&1
    tail -20 "$out/bench-16k.log"
    ;;
  4)
    timeout 250 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean --models ours,base --batches 64 --budget-s 240" \
      > "$out/fit-all-linear.log" 2>&1
    tail -30 "$out/fit-all-linear.log"
    timeout 250 bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean --models ours --batches 64 --budget-s 240 \
      --set feature_map_per_kv_head=true" > "$out/fit-kvmaps.log" 2>&1
    tail -30 "$out/fit-kvmaps.log"
    ;;
  5)
    timeout 200 python3 benchmarks/tune_chunk.py --T 16384 --nseg 0,32 --one-acc --shapes default,64x64x8x2 \
      --out "$out/tune-chunk-16k.json" > "$out/tune-chunk-16k.log" 2>&1
    grep -E "^C=|first call|best" "$out/tune-chunk-16k.log"
    timeout 150 python3 benchmarks/tune_chunk.py --T 2048 --graph --nseg 0,16 --one-acc --shapes default,64x64x8x2 \
      --out "$out/tune-chunk-2k.json" > "$out/tune-chunk-2k.log" 2>&1
    grep -E "^C=|first call|best" "$out/tune-chunk-2k.log"
    ;;
  6)
    timeout ${T1:-270} bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops compiled --models ours --batches 1,16,64,256 \
      --no-fit --budget-s $((${T1:-270} - 20))" > "$out/bench-batches-ours.log" 2>&1
    tail -12 "$out/bench-batches-ours.log"
    timeout ${T2:-250} bash -c "$(declare -f gen); out=$out sha=$sha; gen --loops lean --models base --batches 1,16,64,256 \
      --no-fit --budget-s $((${T2:-250} - 20))" > "$out/bench-batches-base.log" 2>&1
    tail -12 "$out/bench-batches-base.log"
    ;;
  8)
    chunk_tests 14 300 330
    # the default launch with the segment prefix in one Triton pass (was torch's cumsum, flips and subtractions:
    # 0.35 ms at 16K and 0.18 ms at 2K in the twelfth session's profile)
    tune_default 90 70
    ;;
  7)
    # 17 tests of ~45-80 s each (compile-bound): one pytest process each, 12 at a time (one process in 200 s ran
    # 3); the 16 fp32 ids take call 8
    chunk_tests 12 200 230 fp32
    timeout 100 python3 benchmarks/compile_count.py --copy-to "$out" --commit "$sha" 2>&1 | tee "$out/compile-count.log" | tail -3
    tune_default 120 90
    ;;
  9)
    # The floor ratio depends on the model: SmolLM2-135M's M=64 GEMMs are latency-bound (0.53 of its 1.50 ms step),
    # the larger models' read more weight per launch. Layouts: configs/ablations/qwen2.5-coder-0.5b-retrieval8-*.yaml
    # and configs/gemma3-270m-retrieval.yaml.
    g=benchmarks/configs/gemma3-270m.json
    qwen_floor_rows
    row gemma-retr2.log 100 "$g" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 85 \
      --set 'softmax_layers=[5,11]' --set sink_tokens=4 --set feature_rope=false
    row gemma-base.log 100 "$g" --loops lean --models base --batches 64 --no-fit --budget-s 85
    ;;
  10)
    timeout 100 python3 -m pytest -q -x tests/gpu/test_decode_cuda.py -k "kept-heads" 2>&1 | tail -5 | tee "$out/tests.log"
    timeout 90 python3 -m pytest -q tests/gpu/test_feature_maps_cuda.py 2>&1 | tail -5 | tee -a "$out/tests.log"
    timeout 100 python3 benchmarks/train_step.py --model benchmarks/configs/smollm2-135m.json --batch 8 --seq-len 1024 \
      --steps 10 --warmup 3 --profile 0 --map-kernel both --out "$out/train-step-maps" > "$out/train-step-maps.log" 2>&1
    grep -E "^\| [12] \|" "$out/train-step-maps.log"
    row qwen-heads3-fit.log 280 "$QWEN" --loops lean --models ours,base --batches 64 --fit-time-s 70 --budget-s 265 "${HEADS3[@]}"
    ;;
  11)
    row qwen-heads3.log 200 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 185 "${HEADS3[@]}"
    row qwen-retr8.log 200 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 185 "${RETR8[@]}"
    ;;
  12)
    # the fifteenth session's segfault in call 10's heads3 row: a static cache (layer 16 keeps both KV heads, so
    # the layout has a kept layer) left the kept heads' buffers at the prefill's size and the graph's replays
    # wrote past them (fixed: a static cache sizes them for its whole length). The regression test, then the
    # row again under faulthandler.
    export PYTHONFAULTHANDLER=1
    timeout 100 python3 -m pytest -q tests/gpu/test_generate_bench_cuda.py -k "kept_layers_and_heads or graph_replay" 2>&1 \
      | tail -3 | tee "$out/tests.log"
    row qwen-heads3-fit.log 300 "$QWEN" --loops lean --models ours,base --batches 64 --fit-time-s 70 --budget-s 285 "${HEADS3[@]}"
    grep -A30 "Fatal Python error" "$out/qwen-heads3-fit.log" | head -40
    ;;
  13)
    # call 9's Qwen rows alone (issue 6's decode floor on a model whose GEMMs read more weight a launch)
    qwen_floor_rows
    ;;
  14)
    # the floor's GEMM part (issue 6): Qwen all linear, compiled, with inductor's GEMM templates tuned for M = 64
    # (max-autotune-no-cudagraphs; cuBLAS ran these at 2-3.5x their weight-read time) against call 13's 1.818 ms
    row qwen-linear-autotune.log 420 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 \
      --compile-mode max-autotune-no-cudagraphs --budget-s 400
    ;;
  15)
    # issue 6's decode goals at LoLCATs' headline size, LoLCATs' layout: a random-weight Llama-3.1-8B architecture
    # (32 layers, 32 / 8 heads of 128; 16 GB of weights, so weight reads dominate a step as they do not at 135M-0.5B),
    # all linear with key maps per query head, compiled, B = 64 x 4096 and the largest batch at 4096 (an 8B probe
    # prefills up to thousands of rows at 2 TFLOP a token row). The base's rows are call 16's (run it first); the GPU
    # test of GPU-drawn random weights first
    l=benchmarks/configs/llama3.1-8b.json
    timeout 60 python3 -m pytest -q tests/gpu/test_generate_bench_cuda.py -k "random_weights" 2>&1 | tail -2 | tee "$out/tests.log"
    row llama8b-ours.log 300 "$l" --loops compiled --models ours --batches 64 --fit-time-s 90 --profile-steps 5 --budget-s 285
    ;;
  16)
    # the 8B base (lean loop, B = 64 x 4096 and its largest batch on a static and a grown DynamicCache), then ours
    # with key maps per KV head in its own process (one 8B model each): the >= 8x largest batch at LoLCATs' size
    # (linearize.cache_bytes at 4224 tokens: 28.3 MiB a sequence against the base's KV cache of 528.0, a bound of
    # 18.7x; the default layout's 89.0, 5.9x, is call 15's)
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-base.log 250 "$l" --loops lean --models base --batches 64 --fit-time-s 60 --budget-s 235
    row llama8b-kvmaps.log 300 "$l" --loops compiled --models ours --batches 64 --fit-time-s 120 --profile-steps 5 --budget-s 285 \
      --set feature_map_per_kv_head=true
    ;;
  17)
    # the ring kernel with its S chunks loaded one step ahead (PREFETCH; seventeenth session, CPU only): its GPU tests,
    # the launch sweep's P rows at Qwen's shape (SmolLM2's has the same D and F) and issue 5's (~30 launches a preset,
    # each compiled once: ~1 s), then Qwen's compiled all-linear step without and with it (LINEARIZE_DECODE_PREFETCH=0 / 1;
    # call 13: 1.818 ms, the ring kernel 24.4 us a layer)
    timeout 90 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "row_chunks and True" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 230 python3 benchmarks/tune_decode.py --presets qwen2.5,issue5 --quick --commit "$sha" --copy-to "$out" \
      > "$out/tune.log" 2>&1
    grep -E "^  maps|default| P|^qwen2.5|^issue5" "$out/tune.log"
    (export LINEARIZE_DECODE_PREFETCH=0
     row qwen-linear.log 110 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 95)
    (export LINEARIZE_DECODE_PREFETCH=1
     row qwen-linear-prefetch.log 110 "$QWEN" --loops compiled --models ours --batches 64 --no-fit --profile-steps 10 --budget-s 95)
    ;;
  18)
    # training with its decoder layers through torch.compile (compile=true; under it the chunk kernels run as custom
    # ops): the compiled-vs-eager GPU test (the chunk GPU tests moved to call 19), then SmolLM2's step at 8 x 1024,
    # eager and compiled, stage 2 on KL + CE as issue 6's conversions; eager: stage 1 117 ms, stage 2 240 ms (CE only,
    # results/train-step-maps-h200-20261205, GPU busy ~21-27% in November)
    timeout 120 python3 -m pytest -q tests/gpu/test_compile_cuda.py 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 330 python3 benchmarks/train_step.py --model benchmarks/configs/smollm2-135m.json --batch 8 --seq-len 1024 \
      --steps 10 --warmup 3 --profile 2 --compile both --kl-weight 1.0 --out "$out/train-step-compile" \
      > "$out/train-step-compile.log" 2>&1
    grep -E "^\| [12] \|" "$out/train-step-compile.log"
    ;;
  19)
    # issue 5's 16K forward+backward, three changes built on the CPU in the nineteenth session (sm_90: the heavy
    # kernels at 255 registers run one program an SM): the backward's intra kernels on blocks smaller than the chunk
    # (LaunchConfig.C_intra / warps_intra: 2-4 programs an SM), the forward in two passes (split_forward: each chunk's
    # running sums written down, then one light program a block of queries) and the backward without its two
    # running-sum walks (fold_backward). The chunk GPU tests but fp32 first (test_intra_blocks among them; the eager
    # path no longer builds a zero initial state), then tune_chunk at 16K and at 2K (CUDA graph) beside the default
    # (16K 8.62 ms, 2K graph 1.23)
    chunk_tests 12 150 170 "fp32\|float32"
    timeout 200 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4,16x4,16x2 \
      --forms one-pass,split+fold --out "$out/tune-chunk-intra-16k.json" > "$out/tune-chunk-intra-16k.log" 2>&1
    timeout 160 python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default --nseg 0 --intra 32x4,16x4,16x2 \
      --forms one-pass,split+fold --out "$out/tune-chunk-intra-2k.json" > "$out/tune-chunk-intra-2k.log" 2>&1
    grep -hE "^C=|first call|^best" "$out"/tune-chunk-intra-*.log
    ;;
  20)
    # call 19 cut to fit ~350 s: its new GPU tests only (test_intra_blocks), then the 16K sweep alone
    ids=$(python3 -m pytest --collect-only -q tests/gpu/test_chunk_cuda.py 2>/dev/null | grep "::test_intra_blocks")
    TEST_TIMEOUT=120 TOTAL_TIMEOUT=130 bash scripts/gpu_tests_parallel.sh "$out/tests.log" 12 $ids
    sed -n '/=== summary/,$p' "$out/tests.log"
    timeout 200 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4,16x4,16x2 \
      --forms one-pass,split+fold --out "$out/tune-chunk-intra-16k.json" > "$out/tune-chunk-intra-16k.log" 2>&1
    grep -hE "^C=|first call|^best" "$out"/tune-chunk-intra-*.log
    ;;
  21)
    # after the twentieth session (H100): the compile test in its new form (compiled and eager bf16 steps each
    # against the same step in fp32), the chunk GPU tests but fp32 at the new default launch (the backward folded
    # on blocks of 32 where C = 64), and that default at 16K and 2K (H100: 7.87 ms, 2K graph 1.15)
    timeout 150 python3 -m pytest -q tests/gpu/test_compile_cuda.py -p no:logging 2>&1 | grep -v DEBUG | tail -5 \
      | tee "$out/tests-compile.log"
    chunk_tests 12 150 170 "fp32\|float32"
    tune_default 120 100
    # split + fold now keeps the forward's chunk sums for the backward (no second walk: 0.48 ms of the 7.87 at 16K)
    timeout 120 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 --forms fold,split+fold \
      --out "$out/tune-chunk-keep-16k.json" > "$out/tune-chunk-keep-16k.log" 2>&1
    grep -hE "^C=|first call" "$out"/tune-chunk-*.log
    ;;
  22)
    # the ring kernel at the 8B's heads: key maps per KV head (4 query heads a feature head; H100 whole step: 69 us
    # a layer against 22 to read and write S) now also with S in row chunks (its GPU test first), and LoLCATs' layout
    timeout 120 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "several_query_heads" 2>&1 | tail -3 \
      | tee "$out/tests-decode.log"
    timeout 150 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps,llama8b --quick --commit "$sha" \
      --copy-to "$out" > "$out/tune.log" 2>&1
    grep -E "default|best|^llama" "$out/tune.log"
    ;;
  23)
    # the ring kernel with a KV head's query heads as the rows of tensor-core dots (heads_dot; twenty-first
    # session, CPU only): its GPU test, the sweep at the 8B's heads with key maps per KV head (H200: 45.8 us at the
    # default, FC 64 at 2 warps, against a 20.4 us floor) and without a window (the window part's share), then the
    # whole 8B step without and with it (call 16 on the H200: 6.658 ms, 1.59x its floor)
    timeout 80 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "rows_of_dots" 2>&1 | tail -3 \
      | tee "$out/tests-decode.log"
    timeout 200 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps,llama8b-kvmaps-nowindow,qwen2.5-kvmaps \
      --quick --match 'w[24] .*FC(32|64)( H)?$' --commit "$sha" --copy-to "$out" > "$out/tune.log" 2>&1
    grep -E " us |^llama|^qwen" "$out/tune.log"
    l=benchmarks/configs/llama3.1-8b.json
    (export LINEARIZE_DECODE_HEADS_DOT=0
     row llama8b-kvmaps.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 --budget-s 105 \
       --set feature_map_per_kv_head=true)
    (export LINEARIZE_DECODE_HEADS_DOT=1
     row llama8b-kvmaps-dot.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
       --budget-s 105 --set feature_map_per_kv_head=true)
    ;;
  24)
    # the 8B step's GEMMs (issue 6's floor): with key maps per KV head, compiled with inductor's GEMM templates tuned
    # for M = 64 (max-autotune-no-cudagraphs); call 16's profile had cuBLAS at 1.27x the weights' read time (o_proj
    # at ~53% of copy bandwidth)
    row llama8b-kvmaps-autotune.log 520 benchmarks/configs/llama3.1-8b.json --loops compiled --models ours --batches 64 \
      --no-fit --profile-steps 5 --compile-mode max-autotune-no-cudagraphs --budget-s 500 --set feature_map_per_kv_head=true
    ;;
  25)
    # not decode: issue 5's table at the current defaults (training: split + fold with the kept chunk sums), ours
    # against cuDNN SDPA and FlexAttention at 2K / 16K and the decode step, then the split forward's block size
    # (fwd_blocks_kernel on blocks of C_intra rows: 32 x 4 warps is the default) at 16K (~420 s); first the memory
    # test and one real model's heads at the training default (split + fold with the kept sums since 79c31c9)
    timeout 90 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "long_sequence_memory or real_model_head_shapes and qwen" \
      2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 230 python3 benchmarks/attention.py --quick --no-check --only ours,sdpa-cudnn,flex-window,torch-linear,sdpa-decode-flash,sdpa-decode-cudnn \
      --groups main,decode --budget-s 200 --rep-ms 60 --copy-to "$out" --commit "$sha" > "$out/attention.log" 2>&1
    sed -n '/== targets/,$p' "$out/attention.log" | head -14
    timeout 110 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4,32x8,16x4,64x8 \
      --forms split+fold --out "$out/tune-chunk-split-16k.json" > "$out/tune-chunk-split-16k.log" 2>&1
    grep -hE "^C=|first call" "$out"/tune-chunk-split-16k.log
    ;;
  26)
    # not decode: skip_empty (twenty-second session, CPU only): the window / near-linear / intra-backward loops split
    # by block distance so that a block pair's window or linear part with no pair of positions in it is not computed
    # (~1/3 of fwd_blocks' products at W = 64 on blocks of 32, ~1/4 of bwd_dq's / bwd_dk's). Its GPU test, then
    # each default launch without and with it: 16K (training: split + fold; evaluation's one-pass forward), 2K in
    # a CUDA graph, and SmolLM2's and Qwen2.5's heads at B8 x 1K in a CUDA graph (~500 s at most)
    # (8 configs at 16K: {one-pass, split+fold} x {C 64, intra 32 x 4} x {off, on}, each compiled on first use)
    timeout 120 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "skip_empty" 2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 190 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 \
      --forms split+fold,one-pass --skip --out "$out/tune-chunk-skip-16k.json" > "$out/tune-chunk-skip-16k.log" 2>&1
    timeout 70 python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default --nseg 0 --intra 32x4 \
      --forms split+fold --skip --out "$out/tune-chunk-skip-2k.json" > "$out/tune-chunk-skip-2k.log" 2>&1
    timeout 55 python3 benchmarks/tune_chunk.py --T 1024 --B 8 --H 9 --Hkv 3 --D 64 --F 128 --graph --shapes default \
      --nseg 0 --intra 32x4 --forms split+fold --skip --out "$out/tune-chunk-skip-smollm2.json" \
      > "$out/tune-chunk-skip-smollm2.log" 2>&1
    timeout 55 python3 benchmarks/tune_chunk.py --T 1024 --B 8 --H 14 --Hkv 2 --D 64 --F 128 --graph --shapes default \
      --nseg 0 --intra 32x4 --forms split+fold --skip --out "$out/tune-chunk-skip-qwen.json" \
      > "$out/tune-chunk-skip-qwen.log" 2>&1
    grep -HE "^C=|first call" "$out"/tune-chunk-skip-*.log
    ;;
  27|28)
    # deferred folding (twenty-third session, CPU only): S read every step, written every P-th; the keys waiting in
    # between read out as linear terms. Its GPU test, the ring kernel's default launch at P = 1, 4, 8, 16, 32 at four
    # models' heads, then the 8B step (key maps per KV head) at P = 1 and 16 in one call (~540 s at most)
    timeout 110 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "deferred_folding" 2>&1 | tail -3 \
      | tee "$out/tests-decode.log"
    timeout 170 python3 benchmarks/tune_decode.py --presets issue5,llama8b-kvmaps,smollm2,qwen2.5-kvmaps --quick \
      --match '^$' --fold 1,4,8,16,32 --rep-ms 30 --commit "$sha" --copy-to "$out" > "$out/tune.log" 2>&1
    grep -E " us |^llama|^qwen|^issue5|^smollm2" "$out/tune.log"
    [ "$call" = 28 ] && { (cd "$out" && tar czf "decode-call$call.tar.gz" $(ls -A) && find . -type f ! -name "*.tar.gz" -delete); ls -la "$out"; exit 0; }
    l=benchmarks/configs/llama3.1-8b.json
    (export LINEARIZE_DECODE_FOLD=1
     row llama8b-kvmaps.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 --budget-s 105 \
       --set feature_map_per_kv_head=true)
    (export LINEARIZE_DECODE_FOLD=16
     row llama8b-kvmaps-fold16.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
       --budget-s 105 --set feature_map_per_kv_head=true)
    ;;
  29)
    # twenty-fourth session: the decode defaults chosen from call 27 (heads_dot wherever it applies; fold 8 at
    # 128-column heads with F > 64): the GPU tests of the dot rows and CompiledDecode at them, then the 8B step
    # (key maps per KV head) at the new defaults and at the old ones (fold 1, no dots), and the 8B base's lean
    # loop again on the same machine (its tokens/s is the >= 3x goal's denominator; ~520 s)
    timeout 120 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "rows_of_dots or compiled_decode" 2>&1 | tail -3 \
      | tee "$out/tests-decode.log"
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps.log 125 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 --budget-s 110 \
      --set feature_map_per_kv_head=true
    (export LINEARIZE_DECODE_FOLD=1 LINEARIZE_DECODE_HEADS_DOT=0
     row llama8b-kvmaps-old.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --budget-s 105 \
       --set feature_map_per_kv_head=true)
    row llama8b-base.log 150 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 135
    ;;
  30)
    # twenty-fourth session: fused projections with the weights moved in place (no copy; so now on at 8B too):
    # their GPU tests, then the 8B step (key maps per KV head) fused and unfused in one call, the 8B base again
    # where the card is not call 29's H100 (the >= 3x goal's denominator), and the fused step with max-autotuned
    # GEMMs, each only if what is left of CALL_S (default 585 s) holds it (call 29, H100: 8.262 ms unfused)
    timeout 70 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "compiled_decode and (fused or fuses)" 2>&1 | tail -3 \
      | tee "$out/tests-decode.log"
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps-fused.log 125 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
      --budget-s 110 --set feature_map_per_kv_head=true
    [ "$(left)" -gt 115 ] && row llama8b-kvmaps-unfused.log 115 "$l" --loops compiled --models ours --batches 64 --no-fit \
      --budget-s 100 --no-fuse-projections --set feature_map_per_kv_head=true
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { [ "$(left)" -gt 135 ] \
      && row llama8b-base.log 135 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 120; }
    [ "$(left)" -gt 120 ] && row llama8b-kvmaps-fused-autotune.log "$(left)" "$l" --loops compiled --models ours \
      --batches 64 --no-fit --profile-steps 5 --compile-mode max-autotune-no-cudagraphs --budget-s $(($(left) - 15)) \
      --set feature_map_per_kv_head=true
    ;;
  31)
    # twenty-fifth session: the >= 3x goal's two rows on one machine (call 30's H100 had no base beside its fused
    # 7.573 ms): the 8B base's lean loop, then ours fused (key maps per KV head; ~300 s)
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-base.log 150 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 135
    row llama8b-kvmaps-fused.log 125 "$l" --loops compiled --models ours --batches 64 --no-fit --budget-s 110 \
      --set feature_map_per_kv_head=true
    ;;
  32)
    # twenty-fifth session's call 5 again, with a budget so that it writes its files: the ring kernel's launches at
    # the 8B's heads (key maps per KV head) with S written every 8th step (the default there); its tail had BD 64
    # at 43.7 us, which may beat the default BD 128 (~200 s)
    timeout 230 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps --quick --fold 8 --budget-s 170 \
      --commit "$sha" --copy-to "$out" 2>&1 | grep -v Warning | tail -40 > "$out/tune-decode.log"
    tail -40 "$out/tune-decode.log"
    ;;
  33)
    # twenty-fifth session: RoPE inside the map kernel (CompiledDecode(fuse_rope=True), off by default until this): its GPU
    # tests, then the 8B step (key maps per KV head, fused projections) with it, the base on the same machine (the
    # >= 3x goal: 7.568 ms against 21.843 on call 31's H100), and the step without it if CALL_S (585) leaves room
    timeout 80 python3 -m pytest -q tests/gpu/test_feature_maps_cuda.py -k rope 2>&1 | tail -3 | tee "$out/tests-rope.log"
    timeout 120 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "compiled_decode_equals and triton and (linear or rope)" \
      2>&1 | tail -3 | tee -a "$out/tests-rope.log"
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps-rope.log 125 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
      --budget-s 110 --fuse-rope --set feature_map_per_kv_head=true
    row llama8b-base.log 150 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 135
    [ "$(left)" -gt 100 ] && row llama8b-kvmaps-norope.log "$(left)" "$l" --loops compiled --models ours --batches 64 \
      --no-fit --budget-s $(($(left) - 15)) --set feature_map_per_kv_head=true
    ;;
  34)
    # twenty-sixth session: the ring kernel taking the window weight's logits (no sigmoid kernel a layer) and the RoPE +
    # maps kernel's launch at the 8B's heads: GPU tests of the module decode paths (the logits pass through them); the
    # RoPE rows of tune_decode (every rows x warps; the default ring launch only); the 8B step at the defaults
    # (profiled), then at the sweep's fastest RoPE launch if that is not the default; the base on the same machine
    # (the >= 3x goal; call 33's H100: 7.646 against 22.431 ms; ~500 s)
    timeout 150 python3 -m pytest -q tests/gpu/test_decode_cuda.py -k "compiled_decode or model_decode or generate or sink or length_norm" \
      2>&1 | tail -3 | tee "$out/tests-decode.log"
    timeout 120 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps --rope-sweep --match '^$' --budget-s 90 \
      --commit "$sha" --copy-to "$out" 2>&1 | grep -v Warning | tail -24 > "$out/tune-rope.log"
    cat "$out/tune-rope.log"
    best=$(python3 - "$out" <<'PY'
import glob, json, re, sys
rows = [r for f in glob.glob(sys.argv[1] + "/tune-decode-*.json") for r in json.load(open(f))["rows"]]
rope = [r for r in rows if r["row"].startswith("rope+maps: triton BR") and "ms" in r and r.get("rel_err", 1) < 2e-2]
if rope:
    br, w = re.search(r"BR(\d+) w(\d+)", min(rope, key=lambda r: r["ms"])["row"]).groups()
    print(f"{br},{w}" if rope[0]["row"] != f"rope+maps: triton BR{br} w{w}" else "")
PY
)
    echo "fastest RoPE launch (if not the default): ${best:-none}"
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps.log 125 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
      --budget-s 110 --set feature_map_per_kv_head=true
    [ -n "$best" ] && LINEARIZE_ROPE_LAUNCH=$best row "llama8b-kvmaps-rope${best/,/-}.log" 110 "$l" --loops compiled \
      --models ours --batches 64 --no-fit --budget-s 95 --set feature_map_per_kv_head=true
    row llama8b-base.log 150 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 135
    ;;
  37)
    # twenty-sixth session: issue 6's 3x at 8B is 80 us short (7.381 against 21.904 ms on one H100). The step's 65 RMSnorms
    # are looped (two-pass) inductor reductions of 2.9 us each (a row of 4096 is over inductor's persistent threshold of
    # 1024): the base and the 8B step at the defaults (profiled), then with multi_kernel (inductor benchmarks a persistent
    # version beside each reduction and keeps the faster) and with cooperative reductions (a row's reduction split over
    # thread blocks), profiled, each if CALL_S (585) leaves room (~500 s)
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-base.log 150 "$l" --loops lean --models base --batches 64 --no-fit --budget-s 135
    row llama8b-kvmaps.log 110 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
      --budget-s 95 --set feature_map_per_kv_head=true
    [ "$(left)" -gt 130 ] && row llama8b-kvmaps-multikernel.log 130 "$l" --loops compiled --models ours --batches 64 \
      --no-fit --profile-steps 5 --budget-s 115 --inductor triton.multi_kernel=1 --set feature_map_per_kv_head=true
    [ "$(left)" -gt 110 ] && row llama8b-kvmaps-coop.log "$(left)" "$l" --loops compiled --models ours --batches 64 \
      --no-fit --profile-steps 5 --budget-s $(($(left) - 15)) --inductor triton.cooperative_reductions=True \
      --set feature_map_per_kv_head=true
    ;;
  38)
    # twenty-seventh session: the launch gaps (0.22 ms of 7.60 in 334 launches) and the skinny GEMMs (M = 64). The 8B step
    # with programmatic dependent launch in inductor's kernels (each starts while the one before drains), then the base
    # and the step with every GEMM through cuBLASLt (both models: the ratio stays fair), profiled (~450 s)
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps-pdl.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --profile-steps 5 \
      --budget-s 105 --inductor triton.enable_pdl=True --set feature_map_per_kv_head=true
    [ "$(left)" -gt 150 ] && row llama8b-base-lt.log 150 "$l" --loops lean --models base --batches 64 --no-fit \
      --budget-s 135 --blas cublaslt
    [ "$(left)" -gt 110 ] && row llama8b-kvmaps-lt.log "$(left)" "$l" --loops compiled --models ours --batches 64 \
      --no-fit --profile-steps 5 --budget-s $(($(left) - 15)) --blas cublaslt --set feature_map_per_kv_head=true
    ;;
  39)
    # twenty-seventh session, after 37-38 on one warm H100: cuBLASLt and multi_kernel together, the step at the defaults
    # (call 37's first row was skipped by its budget), the base on cuBLASLt again (~350 s at CALL_S=470)
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps-lt-mk.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --budget-s 105 \
      --blas cublaslt --inductor triton.multi_kernel=1 --set feature_map_per_kv_head=true
    row llama8b-kvmaps-default.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --budget-s 105 \
      --set feature_map_per_kv_head=true
    [ "$(left)" -gt 140 ] && row llama8b-base-lt2.log 140 "$l" --loops lean --models base --batches 64 --no-fit \
      --budget-s 125 --blas cublaslt
    ;;
  40)
    # twenty-eighth session: where the ring kernel's time goes at the 8B's heads and issue 5's (fold 8), by Nsight
    # Compute (every section, per-instruction stall samples), then the window block (BW 16 / 32) beside the default
    # (~350 s)
    ncu --version | tail -1
    for p in llama8b-kvmaps issue5; do
      timeout 150 ncu --clock-control none -k regex:_decode_kernel -s 8 -c 8 --set full --import-source yes \
        -o "$out/ncu-$p" python3 benchmarks/profile_decode.py --preset "$p" --fold 8 > "$out/ncu-$p.log" 2>&1
      tail -3 "$out/ncu-$p.log"
      ncu -i "$out/ncu-$p.ncu-rep" --page details > "$out/ncu-$p-details.txt" 2>&1
      ncu -i "$out/ncu-$p.ncu-rep" --page source --csv --print-source sass > "$out/ncu-$p-sass.csv" 2>&1
      grep -E "Duration|Registers Per|Achieved Occupancy|Memory Throughput|DRAM Throughput|Theoretical Occ" \
        "$out/ncu-$p-details.txt" | head -14
    done
    timeout 150 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps,issue5 --fold 8 --match '^BD128 w2 BW(16|32) FC(32|64)( H)?$' \
      --budget-s 120 --rep-ms 30 --commit "$sha" --copy-to "$out" > "$out/tune-bw.log" 2>&1
    tail -22 "$out/tune-bw.log"
    ;;
  41)
    # twenty-eighth session: the ring kernel's mask loads unpredicated (LINEARIZE_DECODE_MASK_CLAMP) and S read out
    # before the window (LINEARIZE_DECODE_S_FIRST), each alone and together, at the 8B's heads and issue 5's (fold 8);
    # then the 8B step on cuBLASLt at the new window block (BW 16 with heads_dot) and the base beside it (~480 s).
    # Both switches were removed after this call (bb1deff): from then on its four sweeps time the same kernel.
    for e in none MASK_CLAMP S_FIRST MASK_CLAMP,S_FIRST; do
      envs=(); [ "$e" != none ] && for v in ${e//,/ }; do envs+=("LINEARIZE_DECODE_$v=1"); done
      env "${envs[@]}" timeout 80 python3 benchmarks/tune_decode.py --presets llama8b-kvmaps,issue5 --fold 8 \
        --match '^BD128 w2 BW(16|32) FC(32|64) H$|^BD128 w2 BW(16|32) FC32$|^BD128 w2 BW16 FC64$' --budget-s 65 \
        --rep-ms 30 --commit "$sha+$e" --copy-to "$out" > "$out/tune-$e.log" 2>&1
      echo "== $e"; grep -E "^  BD" "$out/tune-$e.log"
    done
    for p in llama8b-kvmaps issue5; do  # each launch's duration: the folding step (the 8th) against the others
      timeout 60 ncu --clock-control none -k regex:_decode_kernel -s 8 -c 8 --section SpeedOfLight \
        python3 benchmarks/profile_decode.py --preset "$p" --fold 8 > "$out/ncu-$p-durations.txt" 2>&1
      echo "$p: $(grep -E '^ +Duration' "$out/ncu-$p-durations.txt" | awk '{print $3}' | tr '\n' ' ')"
    done
    l=benchmarks/configs/llama3.1-8b.json
    row llama8b-kvmaps-lt-bw16.log 120 "$l" --loops compiled --models ours --batches 64 --no-fit --budget-s 105 \
      --blas cublaslt --set feature_map_per_kv_head=true
    [ "$(left)" -gt 140 ] && row llama8b-base-lt3.log 140 "$l" --loops lean --models base --batches 64 --no-fit \
      --budget-s 125 --blas cublaslt
    ;;
  42)
    # after the twenty-eighth session: issue 5's decode row at the defaults (ours against plain torch and SDPA decode at
    # 16K; the 3x goal needs <= 52.2 us), then issue 5's heads at fold 8 in smaller row chunks and window blocks (sm_90:
    # FC 16 with BW 16 holds 128 registers, so 8 programs an SM and the 1,024 programs in one wave) (~250 s)
    issue5_decode_row 150 130 10
    timeout 90 python3 benchmarks/tune_decode.py --presets issue5 --fold 8 --match '^BD128 w2 BW(16|32) FC(16|32|64)$' \
      --budget-s 75 --rep-ms 30 --commit "$sha" --copy-to "$out" > "$out/tune-issue5.log" 2>&1
    grep -E "^  BD" "$out/tune-issue5.log"
    ;;
  43)
    # 16-row chunks and 16-slot window blocks by default at the issue-5 heads (call 42: 50.0 against 56.0 us): issue
    # 5's decode row at the new defaults, the GPU tests of the default launch and its neighbours, then the sweep around
    # them (warps 1/2/4, BW 8/16/32, FC 16/64; the old default is BD128 w2 BW32 FC64) at the issue-5 heads and
    # Llama-3.1-8B's with key maps per query head (the same 128-column heads, 2,048 programs) (~330 s)
    issue5_decode_row 100 85 4
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_decode_cuda.py \
      -k "deferred_folding or launch_configs or real_model_shapes or cuda_graph_replay" > "$out/tests.log" 2>&1
    tail -3 "$out/tests.log"
    timeout 110 python3 benchmarks/tune_decode.py --presets issue5,llama8b --fold 8 \
      --match '^BD128 w(1|2|4) BW(8|16|32) FC(16|64)$' --budget-s 95 --rep-ms 30 --commit "$sha" --copy-to "$out" \
      > "$out/tune-issue5.log" 2>&1
    grep -E "^[a-z0-9-]+:|^  BD" "$out/tune-issue5.log"
    ;;
  44)
    # 1 warp and 32-slot window blocks at the issue-5 heads' 16-row chunks (call 43's sweep: 45.0 us): issue 5's decode
    # row at these defaults, then the GPU tests of the default launch, of explicit 16-row chunks (now 1 warp at
    # 128-column value blocks) and their neighbours (~280 s)
    issue5_decode_row 100 85 4
    timeout ${T1:-170} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_decode_cuda.py \
      -k "deferred_folding or launch_configs or real_model_shapes or cuda_graph_replay or s_in_row_chunks_matches" \
      > "$out/tests.log" 2>&1
    tail -3 "$out/tests.log"
    ;;
  45)
    # the 64-column heads' ring kernel in one wave (sm_90 registers from tests/ops/test_triton_decode_compile's
    # compile_sm90): SmolLM2's default (FC 64, prefetch, 2 warps, BW 64) holds 208 registers, 4 programs an SM, so its
    # 576 programs take 1.09 waves and Qwen2.5's 896 take 1.70; BW 16/32 (199 registers, 5 an SM: one wave of 576), FC 32 (120, 8 an
    # SM: one wave of 896) or 1 warp at FC 16 (115-168, 12-17 an SM). The sweep at both models' heads, fold 1 (their CUDA
    # default), then the SmolLM2 step at B 64 (~300 s)
    timeout 200 python3 benchmarks/tune_decode.py --presets smollm2,qwen2.5 --fold 1 \
      --match '^BD64 w(1|2) BW(16|32|64) FC(16|32|64)( P)?$' --budget-s 185 --rep-ms 30 --commit "$sha" \
      --copy-to "$out" > "$out/tune-64col.log" 2>&1
    grep -E "^[a-z0-9.-]+:|^  BD" "$out/tune-64col.log"
    [ "$(left)" -gt 110 ] && row smol-b64.log 100 benchmarks/configs/smollm2-135m.json --loops compiled --models ours \
      --batches 64 --no-fit --budget-s 85
    ;;
  46)
    # not decode: the intra kernels on their own blocks (thirty-first session, CPU only: LaunchConfig.C_fwd / C_dk),
    # and bwd_dk's gradients over 2 or 3 launches (dk_launches). On blocks of 32 fwd_blocks / bwd_dq / bwd_dk issue mma.sync only; on
    # blocks of 64 at 8 warps they issue wgmma, and spill (sm_90, benchmark heads) fwd_blocks 8 B a thread at BV 64
    # (120 at BV 128), bwd_dq 48 B, bwd_dk 416 B (in 3 launches: 203 / 255 / 155 registers, 0 / 16 / 0 B; on blocks
    # of 32 at 4 warps 128 / 144 / 168, no spill, against 255 and 40 B). Their GPU tests, then each kernel's blocks at 16K against the training default
    # (profiled), and at 2K in a CUDA graph (~450 s at most)
    timeout 100 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "own_blocks" 2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 260 python3 benchmarks/tune_chunk.py --T 16384 --shapes default,64x64x8x2 --nseg 0 --intra 32x4 \
      --forms split+fold --blocks fwd64x8,dq64x8,split2,split3,dk64x8+split3,fwd64x8+dq64x8+dk64x8+split3 \
      --out "$out/tune-chunk-blocks-16k.json" \
      > "$out/tune-chunk-blocks-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-blocks-16k.log"
    timeout 80 python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default --nseg 0 --intra 32x4 \
      --forms split+fold --blocks split3,fwd64x8+dq64x8+dk64x8+split3 --out "$out/tune-chunk-blocks-2k.json" \
      > "$out/tune-chunk-blocks-2k.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-blocks-2k.log"
    ;;
  47)
    # call 46 cut for a short budget (~170 s): one of its GPU test ids, then the 16K sweep of the default (BV 128)
    # against bwd_dk in 3 launches, on blocks of 32 and with every intra kernel on blocks of 64, and all on 64 one-launch, profiled
    timeout 45 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "own_blocks and 128 and fwd64-dq64-dk-2" \
      2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 115 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 \
      --forms split+fold --blocks split3,fwd64x8+dq64x8+dk64x8+split3 \
      --out "$out/tune-chunk-blocks-16k.json" > "$out/tune-chunk-blocks-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-blocks-16k.log"
    ;;
  48)
    # call 47 at its shortest (~80 s): no GPU test (tune_chunk checks each config's outputs and gradients against the
    # default's first), the 16K default against bwd_dk in 3 launches on blocks of 32, and all on blocks of 64 with and without it
    timeout 80 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 --forms split+fold \
      --blocks split3 --out "$out/tune-chunk-split3-16k.json" > "$out/tune-chunk-split3-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-split3-16k.log"
    ;;
  49)
    # the 64-column heads' ring-kernel default of 2026-12-07 (1 warp, 32-slot window blocks, no prefetch: tune_decode
    # 25.2 -> 21.6 us at SmolLM2's heads, 30.2 -> 29.0 at Qwen2.5's) against the former one (2 warps, BW 64, prefetch:
    # LINEARIZE_DECODE_LAUNCH=2,64 LINEARIZE_DECODE_PREFETCH=1) in the whole compiled step at B 64 x 4096:
    # SmolLM2 new / former / new, then Qwen2.5 new / former (~260 s)
    # (an assignment before a shell function call reaches the commands it runs)
    SMOL=(benchmarks/configs/smollm2-135m.json --loops compiled --models ours --batches 64 --no-fit --budget-s 45)
    QWEN64=("$QWEN" --loops compiled --models ours --batches 64 --no-fit --budget-s 55)
    row smol-new.log 55 "${SMOL[@]}"
    LINEARIZE_DECODE_LAUNCH=2,64 LINEARIZE_DECODE_PREFETCH=1 row smol-former.log 55 "${SMOL[@]}"
    row smol-new2.log 55 "${SMOL[@]}"
    [ "$(left)" -gt 130 ] || exit 0
    row qwen-new.log 65 "${QWEN64[@]}"
    LINEARIZE_DECODE_LAUNCH=2,64 LINEARIZE_DECODE_PREFETCH=1 row qwen-former.log 65 "${QWEN64[@]}"
    ;;
  51)
    # call 49 (the 64-column ring default in the whole step, ~260 s), then not decode: issue 5's 16K target through
    # fewer bytes (benchmarks/NOTES-chunk.md, "Bytes a step"). The state chunk C = 128 halves the chunk sums the
    # split forward keeps (CS) and the backward's gradient sums (CDS), 537 MB each at C = 64, for ~3 more linear-only
    # block pairs a query block in the intra kernels (blocks of 32); local_sums drops both segment-sum passes (the
    # walks start each segment from zero, the block kernels add its prefix). Their GPU test, then each at the auto
    # and 32 segments a sequence, tune_chunk at 16K (profiled) and 2K (graph) (~560 s in all)
    bash "$0" 49 "$sha"
    [ "$(left)" -gt 150 ] || exit 0
    timeout 60 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "local_sums" 2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 170 python3 benchmarks/tune_chunk.py --T 16384 --shapes default,128x128x8x2 --nseg 0,32 --local \
      --intra 32x4 --intra-only --forms split+fold --out "$out/tune-chunk-local-16k.json" > "$out/tune-chunk-local-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-local-16k.log"
    [ "$(left)" -gt 40 ] || exit 0
    timeout $(( $(left) - 5 )) python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default,128x128x8x2 --nseg 0 \
      --local --intra 32x4 --intra-only --forms split+fold --out "$out/tune-chunk-local-2k.json" \
      > "$out/tune-chunk-local-2k.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-local-2k.log"
    ;;
  52)
    # call 51 in a short budget, issue 5 first: local_sums' GPU test, then default / local_sums / C = 128 / both at
    # 16K (profiled) and 2K (graph), then call 50 (SmolLM2's step at the new and former ring default) if time is
    # left (~330 s)
    timeout 60 python3 -m pytest -q tests/gpu/test_chunk_cuda.py -k "local_sums" 2>&1 | tail -3 | tee "$out/tests-chunk.log"
    timeout 130 python3 benchmarks/tune_chunk.py --T 16384 --shapes default,128x128x8x2 --nseg 0 --local \
      --intra 32x4 --intra-only --forms split+fold --out "$out/tune-chunk-local-16k.json" > "$out/tune-chunk-local-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-local-16k.log"
    timeout 90 python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default,128x128x8x2 --nseg 0 \
      --local --intra 32x4 --intra-only --forms split+fold --out "$out/tune-chunk-local-2k.json" \
      > "$out/tune-chunk-local-2k.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-local-2k.log"
    [ "$(left)" -gt 90 ] && bash "$0" 50 "$sha"
    ;;
  53)
    # call 52 at its shortest (~150 s, no test: tune_chunk checks each row's outputs and gradients against the
    # default's first): default / local_sums / C = 128 / both at 16K, profiled
    timeout 150 python3 benchmarks/tune_chunk.py --T 16384 --shapes default,128x128x8x2 --nseg 0 --local \
      --intra 32x4 --intra-only --forms split+fold --out "$out/tune-chunk-local-16k.json" > "$out/tune-chunk-local-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-local-16k.log"
    ;;
  54)
    # local_sums made the training default (call 51, H100: 16K forward+backward 6.92 -> 6.79 ms, 2K graph 1.025 ->
    # 0.987): its GPU tests and the real models' heads and memory at the default, issue 5's attention.py table,
    # then the real models' heads at B8 x 1K in a CUDA graph without and with it (~500 s)
    ids=$(python3 -m pytest --collect-only -q tests/gpu/test_chunk_cuda.py \
      -k "local_sums or long_sequence_memory or real_model_head_shapes" 2>/dev/null | grep "::")
    TEST_TIMEOUT=140 TOTAL_TIMEOUT=150 bash scripts/gpu_tests_parallel.sh "$out/tests-chunk.log" 13 $ids
    sed -n '/=== summary/,$p' "$out/tests-chunk.log"
    timeout 230 python3 benchmarks/attention.py --quick --no-check --only ours,sdpa-cudnn,flex-window,torch-linear,sdpa-decode-flash,sdpa-decode-cudnn \
      --groups main,decode --budget-s 200 --rep-ms 60 --copy-to "$out" --commit "$sha" > "$out/attention.log" 2>&1
    sed -n '/== targets/,$p' "$out/attention.log" | head -14
    for m in smollm2:9:3 qwen:14:2; do
      IFS=: read -r name H Hkv <<< "$m"
      [ "$(left)" -gt 50 ] || break
      local_heads "$name" "$H" "$Hkv"
    done
    grep -HE "^C=|first call" "$out"/tune-chunk-local-*.log
    ;;
  55)
    # every chunk-kernel GPU test at the new training default (local_sums), 14 processes at a time (~340 s), then
    # the real models' heads at B8 x 1K (CUDA graph) without and with local_sums (call 54's ran out of time: the
    # rows without the blocks of 32 came first)
    chunk_tests 14 300 330
    local_heads smollm2 9 3
    local_heads qwen 14 2
    grep -HE "^C=|first call" "$out"/tune-chunk-local-*.log
    ;;
  56)
    # not decode: the local_sums training default spills more in bwd_dk (sm_90: 200 bytes a thread against 32
    # without it) and fwd_blocks (48 against 16): bwd_dk's gradients over two or three launches, and the intra
    # kernels on blocks of 64 (wgmma) once more, at 16K (profiled) and 2K (CUDA graph) (~260 s)
    timeout 170 python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 --intra-only \
      --forms split+fold --blocks split2,split3,dk64x8,fwd64x8,dq64x8 --out "$out/tune-chunk-blocks-16k.json" \
      > "$out/tune-chunk-blocks-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-blocks-16k.log"
    [ "$(left)" -gt 40 ] || exit 0
    timeout $(( $(left) - 5 )) python3 benchmarks/tune_chunk.py --T 2048 --graph --shapes default --nseg 0 --intra 32x4 \
      --intra-only --forms split+fold --blocks split2,split3,dk64x8 --out "$out/tune-chunk-blocks-2k.json" \
      > "$out/tune-chunk-blocks-2k.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-blocks-2k.log"
    ;;
  57)
    # not decode: walk_tile (thirty-fourth session): the chunk-sum walks on [64, 64] / [32, 32] state tiles, F split
    # across programs (4x / 16x the programs at D = F = 128), over the whole sequence (nseg 1: no segment-sum passes
    # and no prefix for the block kernels to add, which cost local_sums 0.61 ms at 16K in call 51's profile) or the
    # default segments. Its GPU tests, then tune_chunk at 16K (profiled), 2K (graph) and the real models' heads at
    # B8 x 1K (graph) (~330 s)
    ids=$(python3 -m pytest --collect-only -q tests/gpu/test_chunk_cuda.py -k "walk_tile" 2>/dev/null | grep "::")
    TEST_TIMEOUT=80 TOTAL_TIMEOUT=85 bash scripts/gpu_tests_parallel.sh "$out/tests-chunk.log" 3 $ids
    sed -n '/=== summary/,$p' "$out/tests-chunk.log"
    WALK=(--shapes default --intra 32x4 --intra-only --forms split+fold --walk 64,32)
    timeout 120 python3 benchmarks/tune_chunk.py --T 16384 --nseg 0,1 "${WALK[@]}" --out "$out/tune-chunk-walk-16k.json" \
      > "$out/tune-chunk-walk-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-walk-16k.log"
    [ "$(left)" -gt 40 ] || exit 0
    timeout 70 python3 benchmarks/tune_chunk.py --T 2048 --graph --nseg 0,1 "${WALK[@]}" \
      --out "$out/tune-chunk-walk-2k.json" > "$out/tune-chunk-walk-2k.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-walk-2k.log"
    for m in smollm2:9:3 qwen:14:2; do
      IFS=: read -r name H Hkv <<< "$m"
      [ "$(left)" -gt 30 ] || break
      timeout $(( $(left) < 60 ? $(left) - 5 : 55 )) python3 benchmarks/tune_chunk.py --T 1024 --B 8 --H "$H" \
        --Hkv "$Hkv" --D 64 --F 128 --graph --nseg 0,1 "${WALK[@]}" --out "$out/tune-chunk-walk-$name.json" \
        > "$out/tune-chunk-walk-$name.log" 2>&1
      grep -HE "^C=" "$out/tune-chunk-walk-$name.log"
    done
    ;;
  58)
    # not decode: the training default with walk_tile 64 (one segment where the tiles fill the SMs): the issue's
    # B1 H32 16K shape (128 tile programs: just under the H100's 132 SMs, so segments) at the default, one segment,
    # and both without the tiles; then B4 H16 16K at the default (one segment), profiled (~110 s)
    timeout 75 python3 benchmarks/tune_chunk.py --T 16384 --B 1 --H 32 --shapes default --nseg 0,1 --intra 32x4 \
      --intra-only --forms split+fold --walk 0 --out "$out/tune-chunk-walk-b1h32.json" > "$out/tune-chunk-walk-b1h32.log" 2>&1
    grep -HE "^C=" "$out/tune-chunk-walk-b1h32.log"
    [ "$(left)" -gt 30 ] || exit 0
    timeout $(( $(left) - 5 )) python3 benchmarks/tune_chunk.py --T 16384 --shapes default --nseg 0 --intra 32x4 \
      --intra-only --forms split+fold --out "$out/tune-chunk-walk-default-16k.json" > "$out/tune-chunk-walk-default-16k.log" 2>&1
    grep -HE "^C=|first call" "$out/tune-chunk-walk-default-16k.log"
    ;;
  59)
    # not decode: the walks at the walk_tile default (call 58's profile: 514 + 632 us of 6.21 ms at 16K, 70% / 57% of
    # their bytes' floor, ~2 us a chunk step): two chunks a step (walk_pairs) and deeper pipelines (walk_stages);
    # and the block kernels (4.77 ms) capped at 168 / 128 registers a thread (maxnreg: three / four programs an SM,
    # with spills). Their GPU tests, then tune_chunk at 16K (profiled), 2K (graph) and SmolLM2's heads B8 x 1K
    # (graph) (~380 s)
    chunk_tests_k "walk_pairs or register_cap" 4 80
    # (one-pass too at 16K: its fwd column against split + fold's is evaluation's / prefill's choice)
    X16=(--forms split+fold,one-pass)
    tune_opts pairs 160 80 --walk-opts pairs,s3,s4,pairs+s3,r168,r128
    ;;
  60)
    # not decode: the window weight's gradient formed in bwd_dq (dgamma_in_dq: no u written by fwd_blocks nor read by
    # bwd_delta, phi_q read by bwd_dq instead) and delta there too (delta_in_dq: no bwd_delta pass): -1X / -2X of the
    # step's 40X bytes at 16K. GPU tests, then tune_chunk at 16K (profiled), 2K (graph) and SmolLM2's heads B8 x 1K
    # (graph) (~330 s)
    chunk_tests_k "dgamma_in_dq" 3 80
    tune_opts dgamma 120 70 --walk-opts g,gd
    ;;
  61)
    # not decode. (0) The backward's gradient-sum walk on a side stream beside bwd_dq (overlap), alone and with the
    # walks capped at 128 registers (walk_maxnreg: two walk programs and one bwd_dq fit an SM; uncapped, two walk
    # programs leave no room for bwd_dq), and the cap alone: GPU tests (also inside a CUDA graph), then 16K
    # (profiled), 2K and SmolLM2's heads (graph) against the default. (1) Evaluation's / prefill's
    # forward: the one-pass form (evaluation's default) against the training default's split forward, now that its
    # walk runs on state tiles (call 59 at 16K: 2.04 against 2.50 ms one-pass with skip), at B4 H16 16K and 2K,
    # SmolLM2's heads B8 x 1K and B1 x 16K, Qwen2.5's B8 x 1K (the fwd column; at the heads also walk_stages 2 against
    # the default 3, in a CUDA graph). (2) With the walks on state tiles, BV sizes fwd_blocks' value block alone:
    # fwd_blocks on 64 value columns on blocks of 32 at 4 warps, and on blocks of 64 at 8 warps (wgmma; sm_90 spills
    # 8 B a thread there, against 120 at BV 128), at 16K and 2K (~420 s; what is left when CALL_S runs out is skipped)
    chunk_tests_k "overlap" 4 70
    tune_opts overlap 80 50 --walk-opts ov,ov+w128,w128
    eval_and_bv_rows
    ;;
  62)
    # overlap after call 61 (16K forward+backward 6.103 -> 5.989 ms, 2K graph 0.827 -> 0.817, SmolLM2's heads
    # 0.342 -> 0.334; its eager tests passed, its CUDA-graph test failed: the side stream forked before the NaN-poison
    # fills of its buffers, which then raced the walk's writes; the fork now follows the allocations): its 4 GPU test
    # ids again, then what call 61 did not reach (evaluation's forward one-pass against split; fwd_blocks on 64 value
    # columns), with the block kernels' pipeline depth first (~480 s)
    chunk_tests_k "overlap" 4 70
    stages_rows 100 50
    eval_and_bv_rows
    ;;
  65)
    # 62 and 63 in one start where device time is short (~560 s): overlap's 4 GPU test ids, every other chunk GPU
    # test at the training default (overlap on), then the block kernels' pipeline depth at 16K and 2K (graph)
    chunk_tests_k "overlap" 4 70
    chunk_tests 14 200 $(( $(left) - ${STAGES_S:-130} )) "overlap"  # (STAGES_S=0: no time kept for the rows below)
    stages_rows 80 "$(left)"
    ;;
  63)
    # every chunk-kernel GPU test at the training default with overlap on (after call 62), 14 processes at a time
    # (~340 s)
    chunk_tests 14 240 $(( $(left) - 10 ))
    ;;
  64)
    # issue 5's table at the current defaults (training: overlap on since call 62): ours against cuDNN SDPA,
    # FlexAttention and the composition's parts at 1K-16K and the decode step (~250 s)
    attention_table
    ;;
  71)
    # call 69 at its shortest, for a short budget (~170 s): form 3's 6 GPU test ids (gluon_dk=3: one launch of
    # three kinds), then tune_chunk with it beside the training default at 16K (profiled) and 2K (graph)
    chunk_tests_k "(gluon_dk and 3-kinds) or (gluon_odd_shapes and dk-3-kinds)" 6 90
    X16=(--profile-all)
    tune_opts gdk3 $(( $(left) - 40 < 60 ? $(left) - 40 : 60 )) 38 --walk-opts gdk3
    ;;
  70)
    # not decode: the training default with bwd_dk in Gluon in one launch of three kinds of program (gluon_dk=3,
    # after call 69): the 8 chunk GPU test ids that run the training default as sm_90 takes it (CUDA graph
    # included), then issue 5's attention.py table (call 64's) (~250 s)
    chunk_tests_k "(training_default or overlap or skip_empty) and not gluon_dq" 8 120
    attention_table
    ;;
  66)
    # what calls 61 and 62 did not reach (~250 s): evaluation's forward, one-pass against split, and fwd_blocks on
    # 64 value columns, against the training default (overlap on since call 65)
    eval_and_bv_rows
    ;;
  67)
    # not decode: the three block kernels in Gluon (gluon_fwd, gluon_dq, gluon_dk: wgmma on blocks of 64 at one
    # warpgroup, the layouts chosen by hand; compiled for sm_90 on the CPU, never run before this call): their 15 GPU
    # test ids (outputs, states and gradients against the reference; the forward's outputs against the Triton
    # kernel's), then tune_chunk with each and all beside the training default at 16K (profiled), 2K and SmolLM2's
    # heads (graph), each row first checked against the default (~380 s)
    chunk_tests_k "gluon" 8 150
    X16=(--profile-all)
    tune_opts gluon $(( $(left) - 60 < 150 ? $(left) - 60 : 150 )) 70 --walk-opts gl128,gl64,gdq,gdk,gl128+gdq+gdk
    ;;
  68)
    # not decode: the chunk GPU test ids the thirty-ninth session changed after its device time (the variant tests'
    # Triton base, the training default as sm_90 takes it, skip_empty's training-triton id, the Gluon forward and
    # bwd_dk ids with their new bases), 8 processes (~120 s)
    chunk_tests_k "training_default_takes or skip_empty or gluon_fwd or gluon_dk" 8 110
    ;;
  69)
    # not decode: bwd_dk in Gluon in its new forms (gluon_dk 2: two launches, dk then dv + dphi_k; 3: one launch of
    # three kinds of program, a key block's side by side in the grid so that their reads meet in L2), never run
    # before this call: the 8 GPU test ids of forms 2 and 3 (test_gluon_dk at 2 segment counts, test_gluon_odd_shapes
    # with form 3; form 1's passed in call 67 and its programs compile as they did), then tune_chunk with forms 2 and
    # 3 beside the training default at 16K (profiled), 2K and SmolLM2's heads (graph), each row first checked against
    # the default (form 1 was timed in call 67) (~200 s)
    chunk_tests_k "(gluon_dk and not 3-launches) or (gluon_odd_shapes and dk-3-kinds)" 8 100
    X16=(--profile-all)
    tune_opts gdk $(( $(left) - 60 < 100 ? $(left) - 60 : 100 )) 50 --walk-opts gdk2,gdk3
    ;;
  50)
    # call 49 at its shortest (~80 s): SmolLM2's compiled step at the new default, then at the former one
    SMOL=(benchmarks/configs/smollm2-135m.json --loops compiled --models ours --batches 64 --no-fit --budget-s 30)
    row smol-new.log 40 "${SMOL[@]}"
    LINEARIZE_DECODE_LAUNCH=2,64 LINEARIZE_DECODE_PREFETCH=1 row smol-former.log 40 "${SMOL[@]}"
    ;;
  *) echo "call must be 1 to 71" >&2; exit 2 ;;
esac
# At most 8 files come back from $OUT: everything in one archive (unpack it into benchmarks/results/).
(cd "$out" && files=$(ls -A) && [ -n "$files" ] && tar czf "decode-call$call.tar.gz" $files && rm -f $files)
ls -la "$out"
