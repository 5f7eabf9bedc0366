"""Every Triton kernel compiles for an H100 (sm_90a), on a machine without a GPU.

The interpreter runs the kernels' math but not the compiler; this runs tests/kernels/sm90_compile.py
(real compile to a cubin, ptxas included) in a fresh process, where TRITON_INTERPRET is unset.
It also holds the bf16 attention kernels to tensor-core instructions and no register spills.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

        return Path(get_ptxas(90).path).exists()
    except Exception:  # noqa: BLE001 - any failure means: cannot compile for NVIDIA here
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    repo = str(Path(__file__).parents[2])  # the package from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
    report = tmp_path / "sm90.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", str(report)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=repo)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = json.loads(report.read_text())
    assert {r["kernel"] for r in rows} >= {"window_fwd", "window_bwd", "attn_fwd_kernel", "attn_bwd_dkdv_kernel",
                                           "attn_bwd_dq_kernel", "dino_teacher", "dino_student_fused",
                                           "dino_student_grad"}
    for r in rows:
        if r["dtype"] == "bfloat16":
            assert r["spill_bytes"] == 0, r
            if "window" in r["kernel"] or r["kernel"].startswith("attn_") and "delta" not in r["kernel"]:
                assert r["tensor_cores"], r
