#!/usr/bin/env bash
# The one script to run on a GPU machine: build the CUDA extension, run the GPU tests, run every
# benchmark with --quick, and write one report (Markdown + JSON) to $OUT when set, else to
# benchmarks/results/. Must finish within 8 minutes; each step has its own time limit and a failed
# step is recorded in the report rather than stopping the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the GPU image's torch lives in python3
out=${OUT:-benchmarks/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
commit=${DINOCXR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export DINOCXR_COMMIT=$commit
report="$out/gpu_check_${stamp}.md"
log="$out/gpu_check_${stamp}.log"
json_dir="$out/gpu_check_${stamp}_json"
mkdir -p "$json_dir"

# One deadline for the whole check (default 7.5 minutes): each step gets at most its own cap and
# what is left; a step that no longer fits is recorded as not run.
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-450} ))

step() {  # step NAME CAP_S CMD...
  local name=$1 cap=$2
  shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | not run (out of time) | - |" >>"$report.steps"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
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
  echo "- python: $("$PY" --version 2>&1); torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
  echo "- triton: $("$PY" -c 'import triton; print(triton.__version__)' 2>&1 | tail -1)"
} >"$report"

# The GPU machine has the Python packages but reaches no registry: --no-deps.
step "build (DINOCXR_CUDA=1)" 200 env DINOCXR_CUDA=1 DINOCXR_CUDA_ARCHS="90a" "$PY" -m pip install -q -e . --no-build-isolation --no-deps
"$PY" -c "from dinocxr_fast import _ext; print('extension built with CUDA:', _ext.has_cuda())" >>"$log" 2>&1
step "pytest -m cuda" 130 "$PY" -m pytest -m cuda -q -x --no-header -p no:cacheprovider
# Kernel benchmarks autotune (that is what they measure); the model-level ones pin the Triton
# configs (DINOCXR_TRITON_CONFIG=0) so a fresh machine does not spend the budget autotuning.
for name in bench_dino_loss bench_attention bench_pcm; do
  [ -f "benchmarks/$name.py" ] && step "$name --quick" 60 "$PY" -m "benchmarks.$name" --quick --json "$json_dir/$name.json"
done
for name in bench_train bench_model bench_infer bench_data; do
  [ -f "benchmarks/$name.py" ] && step "$name --quick" 75 env DINOCXR_TRITON_CONFIG=0 "$PY" -m "benchmarks.$name" --quick --json "$json_dir/$name.json"
done
# --- issue 18: the data path on the GPU (DALI mixed/nvJPEG decoder, prepared pixels via external_source) ---
step "data on the GPU (issue 18)" 60 "$PY" -m pytest -m cuda -q --no-header -p no:cacheprovider tests/test_data_prepared.py -k gpu_loaders
# --- end issue 18 ---
# facebookresearch/dino's own step beside ours: its three files travel with the call (run's carry:
# .dino_ref, ignored by git; copy main_dino.py, utils.py, vision_transformer.py from a checkout).
dino_repo=${DINO_REPO:-.dino_ref}
if [ -f "$dino_repo/main_dino.py" ]; then
  step "bench_dino_reference --quick" 75 env DINOCXR_TRITON_CONFIG=0 "$PY" -m benchmarks.bench_dino_reference \
    --dino-repo "$dino_repo" --quick --json "$json_dir/bench_dino_reference.json"
else
  echo "bench_dino_reference: skipped, no facebookresearch/dino checkout at $dino_repo" >>"$log"
fi

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
"$PY" - "$json_dir" "$out/gpu_check_${stamp}.json" "$commit" "$(date -u +%Y-%m-%d)" <<'PY'
import json, sys, pathlib
records = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(f.read_text()):
        r["commit"] = sys.argv[3]
        r["benchmark"] = f.stem
        r.setdefault("date", sys.argv[4])
        records.append(r)
pathlib.Path(sys.argv[2]).write_text(json.dumps(records, indent=2) + "\n")
print(f"{len(records)} benchmark records -> {sys.argv[2]}")
PY
echo "report: $report"
