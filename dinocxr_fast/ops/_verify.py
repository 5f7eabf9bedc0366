"""Proof before trust: a custom backend checked against the op's reference and timed against the vendor path.

``verify_case`` runs, for one op at one shape and dtype, the reference (in float64, the
specification), the vendor path (the ``torch`` backend: SDPA / cuDNN / oneDNN eager) and each
custom backend, forward and backward with a fixed upstream gradient, and returns one verdict
per backend::

    {"backend", "ok", "reason", "max_err", "tol", "ms", "vendor_ms", "speedup"}

A backend passes when it neither raises nor returns non-finite values where the reference is
finite, its largest error (``max |got - ref| / max(1, max |ref|)`` over outputs and gradients)
is within ``TOLERANCE[dtype]``, and it is at least ``MIN_SPEEDUP`` times faster than the vendor
path (the two are timed alternately, so a busy machine slows both alike).

``verify_isolated`` runs the same in a child process (``spawn``), one child per backend working
through its cases: an illegal memory access or a hang (per-case timeout) fails the case in
progress instead of killing or poisoning the caller, and a fresh child takes the remaining cases.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import multiprocessing
import os
import statistics
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import torch

VENDOR = "torch"
REFERENCE = "reference"
# Largest error a backend may show against the float64 reference, relative to
# max(1, max |reference|), per input dtype: a few units in the last place of the dtype, with room
# for the reductions of BatchNorm's backward over a batch (the vendor path itself reaches ~3e-4
# in float32 there). A wrong kernel is off by far more.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}
MIN_SPEEDUP = 1.03
CASE_TIMEOUT_S = float(os.environ.get("DINOCXR_VERIFY_TIMEOUT", "120"))
START_TIMEOUT_S = 300.0  # a child's import of torch and first CUDA context may be slow


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What the verifier needs to know about one op.

    ``custom``: device type -> the custom backends ``auto`` may take there (the vendor path is
    implicit). ``make_inputs(case, device)``: fresh leaf tensors for one call (the same values
    every time). ``run(backend, inputs)``: outputs and gradients of one forward + backward, with
    ``backend`` a backend name or ``"reference"``. ``describe(case)``: the shape as a short text.
    ``is_vendor(backend, case)``: True where a backend runs the vendor path itself for such a
    call (nothing to verify or time).
    """

    name: str
    custom: Mapping[str, Sequence[str]]
    make_inputs: Callable[[dict, torch.device], dict]
    run: Callable[[str, dict], list]
    describe: Callable[[dict], str]
    is_vendor: Callable[[str, dict], bool] = lambda backend, case: False


_REFS: dict[str, str] = {}


def register(op: str, ref: str) -> None:
    """``ref`` is "module:attribute" of the op's OpSpec, importable in a child process."""
    _REFS[op] = ref


def refs() -> dict[str, str]:
    return dict(_REFS)


def spec(op: str) -> OpSpec:
    if op not in _REFS:
        raise KeyError(f"no verification spec registered for op {op!r}")
    module, attr = _REFS[op].split(":")
    return getattr(importlib.import_module(module), attr)


# ---- one forward + backward ------------------------------------------------------------------------
def seeded(case: dict) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(zlib.crc32(repr(sorted(case.items())).encode()))  # str hash() is salted per process
    return gen


def randn(gen: torch.Generator, shape, device, dtype=torch.float32, *, scale=1.0, grad=True) -> torch.Tensor:
    t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def leaves(inputs: dict) -> dict:
    """``inputs`` with every tensor made a leaf (``randn(...) + 1`` is not one), keeping requires_grad."""
    return {k: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def forward_backward(fn: Callable[[], Any], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """``fn()``'s outputs, then the gradients of every input that requires one, for the upstream
    gradient cos(i) over the flattened outputs (fixed, so every backend sees the same)."""
    out = fn()
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    total = None
    for o in outs:
        if o.requires_grad:
            g = torch.cos(torch.arange(o.numel(), device=o.device, dtype=torch.float64)).reshape(o.shape)
            term = (o.double() * g).sum()
            total = term if total is None else total + term
    grads = []
    if total is not None and leaves:
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    result = [o.detach() for o in outs]
    result += [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)]
    # Buffers an op updates in place (BatchNorm running statistics) are outputs too.
    result += [t.detach().clone() for k, t in inputs.items()
               if k.startswith("running_") and isinstance(t, torch.Tensor)]
    return result


def _as_reference(inputs: dict) -> dict:
    out = {}
    for k, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().double().requires_grad_(t.requires_grad)
        out[k] = t
    return out


def max_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    if len(got) != len(ref):
        return math.inf
    worst = 0.0
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            return math.inf
        if r.numel() == 0:
            continue
        r = r.double()
        err = float((g.double() - r).abs().max()) / max(1.0, float(r.abs().max()))
        worst = max(worst, err if err == err else math.inf)
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fa: Callable, fb: Callable, device: torch.device, budget_s: float,
               min_runs: int = 3) -> tuple[float, float]:
    """Median ms of ``fa`` and ``fb``, run alternately for about ``budget_s`` (``min_runs`` to 25 runs each)."""
    ta, tb = [], []
    start = time.perf_counter()
    while len(ta) < min_runs or (len(ta) < 25 and time.perf_counter() - start < budget_s):
        for f, acc in ((fa, ta), (fb, tb)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            acc.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def verify_case(spec_: OpSpec, case: dict, backends: Sequence[str], device: torch.device,
                *, time_budget_s: float | None = None, check_vendor: bool = True) -> list[dict]:
    """Verdicts for the vendor path (first; its error only with ``check_vendor``) and each of
    ``backends`` at ``case``."""
    dtype = getattr(torch, case["dtype"])
    tol = TOLERANCE[dtype]
    budget = time_budget_s if time_budget_s is not None else (0.05 if device.type == "cpu" else 0.2)
    min_runs = 2 if device.type == "cpu" else 5  # the CPU plans at start-up of every run: keep it to seconds

    def run(name: str) -> list[torch.Tensor]:
        inputs = spec_.make_inputs(case, device)
        if name == REFERENCE:
            inputs = _as_reference(inputs)
        return spec_.run(name, inputs)

    ref = run(REFERENCE)
    vendor_err = max_error(run(VENDOR), ref) if check_vendor or not backends else None
    verdicts = [{"backend": VENDOR, "ok": True, "reason": None, "max_err": vendor_err, "tol": tol}]
    vendor_ms = None
    for name in backends:
        verdict = {"backend": name, "ok": False, "reason": None, "max_err": None, "tol": tol,
                   "ms": None, "vendor_ms": None, "speedup": None}
        verdicts.append(verdict)
        try:
            got = run(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate is its verdict
            verdict["reason"] = f"raised {_one_line(exc)}"
            continue
        err = max_error(got, ref)
        verdict["max_err"] = err
        finite_ref = all(bool(torch.isfinite(r).all()) for r in ref)
        if finite_ref and not all(bool(torch.isfinite(g).all()) for g in got):
            verdict["reason"] = "returned non-finite values"
            continue
        if not err <= tol:
            verdict["reason"] = f"max error {err:.2e} > tolerance {tol:.0e} ({case['dtype']})"
            continue
        try:
            vendor_ms, ms = _time_pair(lambda: run(VENDOR), lambda n=name: run(n), device, budget, min_runs)
        except Exception as exc:  # noqa: BLE001
            verdict["reason"] = f"raised while timed: {_one_line(exc)}"
            continue
        speedup = vendor_ms / ms if ms > 0 else math.inf
        verdict.update(ms=ms, vendor_ms=vendor_ms, speedup=speedup)
        if speedup < MIN_SPEEDUP:
            verdict["reason"] = f"slower than the vendor path ({speedup:.2f}x, needs {MIN_SPEEDUP:.2f}x)"
            continue
        verdict["ok"] = True
    if vendor_ms is None:  # no candidate got as far as timing: time the vendor path alone
        vendor_ms, _ = _time_pair(lambda: run(VENDOR), lambda: None, device, budget / 2, min_runs)
    verdicts[0]["ms"] = vendor_ms
    return verdicts


# ---- isolation -------------------------------------------------------------------------------------
def _child(conn, op_refs: dict, device: str, jobs: list, env: dict, time_budget_s: float | None = None) -> None:
    os.environ.update(env)
    for op, ref in op_refs.items():
        register(op, ref)
    dev = torch.device(device)
    conn.send(("ready",))
    for i, (op, case, backends) in enumerate(jobs):
        conn.send(("start", i))
        conn.send(("done", i, verify_case(spec(op), case, backends, dev, time_budget_s=time_budget_s)))
    conn.close()


def failed(backends: Sequence[str], reason: str, tol: float | None = None) -> list[dict]:
    return [{"backend": b, "ok": False, "reason": reason, "max_err": None, "tol": tol, "ms": None,
             "vendor_ms": None, "speedup": None} for b in backends]


def verify_isolated(jobs: Sequence[tuple[str, dict, Sequence[str]]], device: torch.device, *,
                    timeout_s: float = CASE_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S,
                    time_budget_s: float | None = None) -> list[list[dict]]:
    """``verify_case`` for each job (op, case, backends), in spawned children; results in job order."""
    results: list[list[dict] | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    ctx = multiprocessing.get_context("spawn")
    env = {k: v for k, v in os.environ.items() if k.startswith(("DINOCXR_", "TRITON_", "CUDA_"))}
    while pending:
        batch = pending
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(sender, refs(), str(device), [jobs[i] for i in batch], env,
                                                time_budget_s), daemon=True)
        proc.start()
        sender.close()
        current, wait, ready, stop = None, start_timeout_s, False, None
        while stop is None:
            if not receiver.poll(wait):
                stop = f"timed out after {wait:.0f} s" if ready else f"child did not start within {wait:.0f} s"
                proc.kill()
                break
            try:
                msg = receiver.recv()
            except (EOFError, OSError):
                proc.join(10)
                if current is None and ready and all(results[i] is not None for i in batch):
                    break
                stop = f"crashed the verifying process (exit code {proc.exitcode})"
                break
            if msg[0] == "ready":
                ready, wait = True, timeout_s
            elif msg[0] == "start":
                current = batch[msg[1]]
            elif msg[0] == "done":
                results[batch[msg[1]]], current = msg[2], None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        receiver.close()
        if stop is not None:
            blamed = [current] if current is not None else [i for i in batch if results[i] is None]
            for i in blamed:
                op, case, backends = jobs[i]
                results[i] = failed(backends, stop, TOLERANCE.get(getattr(torch, case.get("dtype", ""), None)))
        pending = [i for i in batch if results[i] is None]
    return results  # type: ignore[return-value]
