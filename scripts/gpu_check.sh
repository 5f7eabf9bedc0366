#!/usr/bin/env bash
# The one script to run on a GPU machine: build the CUDA extension, run the GPU tests, run every
# benchmark with --quick, and write one report (Markdown + JSON) to $OUT when set, else to
# benchmarks/results/. Must finish within 8 minutes; each step has its own time limit and a failed
# step is recorded in the report rather than stopping the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report="$out/gpu_check_${stamp}.md"
log="$out/gpu_check_${stamp}.log"
json_dir="$out/gpu_check_${stamp}_json"
mkdir -p "$json_dir"

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name ==" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) s |" >>"$report.steps"
  echo "   rc=$rc" | tee -a "$log"
  return 0
}

{
  echo "# GPU check ${stamp}"
  echo
  echo "- commit: ${commit}"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "- python: $(python --version 2>&1); torch: $(python -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
  echo "- triton: $(python -c 'import triton; print(triton.__version__)' 2>&1 | tail -1)"
} >"$report"

step "build (DINOCXR_CUDA=1)" 300 env DINOCXR_CUDA=1 DINOCXR_CUDA_ARCHS="90a" python -m pip install -q -e . --no-build-isolation
step "pytest -m cuda" 150 python -m pytest -m cuda -q -x --no-header -p no:cacheprovider
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  step "$name --quick" 120 python -m "benchmarks.$name" --quick --json "$json_dir/$name.json"
done

{
  echo
  echo "| step | exit code | time |"
  echo "|---|---|---|"
  cat "$report.steps"
  echo
  echo "## Output"
  echo
  echo '```'
  cat "$log"
  echo '```'
} >>"$report"
rm -f "$report.steps"
python - "$json_dir" "$out/gpu_check_${stamp}.json" "$commit" <<'PY'
import json, sys, pathlib
records = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(f.read_text()):
        r["commit"] = sys.argv[3]
        r["benchmark"] = f.stem
        records.append(r)
pathlib.Path(sys.argv[2]).write_text(json.dumps(records, indent=2) + "\n")
print(f"{len(records)} benchmark records -> {sys.argv[2]}")
PY
echo "report: $report"
