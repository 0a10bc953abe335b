#!/usr/bin/env bash
# GPU test node ids as parallel pytest processes, one per id: the chunk tests are bound by Triton's
# compiles (CPU), so N processes finish in about the time of the slowest one and share the GPU.
#
#   bash scripts/gpu_tests_parallel.sh OUT_LOG JOBS NODE_ID...
#
# Each id gets TEST_TIMEOUT seconds (default 420), and none runs past TOTAL_TIMEOUT seconds from the start
# (default none): an id that would is cut there, one not started by then is listed as "not run". So the
# summary is always written; an outer `timeout` would kill this script before it wrote anything. OUT_LOG gets
# the whole log of each failing id (long tracebacks with locals), the tail of each passing one, and a
# pass/fail line per id.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; jobs=$2; shift 2
dir=$(mktemp -d)
export DEADLINE=$(( $(date +%s) + ${TOTAL_TIMEOUT:-1000000} )) TEST_TIMEOUT=${TEST_TIMEOUT:-420}
printf '%s\n' "$@" | nl -w3 -nrz -s' ' | xargs -P "$jobs" -L1 bash -c \
  'log="'"$dir"'/$0.log"; echo "$1" > "$log"; left=$(( DEADLINE - $(date +%s) )); t=$(( left < TEST_TIMEOUT ? left : TEST_TIMEOUT ));
   if (( t < 5 )); then echo "rc=not-run (past TOTAL_TIMEOUT)" >> "$log"; exit 0; fi
   timeout "$t" python3 -m pytest -q -p no:cacheprovider --durations=3 -rfE --tb=long -l "$1" >> "$log" 2>&1; echo "rc=$?" >> "$log"'
{
  for f in "$dir"/*.log; do echo "=== $(head -n 1 "$f")"; if grep -q "rc=0" "$f"; then tail -n 4 "$f"; else cat "$f"; fi; done
  echo "=== summary"; for f in "$dir"/*.log; do echo "$(head -n 1 "$f"): $(grep -E "passed|failed|skipped|error" "$f" | tail -n 1) $(tail -n 1 "$f")"; done
} > "$out"
rm -rf "$dir"
