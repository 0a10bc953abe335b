#!/usr/bin/env bash
# GPU test node ids as parallel pytest processes, one per id: the chunk tests are bound by Triton's
# compiles (CPU), so N processes finish in about the time of the slowest one and share the GPU.
#
#   bash scripts/gpu_tests_parallel.sh OUT_LOG JOBS NODE_ID...
#
# Each id gets TEST_TIMEOUT seconds (default 420); OUT_LOG gets every id's log tail and a pass/fail line.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; jobs=$2; shift 2
dir=$(mktemp -d)
printf '%s\n' "$@" | nl -w3 -nrz -s' ' | xargs -P "$jobs" -L1 bash -c \
  'echo "$1" > "'"$dir"'/$0.log"; timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --durations=3 "$1" >> "'"$dir"'/$0.log" 2>&1; echo "rc=$?" >> "'"$dir"'/$0.log"'
{
  for f in "$dir"/*.log; do echo "=== $(head -n 1 "$f")"; tail -n 8 "$f"; done
  echo "=== summary"; for f in "$dir"/*.log; do echo "$(head -n 1 "$f"): $(grep -E "passed|failed|skipped|error" "$f" | tail -n 1) $(tail -n 1 "$f")"; done
} > "$out"
rm -rf "$dir"
