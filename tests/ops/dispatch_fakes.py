"""A fake fused op whose custom backend misbehaves on demand, for tests/ops/test_dispatch.py.

``y = 2 x``. The vendor path (``torch``) sleeps a little per call so that a correct custom
backend (``cpp``) is faster; DINOCXR_FAKE_MODE (read per call, so a child process sees it too)
makes the custom backend wrong, raise, return NaN, be slower, hang or kill its process.
"""
from __future__ import annotations

import os
import time

import torch

from dinocxr_fast.ops import _dispatch, _verify

IMPLEMENTED = {"cpu": ("cpp", "torch")}
VENDOR_SLEEP_S = 0.004
calls = {"cpp": 0, "torch": 0}


def _vendor(x):
    calls["torch"] += 1
    time.sleep(VENDOR_SLEEP_S)
    return x * 2


def _custom(x):
    calls["cpp"] += 1
    mode = os.environ.get("DINOCXR_FAKE_MODE", "right")
    if mode == "wrong":
        return x * 2.01
    if mode == "raise":
        raise RuntimeError("the fake kernel failed to compile")
    if mode == "nan":
        return x * float("nan")
    if mode == "slow":
        time.sleep(5 * VENDOR_SLEEP_S)
    if mode == "hang":
        time.sleep(3600)
    if mode == "exit":
        os._exit(3)  # what an illegal memory access does to a process
    return x * 2


def fake_scale(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    choice = _dispatch.choose("fake_scale", backend, x.device, IMPLEMENTED,
                              lambda: {"batch": x.shape[0], "n": x.shape[1], "dtype": "float32"})
    if choice.backend == "cpp":
        try:
            return _custom(x)
        except Exception as exc:
            if not choice.may_demote:
                raise
            _dispatch.demote("fake_scale", "cpp", exc)
    return _vendor(x)


def _inputs(case, device):
    return {"x": _verify.randn(_verify.seeded(case), (case["batch"], case["n"]), device)}


def _run(backend, x):
    if backend == _verify.REFERENCE:
        return _verify.forward_backward(lambda: x["x"] * 2, x)
    return _verify.forward_backward(lambda: fake_scale(x["x"], backend=backend), x)


SPEC = _verify.OpSpec("fake_scale", IMPLEMENTED, _inputs, _run, lambda c: f"{c['batch']}x{c['n']}")
_verify.register("fake_scale", f"{__name__}:SPEC")
