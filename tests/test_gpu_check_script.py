"""scripts/gpu_check.sh parses, and its bookkeeping (GPU_CHECK_DRY_RUN=1: no step runs) keeps the
rules of a one-call GPU lease: at most 8 files under $OUT, the commit from DINOCXR_COMMIT without
.git, one pytest process per op family and never `pytest -x`."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_writes_at_most_eight_files_and_records_the_commit(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", DINOCXR_COMMIT="abc1234",
               PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(p.parent == out for p in files)
    report = (out / "gpu_check.md").read_text()
    assert "- commit: abc1234" in report
    steps = [line for line in report.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in steps[1:]]
    assert names[:2] == ["build (DINOCXR_CUDA=1)", "selfcheck --device cuda"]  # selfcheck before everything else
    assert sum(n.startswith("pytest -m cuda:") for n in names) >= 3  # one process per op family


def test_no_pytest_stops_at_the_first_failure():
    text = SCRIPT.read_text()
    assert " -x" not in text and "PYTHONUNBUFFERED=1" in text and "--timeout" in text


def test_every_test_file_the_script_names_exists():
    """The tests are arranged like the package; a move must not leave the GPU check pointing nowhere."""
    named = re.findall(r"tests/[\w/]+\.py", SCRIPT.read_text())
    assert named and [p for p in named if not (SCRIPT.parents[1] / p).is_file()] == []
