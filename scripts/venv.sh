#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv), install what is missing and build the
# extension. Idempotent: a stamp keyed on a hash of everything the install depends on (pyproject,
# setup.py, csrc/, kernels/cuda/, the torch spec) makes a second call a no-op of about a second.
#
#   bash scripts/venv.sh            # then: .venv/bin/python -m ...
#   TORCH_SPEC="torch==2.13.0" (default: the CPU build on this machine's disk; on a CUDA machine set e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu130")
#   VENV=path  PYTHON=python3.11  EXTRAS=test (the optional groups of pyproject.toml to install)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

key=$( { echo "$TORCH_SPEC|$EXTRAS|$($PYTHON -V 2>&1)"; cat pyproject.toml setup.py;
         find csrc kernels/cuda -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
              -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16)
stamp="$VENV/.dinocxr-ready-$key"
if [[ -f $stamp && -x $VENV/bin/python ]]; then
    exit 0
fi

echo "== setting up $VENV (torch: $TORCH_SPEC; extras: $EXTRAS) =="
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
rm -f "$VENV"/.dinocxr-ready-*
# build requirements first: the extension is built --no-build-isolation against this venv's torch
# shellcheck disable=SC2086  # TORCH_SPEC may hold pip options (--index-url ...)
"$py" -m pip install -q "setuptools>=64" wheel ninja $TORCH_SPEC
"$py" -m pip install -q -e ".[$EXTRAS]" --no-build-isolation
"$py" -c "from dinocxr_fast import _ext; e = _ext.require(); print('dinocxr_fast._C built; cuda:', e.built_with_cuda, '; cpu isa:', e.cpu_isa())"
touch "$stamp"
echo "== $VENV ready =="
