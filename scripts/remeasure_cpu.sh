#!/usr/bin/env bash
# Re-measure every committed CPU benchmark result on a quiet machine and regenerate the README's
# performance table.
#
#   bash scripts/remeasure_cpu.sh            run (refuses when the machine is busy)
#   bash scripts/remeasure_cpu.sh --list     print what it covers, what not, and the estimate
#
# Covers (same commands as the committed files, plus --json):
#   bench_dino_loss       python -m benchmarks.bench_dino_loss                         ~0.5 min
#   bench_bn_act          python -m benchmarks.bench_bn_act --repeats 21               ~0.7 min
#   bench_infer           python -m benchmarks.bench_infer --quick --no-compile        ~1 min
#   bench_train           python -m benchmarks.bench_train --quick --steps 41          ~3.5 min
#   bench_data            python -m benchmarks.bench_data                              ~3 min
#                         (reads ../shared/data/cxr-sample and cxr-pool; skipped, and said so,
#                         without them)
#   bench_dino_reference  python -m benchmarks.bench_dino_reference --dino-repo $DINO_REPO   ~2 min
#                         (needs a facebookresearch/dino checkout in $DINO_REPO; skipped, and said
#                         so, without one)
# Not covered: pretrain_cxr_sample (a 12-minute pretraining run), ssl_quality (pretraining per
# seed, hours) and bench_views (two 5-minute pretraining runs beside its step timing): they are
# quality runs more than timings, and keep their committed files (re-run them by hand).
# Estimated total on the 2-core development machine: ~11 minutes (the figures above come from the
# committed timings; the guard adds 5 s up front).
#
# Each benchmark measures the machine's load itself and refuses to write its --json when other
# processes used more than half a core during its run (benchmarks/_load.py); this script checks
# the load for 5 s first so that a busy machine is refused before eight minutes are spent. A new
# result replaces the older cpu_*_<benchmark>.json files only when it was written; then
# `python -m benchmarks.report` regenerates the README table. Commit benchmarks/results/ and
# README.md afterwards, and update the headlines in benchmarks/results/README.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
results=benchmarks/results
today=$(date -u +%Y-%m-%d)

# name|arguments (the committed files' commands)
BENCHES=(
  "bench_dino_loss|"
  "bench_bn_act|--repeats 21"
  "bench_infer|--quick --no-compile"
  "bench_train|--quick --steps 41"
  "bench_data|"
  "bench_dino_reference|--dino-repo \${DINO_REPO}"
)
NOT_COVERED="pretrain_cxr_sample ssl_quality bench_views"
ESTIMATE_MIN=11

if [ "${1:-}" = "--list" ]; then
  for entry in "${BENCHES[@]}"; do
    echo "covers: ${entry%%|*}  python -m benchmarks.${entry%%|*} ${entry#*|}"
  done
  echo "not covered: $NOT_COVERED"
  echo "estimated total: ~${ESTIMATE_MIN} min on 2 cores"
  exit 0
fi
if [ $# -gt 0 ]; then
  echo "usage: bash scripts/remeasure_cpu.sh [--list]" >&2
  exit 2
fi

echo "Re-measuring the committed CPU results: estimated ~${ESTIMATE_MIN} min on 2 cores. Keep the machine quiet."
# Refuse early: 5 s of the other processes' load, the same criterion the benchmarks apply.
if ! "$PY" - <<'EOF'
import sys, time
from benchmarks import _load
monitor = _load.LoadMonitor()
time.sleep(5)
load = monitor.summary()
print(_load.describe(load))
sys.exit(1 if load["busy"] else 0)
EOF
then
  echo "The machine is busy: nothing re-measured. Stop the other jobs and run this again." >&2
  exit 1
fi

failed=()
start=$(date +%s)
for entry in "${BENCHES[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  if [ "$name" = bench_dino_reference ] && [ -z "${DINO_REPO:-}" ]; then
    echo "== $name: NOT re-measured: set DINO_REPO to a facebookresearch/dino checkout =="
    failed+=("$name (no DINO_REPO)")
    continue
  fi
  if [ "$name" = bench_data ] && [ ! -d ../shared/data/cxr-sample ]; then
    echo "== $name: NOT re-measured: ../shared/data/cxr-sample is missing =="
    failed+=("$name (no shared data)")
    continue
  fi
  args=${args//\$\{DINO_REPO\}/${DINO_REPO:-}}
  out="$results/cpu_${today}_${name}.json"
  echo "== $name ($(( ($(date +%s) - start) / 60 )) min so far) =="
  # A busy run exits non-zero before writing: the committed file stays. shellcheck disable=SC2086
  if "$PY" -m "benchmarks.$name" $args --json "$out"; then
    find "$results" -maxdepth 1 -name "cpu_*_${name}.json" ! -name "$(basename "$out")" -delete
  else
    failed+=("$name")
  fi
done

"$PY" -m benchmarks.report
echo "done in $(( ($(date +%s) - start) / 60 )) min."
if [ ${#failed[@]} -gt 0 ]; then
  echo "NOT re-measured (their committed results are kept): ${failed[*]}" >&2
  exit 1
fi
