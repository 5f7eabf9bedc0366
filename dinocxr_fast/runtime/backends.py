"""Start-up planning of the fused ops' backends (ops/_dispatch.py), for every command that runs the model.

Before its work a command runs its model once on synthetic inputs of its batch and image sizes
(no gradients; model buffers and RNG restored afterwards), with the dispatch recording every
fused-op call: pretraining its student, teacher and DINO loss on the run's views
(``pretrain_calls``); fine-tuning, linear evaluation, ``evaluate`` and ``infer`` the classifier
or backbone forward they run (``model_calls``). Each distinct (op, shape, dtype) is then verified
and timed on this device, unless the verdict cache already holds it (a second run re-verifies
nothing), and the outcome is one line of the command's start-up block (``summary``), with the
whole table in ``OUT/backends.md`` and ``OUT/backends.json`` where the command has an output folder.

``dino.backend`` (``--backend NAME``) is applied here to every op of the model, not only the loss:
an op that lacks that backend, or cannot run it here, falls back to ``auto`` with a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dinocxr_fast.ops import _dispatch, dino_loss

log = logging.getLogger("dinocxr_fast.train")


@dataclass
class BackendPlan:
    rows: list[_dispatch.PlanRow]
    table: str  # markdown, as in OUT/backends.md
    seconds: float
    written: Path | None = None  # OUT/backends.md, when written

    @property
    def summary(self) -> str:
        return summary(self.rows, self.written)


def record_calls(forward: Callable[[], object], modules: Sequence[torch.nn.Module], autocast=None) -> list:
    """(op, device, case) of every fused-op call ``forward()`` makes, run once with no gradients;
    the buffers of ``modules`` (BatchNorm statistics) are restored afterwards."""
    saved = [[b.detach().clone() for b in m.buffers()] for m in modules]
    try:
        with _dispatch.recording() as calls, torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            forward()
    finally:
        with torch.no_grad():
            for m, buffers in zip(modules, saved):
                for b, s in zip(m.buffers(), buffers):
                    b.copy_(s)
    return calls


def pretrain_calls(job) -> list:
    """The calls of one pretraining step's forward: student on every view, teacher on the global
    views, the DINO loss."""
    views = [torch.randn(int(job.cfg["optim"]["batch_size"]), job.views.channels, v.size, v.size, device=job.device)
             for v in job.views.views]

    def forward():
        student_out = job.student(views).float()
        teacher_out = job.teacher(views[: job.n_global]).float()
        dino_loss(student_out, teacher_out, torch.zeros(student_out.shape[1], device=job.device),
                  student_temp=job.dino_loss.student_temp, teacher_temp=float(job.dino_loss.temp_schedule[0]),
                  n_global=job.n_global, check_finite=False)

    return record_calls(forward, (job.student, job.teacher), job.autocast)


def model_calls(model: torch.nn.Module, *, batch: int, channels: int, size: int, device: torch.device,
                train: bool = False, autocast=None) -> list:
    """The calls of ``model``'s forward on a batch of ``batch`` images of ``channels`` x ``size`` px,
    in training (BatchNorm batch statistics) or evaluation mode."""
    x = torch.randn(int(batch), int(channels), int(size), int(size), device=device)
    was_training = model.training
    model.train(train)
    try:
        return record_calls(lambda: model(x), (model,), autocast)
    finally:
        model.train(was_training)


def plan(record: Callable[[], list], device: torch.device, *, forced: str | None = None, out_dir: Path | None = None,
         write: bool = True) -> BackendPlan:
    """Record the calls (``record()``), verify what the verdict cache does not hold, and return the
    plan; with ``out_dir`` (and ``write``: the main process) the table goes to OUT/backends.md/json."""
    _dispatch.set_forced(forced)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        calls = record()
        rows = _dispatch.plan(calls, progress=lambda m: log.info("backends: %s", m))
    seconds = time.perf_counter() - t0
    title = (f"Fused-op backends on {device} (forced: {forced or _dispatch.forced()}; planned in {seconds:.1f} s; "
             f"custom backends only where verified and faster than vendor)")
    table = _dispatch.format_table(rows, title)
    written = None
    if out_dir is not None and write:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = out_dir / "backends.md"
        written.write_text(table + "\n")
        (out_dir / "backends.json").write_text(json.dumps(
            {"device": str(device), "forced": forced, "seconds": round(seconds, 3),
             "rows": [r.as_dict() for r in rows]}, indent=1) + "\n")
    return BackendPlan(rows, table, seconds, written)


def summary(rows: Sequence[_dispatch.PlanRow], table: Path | None = None) -> str:
    """One line: per op, the backend each of its call shapes got, e.g.
    ``pcm cpp 2/7 torch 5/7; attention torch 2/2; dino_loss cpp 1/1 (table: RUN/backends.md)``."""
    per_op: dict[str, Counter] = {}
    for r in rows:
        per_op.setdefault(r.op, Counter())[r.chosen] += 1
    parts = []
    for op, chosen in per_op.items():
        n = sum(chosen.values())
        parts.append(f"{op} " + " ".join(f"{name} {k}/{n}" for name, k in chosen.most_common()))
    text = "; ".join(parts) or "no fused op called"
    return f"{text} (table: {table})" if table is not None else text


def plan_backends(job, forced: str | None) -> BackendPlan:
    """Plan the backends of ``job`` (a PretrainJob) on its device; the table goes to the run folder."""
    return plan(lambda: pretrain_calls(job), job.device, forced=forced, out_dir=job.run_dir, write=job.is_main)
