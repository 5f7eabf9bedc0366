"""Compile every Triton kernel for an H100 (sm_90a) on a machine without a GPU.

    python tests/kernels/sm90_compile.py [--all] [--json PATH]

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not whether it compiles for a
GPU: type consistency of loop-carried values, tl.dot shapes, shared memory, register pressure.
This script runs the real compiler down to a cubin (ptxas included) with a stand-in driver that
only names the target, and reports per kernel and config: shared memory, registers, spilled bytes
and whether the matmuls became tensor-core instructions (wgmma / mma).

Default: the first autotune config of each kernel (what CI compiles); --all: every config and
dtype the kernels are tuned over. Exit status 1 when anything fails to compile, when a kernel's
first (default) config needs more shared memory than an H100 has (later ones may: the autotuner
skips them), or when 16-bit attention does not use tensor cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for the compiler

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90


class _TargetOnlyDriver:
    """Enough of a driver for JITFunction.warmup: it compiles, never launches."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(_TargetOnlyDriver())

from dinocxr_fast.ops.triton import attention as A  # noqa: E402
from dinocxr_fast.ops.triton import dino_loss as D  # noqa: E402
from dinocxr_fast.ops.triton import window_attention as W  # noqa: E402

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
PREC_F32 = "tf32x3"  # what dot_precision gives fp32 under torch defaults (no TF32 for matmuls)


def _window(dtype, head_dim, bwd):
    prec = PREC_F32 if dtype == F32 else "tf32"
    c = head_dim * 2
    meta = dict(HEAD_DIM=head_dim, HD_PAD=max(16, triton.next_power_of_2(head_dim)), WS=7, BLOCK_T=64,
                HAS_PAD_VALUE=True, DOT_PREC=prec)
    geometry = (4096, 8, 8, 56, 56, 0, 0, c)
    strides = (56 * 56 * 3 * c, 56 * 3 * c, 3 * c, 56 * 56 * c, 56 * c, c)
    if bwd:
        return W._window_bwd_kernel, (dtype, F32, dtype, dtype, F32, *strides, *geometry, 0.18, 0.125), meta
    return W._window_fwd_kernel, (dtype, F32, dtype, *strides, *geometry, 0.18), meta


def _full(kernel, dtype, head_dim):
    prec = PREC_F32 if dtype == F32 else "tf32"
    c, n = head_dim * 4, 196
    meta = dict(HEAD_DIM=head_dim, HD_PAD=max(16, triton.next_power_of_2(head_dim)), DOT_PREC=prec)
    if kernel is A._attn_fwd_kernel:
        args = (dtype, dtype, F32, n * 3 * c, 3 * c, n * c, c, n, c, 4, 0.18)
    else:
        args = (dtype, dtype, F32, F32, dtype, n * 3 * c, 3 * c, n * c, c, n, c, 4, 0.18, 0.125)
    return kernel, args, meta


def _delta(dtype, head_dim):
    c, n = head_dim * 4, 196
    return A._attn_bwd_delta_kernel, (dtype, dtype, F32, n * c, c, n * c, c, n, 4), dict(
        HEAD_DIM=head_dim, HD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=64)


def _dino(kernel, dtype, fused=True):
    acc = F64 if dtype == F64 else F32
    k, nb = 65536, 256
    if kernel is D._teacher_kernel:
        return kernel, (dtype, F32, acc, acc, F32, 128, k, 25.0, 0.0), dict(NEED_SUM=True, ROWS=16, BLOCK_K=256,
                                                                             IS_F64=dtype == F64, num_warps=4)
    common = dict(NEED_GRAD=True, NG_PAD=2, NB_PAD=nb, IS_F64=dtype == F64)  # BLOCK_K, warps: autotuned
    scalars = (10.0, 0.0, 25.0, 0.0, 0.01, 0.0)
    if kernel is D._student_kernel:
        return kernel, (dtype, dtype, F32, acc, acc, dtype, acc, acc, 64, k, 12, 2, nb, 8192, *scalars), dict(
            FUSED=fused, **common)
    return kernel, (dtype, dtype, F32, acc, acc, dtype, acc, acc, 64, k, 2, 2, nb, 8192, 8, *scalars), dict(
        SPLIT_PAD=8, **common)


def specs(full: bool, dtypes=None):
    """(label, kernel, args, constexprs) for each problem; autotuned kernels expand per config."""
    attn_dtypes = (BF16, F16, F32) if full else (BF16, F32)
    head_dims = (32, 64, 128) if full else (64,)
    if dtypes:
        attn_dtypes = [d for d in attn_dtypes if str(d).removeprefix("torch.") in dtypes]
    for dtype in attn_dtypes:
        for hd in head_dims:
            for bwd in (False, True):
                yield (f"window_{'bwd' if bwd else 'fwd'}", dtype, hd, *_window(dtype, hd, bwd))
            for kernel in (A._attn_fwd_kernel, A._attn_bwd_dkdv_kernel, A._attn_bwd_dq_kernel):
                yield (kernel.fn.__name__.strip("_"), dtype, hd, *_full(kernel, dtype, hd))
            yield ("attn_bwd_delta", dtype, hd, *_delta(dtype, hd))
    for dtype in [d for d in ((BF16, F16, F32, F64) if full else (BF16,))
                  if not dtypes or str(d).removeprefix("torch.") in dtypes]:
        yield ("dino_teacher", dtype, None, *_dino(D._teacher_kernel, dtype))
        yield ("dino_student_fused", dtype, None, *_dino(D._student_kernel, dtype, True))
        yield ("dino_student_split", dtype, None, *_dino(D._student_kernel, dtype, False))
        yield ("dino_student_grad", dtype, None, *_dino(D._student_grad_kernel, dtype))


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spilled bytes) from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        ptxas = get_ptxas(90).path  # the ptxas Triton itself uses for sm_90
        res = subprocess.run([ptxas, "--gpu-name=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def compile_all(full: bool, dtypes=None) -> list[dict]:
    rows = []
    for label, dtype, hd, kernel, args, meta in specs(full, dtypes):
        if isinstance(kernel, triton.runtime.Autotuner):
            configs = kernel.configs if full else kernel.configs[:1]
            variants = [(cfg.all_kwargs(), kernel.fn) for cfg in configs]
        else:
            variants = [({}, kernel)]
        for index, (cfg, fn) in enumerate(variants):
            shown = ("WPP", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
            row = dict(kernel=label, dtype=str(dtype).removeprefix("torch."), head_dim=hd,
                       config={k: v for k, v in cfg.items() if k in shown})
            t0 = time.time()
            try:
                compiled = fn.warmup(*args, grid=(1,), **meta, **cfg)
                ptx = compiled.asm["ptx"]
                row["shared"] = compiled.metadata.shared
                row["regs"], row["spill_bytes"] = ptxas_usage(ptx)
                row["tensor_cores"] = bool(re.search(r"\b(wgmma|mma)\.", ptx))
                row["error"] = None
                if row["shared"] > SHARED_LIMIT:
                    # the autotuner skips such a config (OutOfResources at launch); the first one is
                    # the default and what DINOCXR_TRITON_CONFIG=0 pins, so it must fit
                    row["note"] = f"needs {row['shared']} bytes of shared memory (limit {SHARED_LIMIT})"
                    if index == 0:
                        row["error"] = row["note"]
                elif "attn" in label or "window" in label:
                    if dtype in (BF16, F16) and "delta" not in label and not row["tensor_cores"]:
                        row["error"] = "16-bit attention compiled without tensor-core instructions"
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status says it failed
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            status = "FAIL " + row["error"] if row["error"] else ("skipped by autotune: " + row["note"]
                                                                  if row.get("note") else "ok")
            print(f"{label:22s} {row['dtype']:9s} hd={str(hd):4s} {str(row['config']):70s} "
                  f"smem={row.get('shared', '-')!s:6s} regs={row.get('regs', '-')!s:4s} "
                  f"spill={row.get('spill_bytes', '-')!s:5s} tc={row.get('tensor_cores', '-')!s:5s} {status}",
                  flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every autotune config, dtype and head dim")
    parser.add_argument("--dtypes", nargs="+", metavar="NAME", help="only these dtypes (bfloat16 float16 float32 ...)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    rows = compile_all(args.all, args.dtypes)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    failed = [r for r in rows if r["error"]]
    print(f"{len(rows)} compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
