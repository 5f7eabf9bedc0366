"""The one rule that picks the backend of every fused op (DESIGN.md, "The contract of a fused op").

For each call, in this order:

1. ``backend=<name>`` on the call: that backend. Unknown names are a ``ValueError``; one that is
   not built or cannot run on the tensors' device a ``RuntimeError``; one the op does not have at
   all falls through to ``auto`` with a warning (once).
2. A process-wide choice, ``set_forced(name)`` (the trainer's ``--backend`` / ``dino.backend``)
   or ``DINOCXR_BACKEND=<name>``: that backend wherever the op has it and can run it; anywhere
   else ``auto``, with a warning (once per op).
3. ``auto``: the vendor path (the ``torch`` backend: SDPA / cuDNN / oneDNN eager) unless a custom
   backend holds a passing verdict for this device, op, dtype and shape bucket (``_verify``: it
   matched the reference forward and backward within the dtype's tolerance and was faster than
   the vendor path). Verdicts come from ``plan()`` (the trainer plans its model at start-up, the
   selfcheck plans its shapes) and from the cache of earlier runs (``_verdict_cache``); a call
   nobody planned runs the vendor path. Among passing backends the fastest wins.

A custom backend that raises during a call under 2. or 3. is demoted for the rest of the process
(``demote``) and the op recomputes that call with the vendor path; the log says so once. One that
raises in its backward pass (when the forward is long gone) raises ``BackendError``; the training
loop (``trainer/loop.py``) demotes it and recomputes the whole step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from dinocxr_fast.ops import _backend, _verdict_cache, _verify

VENDOR = _verify.VENDOR
ENV_VAR = _backend.ENV_VAR
log = logging.getLogger("dinocxr_fast.ops")

_forced: str | None = None
_verdicts: dict[str, dict[str, dict]] = {}  # device key -> verdict key -> verdict
_demoted: dict[tuple[str, str], str] = {}  # (op, backend) -> why
_said: set[str] = set()
_recording: list | None = None


@dataclass(frozen=True)
class Choice:
    backend: str
    mode: str  # "explicit" (backend= on the call), "forced" (process-wide) or "auto"

    @property
    def may_demote(self) -> bool:
        return self.mode != "explicit" and self.backend != VENDOR


def say_once(message: str, level: int = logging.WARNING, *, warn: bool = False, key: str | None = None) -> None:
    """Log ``message`` the first time ``key`` (default: the message) comes up in this process."""
    key = key or message
    if key in _said:
        return
    _said.add(key)
    log.log(level, message)
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def set_forced(name: str | None) -> None:
    """Make ``name`` every op's backend in this process (None or "auto": the rule decides)."""
    global _forced
    if name is not None and name != "auto" and name not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + _backend.BACKENDS}")
    _forced = None if name in (None, "auto") else name


def forced() -> str:
    return _forced or os.environ.get(ENV_VAR, "") or "auto"


def reset() -> None:
    """Forget verdicts, demotions and warnings held in this process (tests; a new cache folder)."""
    global _forced
    _verdicts.clear()
    _demoted.clear()
    _said.clear()
    _forced = None


# ---- verdicts ------------------------------------------------------------------------------------
def _device_key(device: torch.device) -> str:
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type


def _verdicts_for(device: torch.device) -> dict[str, dict]:
    key = _device_key(device)
    if key not in _verdicts:
        _verdicts[key] = _verdict_cache.load(device)
    return _verdicts[key]


def shape_bucket(case: dict) -> str:
    """The case with its batch rounded up to a power of two: verdicts carry over between batch
    sizes of the same magnitude (the last, smaller batch of an epoch, another GPU count)."""
    bucketed = dict(case)
    if "batch" in bucketed:
        bucketed["batch"] = 1 << max(int(bucketed["batch"]) - 1, 0).bit_length()
    return json.dumps(bucketed, sort_keys=True, separators=(",", ":"))


def verdict_key(op: str, backend: str, case: dict) -> str:
    return f"{op}|{backend}|{case['dtype']}|{shape_bucket(case)}"


def verdict(op: str, backend: str, case: dict, device: torch.device) -> dict | None:
    return _verdicts_for(device).get(verdict_key(op, backend, case))


def candidates(op: str, device: torch.device, implemented: Mapping[str, Sequence[str]]) -> list[str]:
    """The custom backends ``auto`` could take for ``op`` here (built, usable, not demoted)."""
    out = []
    for name in implemented.get(device.type, ()):
        if name == VENDOR or (name == "triton" and device.type != "cuda"):  # never the interpreter
            continue
        if (op, name) in _demoted or _backend.why_unavailable(name, device) is not None:
            continue
        out.append(name)
    return out


@torch.compiler.assume_constant_result  # under torch.compile: looked up once while tracing, a constant after
def _auto_backend(op: str, device: torch.device, names: tuple, case: dict) -> str:
    return _best(op, device, names, case)


def _best(op: str, device: torch.device, names: Sequence[str], case: dict) -> str:
    best, best_speedup = VENDOR, 0.0
    for name in names:
        v = verdict(op, name, case, device)
        if v is not None and v.get("ok") and (v.get("speedup") or 0.0) > best_speedup:
            best, best_speedup = name, v["speedup"]
    return best


# ---- the rule ------------------------------------------------------------------------------------
def choose(op: str, requested: str, device: torch.device, implemented: Mapping[str, Sequence[str]],
           case: Callable[[], dict] | None = None) -> Choice:
    """The backend for one call of ``op`` (see the module docstring). ``case`` describes the call
    (shape, dtype) for the verdict lookup; it is only evaluated when needed."""
    known = {b for bs in implemented.values() for b in bs} | {VENDOR}
    if requested != "auto":
        if requested not in _backend.BACKENDS:
            raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {('auto',) + _backend.BACKENDS}")
        if requested in known:
            reason = _backend.why_unavailable(requested, device)
            if reason is not None:
                raise RuntimeError(f"{op}: backend {requested!r} is not usable here: {reason}")
            return Choice(requested, "explicit")
        say_once(f"{op}: no {requested!r} backend is implemented for this op (it has {sorted(known)}); "
                 f"using auto", warn=True)
    if _recording is not None and case is not None:
        _recording.append((op, device, case()))
    process_wide = forced()
    if process_wide != "auto":
        if process_wide not in _backend.BACKENDS:
            raise ValueError(f"{op}: unknown backend {process_wide!r} (from {ENV_VAR} or --backend); "
                             f"choose one of {('auto',) + _backend.BACKENDS}")
        reason = None if process_wide in known else "the op does not have it"
        reason = reason or _backend.why_unavailable(process_wide, device)
        if (op, process_wide) in _demoted:
            reason = f"it was demoted ({_demoted[(op, process_wide)]})"
        if reason is None:
            return Choice(process_wide, "forced")
        say_once(f"{op}: backend {process_wide!r} was asked for but cannot run here ({reason}); using auto", warn=True)
    names = candidates(op, device, implemented)
    if not names or case is None:
        return Choice(VENDOR, "auto")
    return Choice(_auto_backend(op, device, tuple(names), case()), "auto")


def fall_back(op: str, choice: Choice, reason: str) -> Choice:
    """The vendor path for a call the chosen backend does not cover (dtype, shape, autocast)."""
    if choice.mode == "forced":
        say_once(f"{op}: backend {choice.backend!r} cannot run this call ({reason}); using the vendor path",
                 warn=True)
    return Choice(VENDOR, choice.mode)


def unless_uncovered(op: str, choice: Choice, problem: tuple[str, str] | None) -> Choice:
    """``choice`` when its backend covers the call (``problem`` None); else, for a backend named on
    the call, a ValueError "<argument>: <why>", and the vendor path otherwise."""
    if problem is None:
        return choice
    name, why = problem
    if choice.mode == "explicit":
        raise ValueError(f"{name}: {why}")
    return fall_back(op, choice, f"{name}: {why}")


def demote(op: str, backend: str, exc: BaseException) -> None:
    """``backend`` raised during a call of ``op``: never use it again in this process."""
    why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    _demoted[(op, backend)] = why
    say_once(f"{op}: backend {backend!r} raised {why}; demoted for the rest of this process, "
             f"the call was recomputed with the vendor path ({VENDOR})")


def demoted() -> dict[tuple[str, str], str]:
    return dict(_demoted)


class BackendError(RuntimeError):
    """A custom backend raised in a backward pass. The call's own forward cannot be redone from
    there, so the training loop catches this, calls ``demote()`` and recomputes the step."""

    def __init__(self, ops: tuple[str, ...], backend: str, cause: BaseException):
        self.ops, self.backend, self.cause = ops, backend, cause
        super().__init__(f"{'/'.join(ops)}: backend {backend!r} raised in its backward pass: "
                         f"{type(cause).__name__}: {cause}")

    def demote(self) -> None:
        for op in self.ops:
            demote(op, self.backend, self.cause)


@contextlib.contextmanager
def backward_of(ops: str | tuple[str, ...], backend: str) -> Iterator[None]:
    """Around a custom backend's backward: any error becomes a ``BackendError`` naming it.
    ``ops``: every op that may have run this backward (the cpp BN+act serves two)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the backend named
        raise BackendError(ops if isinstance(ops, tuple) else (ops,), backend, exc) from exc


# ---- planning: verify what a run will call --------------------------------------------------------
@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect (op, device, case) of every call not given a backend by name (auto or forced)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def _isolate(backend: str, device: torch.device) -> bool:
    return device.type == "cuda" or backend in ("cuda", "triton")


@dataclass
class PlanRow:
    op: str
    shape: str
    dtype: str
    chosen: str
    speedup: float | None
    max_err: float | None
    refused: dict[str, str]
    vendor_ms: float | None
    ms: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan(calls: Sequence[tuple[str, torch.device, dict]], *, reverify: bool = False, check_vendor: bool = False,
         isolate: Callable[[str, torch.device], bool] = _isolate,
         progress: Callable[[str], None] | None = None, time_budget_s: float | None = None) -> list[PlanRow]:
    """Verify and time every custom backend for every distinct (op, device, case) in ``calls``
    that holds no verdict yet (all of them with ``reverify``), store the verdicts (memory and
    cache) and return one row per distinct call. Where an op has no custom backend on the device
    the vendor path is only checked against the reference with ``check_vendor``."""
    unique: dict[tuple, tuple[str, torch.device, dict]] = {}
    for op, device, case in calls:
        unique.setdefault((op, str(device), verdict_key(op, "", case)), (op, device, case))
    inline: list[tuple[str, torch.device, dict, list[str]]] = []
    isolated: dict[tuple[str, str], list[tuple[str, dict, list[str]]]] = {}
    for op, device, case in unique.values():
        spec = _verify.spec(op)
        names = [n for n in candidates(op, device, spec.custom) if not spec.is_vendor(n, case)]
        todo = [n for n in names if reverify or verdict(op, n, case, device) is None]
        inline_names = [n for n in todo if not isolate(n, device)]
        vendor_missing = (reverify or verdict(op, VENDOR, case, device) is None) and (names or check_vendor)
        if inline_names or (vendor_missing and len(inline_names) == len(todo)):  # a child times the vendor too
            inline.append((op, device, case, inline_names))
        for n in todo:
            if isolate(n, device):
                isolated.setdefault((n, str(device)), []).append((op, case, [n]))
    touched: set[torch.device] = set()
    for i, (op, device, case, names) in enumerate(inline):
        if progress:
            progress(f"verifying {op} {_verify.spec(op).describe(case)} ({i + 1}/{len(inline)})")
        try:
            verdicts = _verify.verify_case(_verify.spec(op), case, names, device, check_vendor=check_vendor,
                                           time_budget_s=time_budget_s)
        except Exception as exc:  # noqa: BLE001 - the reference or the vendor path failed: trust nothing here
            verdicts = _verify.failed(names, f"verification failed: {type(exc).__name__}: {exc}"[:300])
        _store(op, device, case, verdicts)
        touched.add(device)
    for (name, device_str), jobs in isolated.items():
        device = torch.device(device_str)
        if progress:
            progress(f"verifying backend {name} on {device} in a child process ({len(jobs)} cases)")
        for (op, case, _), verdicts in zip(jobs, _verify.verify_isolated(jobs, device, time_budget_s=time_budget_s)):
            _store(op, device, case, verdicts)
        touched.add(device)
    for device in touched:
        _verdict_cache.save(device, _verdicts_for(device))
    return [_row(op, device, case) for op, device, case in unique.values()]


def _store(op: str, device: torch.device, case: dict, verdicts: Sequence[dict]) -> None:
    table = _verdicts_for(device)
    for v in verdicts:
        table[verdict_key(op, v["backend"], case)] = v
        if not v["ok"]:
            say_once(f"{op} {_verify.spec(op).describe(case)} {case['dtype']}: backend {v['backend']!r} "
                     f"not chosen: {v['reason']}", logging.INFO, key=verdict_key(op, v["backend"], case))


def _row(op: str, device: torch.device, case: dict) -> PlanRow:
    spec = _verify.spec(op)
    names = [n for n in spec.custom.get(device.type, ())
             if n != VENDOR and not (n == "triton" and device.type != "cuda") and not spec.is_vendor(n, case)]
    refused = {}
    for n in names:
        why = _backend.why_unavailable(n, device) or _demoted.get((op, n))
        v = verdict(op, n, case, device)
        if why is None and v is not None and not v["ok"]:
            why = v["reason"]
        if why is not None:
            refused[n] = why
    usable = [n for n in names if n not in refused]
    chosen = _best(op, device, usable, case)
    process_wide = forced()
    if process_wide in spec.custom.get(device.type, ()) and _backend.why_unavailable(process_wide, device) is None:
        chosen = process_wide  # forced: taken whatever its verdict (the row still shows the verdict's numbers)
    vendor = verdict(op, VENDOR, case, device) or {}
    label = f"{chosen} (forced)" if chosen == process_wide else chosen
    if chosen == VENDOR:
        return PlanRow(op, spec.describe(case), case["dtype"], label, 1.0, vendor.get("max_err"), refused,
                       vendor.get("ms"), vendor.get("ms"))
    v = verdict(op, chosen, case, device) or {}
    return PlanRow(op, spec.describe(case), case["dtype"], label, v.get("speedup"), v.get("max_err"), refused,
                   v.get("vendor_ms"), v.get("ms"))


def format_table(rows: Sequence[PlanRow], title: str = "") -> str:
    """Markdown: one line per op and shape, the choice, its speed-up and error, and refusals."""
    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = [title] if title else []
    lines += ["| op | shape | dtype | chosen | speed-up vs vendor | max error | vendor ms | refused (why) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        refused = "; ".join(f"{k}: {v}" for k, v in r.refused.items()) or "-"
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.chosen} | {num(r.speedup, '.2f')}x | "
                     f"{num(r.max_err, '.1e')} | {num(r.vendor_ms, '.2f')} | {refused} |")
    return "\n".join(lines)
