#!/usr/bin/env bash
# One command per device call on the lent GPU (docs/gpu-runs.md has the call sequence):
#
#   bash scripts/gpu_convert.sh MODEL RUN_NAME [--config F] [--set k=v ...] [--suite full|quick|none]
#   bash scripts/gpu_convert.sh --queue configs/queues/FILE.txt      # several runs, in order
#   bash scripts/gpu_convert.sh --lanes Q1.txt Q2.txt ...             # queues side by side, lane i on GPU i
#   bash scripts/gpu_convert.sh --stage-only                          # a staging call: wheels and pieces only
#
# Lanes: on a machine with several GPUs (nvidia-h200-x2), each queue file runs in its own process pinned to
# one GPU (CUDA_VISIBLE_DEVICES = lane index mod GPU count), each with its own log. Lanes share the cache:
# the GGUF->bf16 conversion and the tokenized data are written atomically, so two lanes that build the same
# one at once both finish and keep one copy. Runs of different lanes must have different names.
#
# 1. installs the carried wheels (.whl/*.whl -> ~/site, once per machine);
# 2. stages the carried pieces (.carry/**: joins, checks sha256, unpacks into ~/lcache), see
#    linearize/pipelines/carry.py;
# 3. runs the conversion(s) with --resume into ~/runs/RUN_NAME, then the eval suite for the base and the
#    converted model side by side (linearize/pipelines/device.py), killed at the call's deadline:
#    send the same command again (with the next carry) and it goes on from the last checkpoint / the
#    last finished eval task;
# 4. always bundles what there is into $OUT: runs.tar.gz (reports, metrics, plots, eval json/md/png,
#    the log's tail) and runs-summary.md (2 files).
#
# LINEARIZE_CALL_SECONDS (default 500): seconds from the start of this script after which the runs are
# killed, leaving time to bundle inside the device's 600 s. LINEARIZE_DEADLINE (epoch s) overrides it.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
deadline=${LINEARIZE_DEADLINE:-$((t0 + ${LINEARIZE_CALL_SECONDS:-500}))}
# the runs see it too: an evaluation near it skips the tasks that would not finish and runs the shorter ones
export LINEARIZE_DEADLINE=$deadline
site=${LINEARIZE_SITE:-$HOME/site}
runs=${LINEARIZE_RUNS:-$HOME/runs}
out=${OUT:-$HOME/out}
export LINEARIZE_CACHE=${LINEARIZE_CACHE:-$HOME/lcache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
mkdir -p "$site" "$runs/_logs" "$out" "$LINEARIZE_CACHE"

if [ "$#" -lt 1 ]; then echo "usage: $0 MODEL RUN_NAME [options] | --queue FILE" >&2; exit 2; fi

# 1. wheels (transformers >= 5.23 and gguf are newer than the image's), once per machine
if compgen -G ".whl/*.whl" > /dev/null; then
  stamp=$(ls .whl/*.whl | xargs -n1 basename | sort | sha256sum | cut -c1-16)
  if [ ! -e "$site/.installed-$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      && touch "$site/.installed-$stamp" || { echo "wheel install failed" >&2; exit 2; }
  fi
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. carried pieces
python3 -m linearize.pipelines.carry stage --carry .carry --stage "$HOME/stage" || echo "staging reported a damaged file: carry its call again"

# trained weights an earlier call brought back (runs-weights.tar.partNN, copied into .carry/weights here):
# a run the released machine took with it resumes from its last checkpoint instead of training again
if compgen -G ".carry/weights/*-weights.tar.part*" > /dev/null; then
  python3 -m linearize.pipelines.device --runs "$runs" restore .carry/weights || echo "restore failed: carry every part"
fi

echo "== wheels and pieces staged: $(( $(date +%s) - t0 ))s"
# A call that only carries pieces (the model is not whole yet) starts no Python runs and bundles nothing:
# on 2026-12-03 such a call took ~60 s of command time, most of it starting processes that could only report
# "waiting" (joining and checking all 6 Gemma pieces at once takes 28 s on a 2-core CPU).
if [ "$1" = "--stage-only" ]; then exit 0; fi

# 3. the run(s), under the deadline
stamp=$(date +%Y%m%d-%H%M%S)
log="$runs/_logs/call-$stamp.log"
lanes=()
if [ "$1" = "--queue" ]; then
  [ "$#" -eq 2 ] || { echo "usage: $0 --queue FILE" >&2; exit 2; }
  cmd=(queue "$2"); bundle_args=(--queue "$2")
elif [ "$1" = "--lanes" ]; then
  shift
  [ "$#" -ge 1 ] || { echo "usage: $0 --lanes QUEUE_FILE..." >&2; exit 2; }
  lanes=("$@"); bundle_args=()
  for q in "${lanes[@]}"; do bundle_args+=(--queue "$q"); done
else
  [ "$#" -ge 2 ] || { echo "usage: $0 MODEL RUN_NAME [options]" >&2; exit 2; }
  cmd=(run "$@"); bundle_args=("$2")
fi
left=$((deadline - $(date +%s)))
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| transformers', transformers.__version__, '| peft', peft.__version__)"
logs=()
# A call that reaches the device's limit returns only what is already in $OUT: bundle every 2 minutes too.
bundle_now() {
  local la=(); for l in "${logs[@]}"; do la+=(--log "$l"); done
  python3 -m linearize.pipelines.device --runs "$runs" bundle "${bundle_args[@]}" --to "$out" --weights "${la[@]}"
}
# TERM ends the loop between bundles: bash runs the trap only once a running bundle has finished.
start_bundler() {
  ( trap 'exit 0' TERM; while true; do sleep "${LINEARIZE_BUNDLE_EVERY:-120}" & wait $!; bundle_now > /dev/null 2>&1; done ) &
  bundler=$!
}
bundler=""
if [ "$left" -le 20 ]; then
  rc=124; echo "== no time left for runs this call"; logs=("$log")
elif [ "${#lanes[@]}" -gt 0 ]; then
  ngpu=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
  pids=()
  for i in "${!lanes[@]}"; do
    lane_log="$runs/_logs/call-$stamp-lane$i.log"; logs+=("$lane_log"); : > "$lane_log"
    echo "== lane $i on GPU $((i % ngpu)): queue ${lanes[$i]}; ${left}s before the deadline; log $lane_log"
    CUDA_VISIBLE_DEVICES=$((i % ngpu)) timeout -s KILL "$left" python3 -m linearize.pipelines.device --runs "$runs" queue "${lanes[$i]}" \
      > "$lane_log" 2>&1 &
    pids+=($!)
  done
  start_bundler
  # one lane's progress on the console (the others are in their logs, which come back in the bundle)
  tail -n +1 -f "${logs[0]}" --pid "${pids[0]}" &
  rc=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; r=$?
    echo "== lane $i exit $r"; tail -n 5 "${logs[$i]}"
    [ "$r" -eq 137 ] && echo "== lane $i: deadline reached: killed; send the same command again to go on"
    [ "$r" -ne 0 ] && rc=$r
  done
else
  logs=("$log"); : > "$log"
  start_bundler
  echo "== ${cmd[*]}: ${left}s before the deadline; log $log"
  timeout -s KILL "$left" python3 -m linearize.pipelines.device --runs "$runs" "${cmd[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 137 ] && echo "== deadline reached: killed; send the same command again to go on"
fi

# 4. what comes back
if [ -n "$bundler" ]; then kill "$bundler" 2>/dev/null; wait "$bundler" 2>/dev/null; fi  # lets a bundle in progress finish
bundle_now
rm -f "$out"/.*.tmp
echo "== rc $rc; $(( $(date +%s) - t0 ))s in this call"
exit 0
