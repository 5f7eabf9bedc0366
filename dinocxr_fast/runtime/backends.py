"""Start-up planning of the fused ops' backends for a training run (ops/_dispatch.py).

Before the first step the job runs its student, teacher and DINO loss once on synthetic views of
the run's batch and view sizes (no gradients, model buffers and RNG restored afterwards), with
the dispatch recording every fused-op call. Each distinct (op, shape, dtype) is then verified and
timed on this device, unless the verdict cache already holds it, and the outcome is printed as
one table and written to RUN/backends.md and RUN/backends.json.

``dino.backend`` (``--backend NAME``) is applied here to every op of the model, not only the loss:
an op that lacks that backend, or cannot run it here, falls back to ``auto`` with a warning.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from dinocxr_fast.ops import _dispatch, dino_loss

log = logging.getLogger("dinocxr_fast.train")


def _record_calls(job) -> list:
    views = [torch.randn(int(job.cfg["optim"]["batch_size"]), job.views.channels, v.size, v.size, device=job.device)
             for v in job.views.views]
    models = (job.student, job.teacher)
    saved = [[b.detach().clone() for b in m.buffers()] for m in models]
    with _dispatch.recording() as calls, torch.no_grad(), job.autocast():
        student_out = job.student(views).float()
        teacher_out = job.teacher(views[: job.n_global]).float()
        dino_loss(student_out, teacher_out, torch.zeros(student_out.shape[1], device=job.device),
                  student_temp=job.dino_loss.student_temp, teacher_temp=float(job.dino_loss.temp_schedule[0]),
                  n_global=job.n_global, check_finite=False)
    for m, buffers in zip(models, saved):
        for b, s in zip(m.buffers(), buffers):
            b.copy_(s)
    return calls


def plan_backends(job, forced: str | None) -> list[_dispatch.PlanRow]:
    """Plan the backends of ``job`` (a PretrainJob) on its device; the table goes to stderr and the run folder."""
    _dispatch.set_forced(forced)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[job.device] if job.device.type == "cuda" else []):
        calls = _record_calls(job)
        rows = _dispatch.plan(calls, progress=lambda m: log.info("backends: %s", m))
    title = (f"Fused-op backends on {job.device} (forced: {forced or 'none'}; planned in "
             f"{time.perf_counter() - t0:.1f} s; custom backends only where verified and faster than vendor)")
    table = _dispatch.format_table(rows, title)
    if job.is_main:
        print(table, file=sys.stderr, flush=True)
        run_dir = Path(job.run_dir)
        (run_dir / "backends.md").write_text(table + "\n")
        (run_dir / "backends.json").write_text(json.dumps(
            {"device": str(job.device), "forced": forced, "rows": [r.as_dict() for r in rows]}, indent=1) + "\n")
    return rows
