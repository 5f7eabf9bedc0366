#!/usr/bin/env bash
# The one script to run on a GPU machine (a 15-minute lease, one call): build the CUDA extension,
# run the selfcheck (every fused op verified against its reference and timed against the vendor
# path, each CUDA/Triton backend in a child process), the GPU tests one op family per pytest
# process (one failing kernel cannot hide the others), then every benchmark with --quick. A step
# that fails is recorded and the rest still run; each has a cap and all share one deadline.
#
# Writes at most 8 files to $OUT (else benchmarks/results/): gpu_check.md (report with the step
# table and the selfcheck table), gpu_check.log (all output), selfcheck.json, benchmarks.json
# (every benchmark's records merged). The commit comes from DINOCXR_COMMIT when the copy has no .git.
# Every optional piece (triton, DALI, TensorRT, pytest-timeout, nvidia-smi) is probed, not assumed.
# GPU_CHECK_DRY_RUN=1 runs the bookkeeping only (the tests use it; no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU image's torch lives in python3
out=${OUT:-benchmarks/results}
mkdir -p "$out"
commit=${DINOCXR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export DINOCXR_COMMIT=$commit
dry=${GPU_CHECK_DRY_RUN:-0}
report="$out/gpu_check.md"
log="$out/gpu_check.log"
work=$(mktemp -d)  # per-benchmark JSON, step table, backend cache: merged or dropped, never in $OUT
trap 'rm -rf "$work"' EXIT
export DINOCXR_CACHE_DIR="$work/cache"
: >"$log"

# One deadline for the whole check (default 11 minutes of the 15-minute lease: the machine's start
# and the copy back take the rest); a step gets at most its cap and what is left.
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-660} ))

step() {  # step NAME CAP_S CMD...
  local name=$1 cap=$2
  shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | not run (out of time) | - |" >>"$work/steps"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0 rc
  t0=$(date +%s)
  echo "== $name (cap ${limit} s) ==" | tee -a "$log"
  if [ "$dry" = 1 ]; then
    rc=0
  else
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
  fi
  [ "$rc" = 124 ] && rc="124 (timed out)"
  echo "| $name | $rc | $(( $(date +%s) - t0 )) s |" >>"$work/steps"
  echo "   rc=$rc" | tee -a "$log"
  return 0
}

probe() {  # probe PYTHON_EXPR: its printed value, or "absent"
  "$PY" -c "$1" 2>/dev/null || echo absent
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- commit: ${commit}"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "- python: $("$PY" --version 2>&1); torch: $(probe 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
  echo "- triton: $(probe 'import triton; print(triton.__version__)'); DALI: $(probe 'import nvidia.dali as d; print(d.__version__)'); TensorRT: $(probe 'import tensorrt as t; print(t.__version__)')"
} >"$report"

# The GPU machine has the Python packages but reaches no registry: --no-deps.
step "build (DINOCXR_CUDA=1)" 240 env DINOCXR_CUDA=1 DINOCXR_CUDA_ARCHS="90a" "$PY" -m pip install -q -e . --no-build-isolation --no-deps
probe "from dinocxr_fast import _ext; print('extension built with CUDA:', _ext.has_cuda())" >>"$log"

# First the selfcheck: its table is the answer to "which kernels are correct and faster here".
step "selfcheck --device cuda" 150 "$PY" -m dinocxr_fast.selfcheck --device cuda --json "$out/selfcheck.json"

# One pytest process per op family; --timeout (pytest-timeout) where installed, per test.
timeout_opt=()
[ "$(probe 'import pytest_timeout; print(1)')" = 1 ] && timeout_opt=(--timeout 120)
pytest_family() {  # pytest_family NAME CAP FILES...
  local name=$1 cap=$2
  shift 2
  local files=()
  for f in "$@"; do [ -f "$f" ] && files+=("$f"); done
  [ "${#files[@]}" -gt 0 ] && step "pytest -m cuda: $name" "$cap" "$PY" -m pytest -m cuda -q --no-header \
    -p no:cacheprovider "${timeout_opt[@]}" "${files[@]}"
}
pytest_family "dino_loss" 75 tests/kernels/test_cuda_dino_loss_kernel.py tests/kernels/test_triton_dino_loss_kernels.py tests/ops/test_dino_loss.py
pytest_family "attention" 90 tests/ops/test_attention.py tests/ops/test_window_attention.py tests/kernels/test_triton_attention_kernels.py
pytest_family "conv_bn_act / pcm" 90 tests/kernels/test_cuda_conv3x3_kernels.py tests/ops/test_conv_bn_act.py tests/ops/test_pcm.py
pytest_family "model and dispatch" 45 tests/models/test_vitaev2.py tests/ops/test_dispatch.py
# the data path on the GPU: DALI's mixed (nvJPEG) decoder, prepared pixels through external_source
pytest_family "data" 45 tests/data/test_prepared.py

# Kernel benchmarks autotune (that is what they measure); the model-level ones pin the Triton
# configs (DINOCXR_TRITON_CONFIG=0) so a fresh machine does not spend the budget autotuning.
for name in bench_dino_loss bench_attention bench_pcm; do
  [ -f "benchmarks/$name.py" ] && step "$name --quick" 50 "$PY" -m "benchmarks.$name" --quick --allow-busy --json "$work/$name.json"
done
for name in bench_train bench_model bench_infer bench_data; do
  [ -f "benchmarks/$name.py" ] && step "$name --quick" 60 env DINOCXR_TRITON_CONFIG=0 "$PY" -m "benchmarks.$name" --quick --allow-busy --json "$work/$name.json"
done
# facebookresearch/dino's own step beside ours: its three files travel with the call (run's carry:
# .dino_ref, ignored by git; copy main_dino.py, utils.py, vision_transformer.py from a checkout).
dino_repo=${DINO_REPO:-.dino_ref}
if [ -f "$dino_repo/main_dino.py" ]; then
  step "bench_dino_reference --quick" 60 env DINOCXR_TRITON_CONFIG=0 "$PY" -m benchmarks.bench_dino_reference \
    --dino-repo "$dino_repo" --quick --allow-busy --json "$work/bench_dino_reference.json"
else
  echo "bench_dino_reference: skipped, no facebookresearch/dino checkout at $dino_repo" >>"$log"
fi

# All benchmark records in one file (a JSON that does not parse is kept as an error record).
"$PY" - "$work" "$out/benchmarks.json" "$commit" "$(date -u +%Y-%m-%d)" >>"$log" 2>&1 <<'PY'
import json, sys, pathlib
records = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    try:
        data = json.loads(f.read_text())
    except ValueError as exc:
        data = [{"error": f"unreadable JSON: {exc}"}]
    for r in data if isinstance(data, list) else [data]:
        r["commit"] = sys.argv[3]
        r["benchmark"] = f.stem
        r.setdefault("date", sys.argv[4])
        records.append(r)
pathlib.Path(sys.argv[2]).write_text(json.dumps(records, indent=2) + "\n")
print(f"{len(records)} benchmark records -> {sys.argv[2]}")
PY

{
  echo
  echo "| step | exit code | time |"
  echo "|---|---|---|"
  cat "$work/steps" 2>/dev/null
  echo
  echo "## Selfcheck"
  echo
  awk '/^selfcheck on /{p=1; print; next} p && /^\|/{print; next} p{exit}' "$log"
  echo
  echo "Full output: gpu_check.log"
} >>"$report"
echo "report: $report ($(ls "$out" | wc -l) files in $out)"
