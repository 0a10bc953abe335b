#!/usr/bin/env bash
# GPU test node ids as parallel pytest processes, one per id: the chunk tests are bound by Triton's
# compiles (CPU), so N processes finish in about the time of the slowest one and share the GPU.
#
#   bash scripts/gpu_tests_parallel.sh OUT_LOG JOBS NODE_ID...
#
# Each id gets TEST_TIMEOUT seconds (default 420); OUT_LOG gets the whole log of each failing id (long
# tracebacks with locals), the tail of each passing one, and a pass/fail line per id.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; jobs=$2; shift 2
dir=$(mktemp -d)
printf '%s\n' "$@" | nl -w3 -nrz -s' ' | xargs -P "$jobs" -L1 bash -c \
  'echo "$1" > "'"$dir"'/$0.log"; timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --durations=3 -rfE --tb=long -l "$1" >> "'"$dir"'/$0.log" 2>&1; echo "rc=$?" >> "'"$dir"'/$0.log"'
{
  for f in "$dir"/*.log; do echo "=== $(head -n 1 "$f")"; if grep -q "rc=0" "$f"; then tail -n 4 "$f"; else cat "$f"; fi; done
  echo "=== summary"; for f in "$dir"/*.log; do echo "$(head -n 1 "$f"): $(grep -E "passed|failed|skipped|error" "$f" | tail -n 1) $(tail -n 1 "$f")"; done
} > "$out"
rm -rf "$dir"
