"""Which backends exist and whether one can run on a device at all (built, right device type).

The rule that picks among them for a call is ops/_dispatch.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from dinocxr_fast import _ext

BACKENDS = ("cuda", "triton", "cpp", "torch")
ENV_VAR = "DINOCXR_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on the CPU, the tensors are on {device}"
        if not _ext.has_cpp():
            return f"the extension is not built ({_ext.load_error()})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, the tensors are on {device}"
        if not _ext.has_cuda():
            return "the extension was built without CUDA (rebuild with DINOCXR_CUDA=1)"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), the tensors are on {device}"
    return f"unknown backend {backend!r}"
