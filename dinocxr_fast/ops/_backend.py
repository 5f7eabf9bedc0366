"""Backend choice for the fused ops (DESIGN.md, "The contract of a fused op", point 2).

Each op declares the backends it implements, in its order of preference per device type, and
how to tell whether each is usable for a tensor's device. ``backend="auto"`` takes the first
usable one; ``DINOCXR_BACKEND=<name>`` forces one for every op that has it; naming a backend that
is unknown raises ``ValueError``, naming one that is not built or not usable here raises
``RuntimeError`` with the reason.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Mapping, Sequence

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


def resolve(
    op: str,
    requested: str,
    device: torch.device,
    implemented: Mapping[str, Sequence[str]],
) -> str:
    """Pick the backend for one call of ``op``.

    ``implemented`` maps a device type ("cpu", "cuda") to the backends this op has for it, fastest
    first; "auto" never picks the Triton interpreter, which exists for testing only.
    """
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested not in BACKENDS and requested != "auto":
        raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {('auto',) + BACKENDS}")
    all_known = {b for bs in implemented.values() for b in bs}
    if requested == "auto":
        for candidate in implemented.get(device.type, ("torch",)):
            if candidate == "triton" and device.type != "cuda":
                continue
            if why_unavailable(candidate, device) is None:
                return candidate
        return "torch"
    if requested not in all_known:
        raise RuntimeError(f"{op}: no {requested!r} backend is implemented for this op (it has {sorted(all_known)})")
    reason = why_unavailable(requested, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} is not usable here: {reason}")
    return requested


Dispatch = Mapping[str, Callable]
