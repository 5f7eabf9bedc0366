"""The training loop every job shares (pretraining, fine-tuning): epochs over a resumable loader,
logging, atomic checkpoints at step granularity, SIGTERM/SIGINT handling, time and step budgets.

A subclass builds its models and loader in ``__init__`` (after calling ``super().__init__``) and
implements ``train_step``, ``model_state``/``load_model_state``, and optionally the hooks
``log_fields``, ``on_epoch_end``, ``on_finish`` and ``summary_lines``.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from dinocxr_fast.cli import command_start
from dinocxr_fast.config import save_config
from dinocxr_fast.ops import _dispatch
from dinocxr_fast.runtime import checkpoint as ckpt
from dinocxr_fast.runtime import distributed
from dinocxr_fast.runtime.budget import Budget
from dinocxr_fast.runtime.precision import autocast, resolve_precision
from dinocxr_fast.runtime.run_log import MetricsWriter, Progress, print_startup
from dinocxr_fast.trainer.checkpointing import RunCheckpoints
from dinocxr_fast.trainer.stop_signals import StopSignals

log = logging.getLogger("dinocxr_fast.train")
SLOW_CHECKPOINT_S = 1.0  # checkpoint writes at least this long get a console line


class NonFiniteLossError(RuntimeError):
    """The loss (or a model output) became NaN/inf; the last good state was saved first."""


@dataclass
class StopReason:
    kind: str = "done"  # done | max_steps | max_minutes | signal
    detail: str = ""


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TrainingJob:
    FORMAT = "dinocxr_fast.job/1"
    # config sections that must match the checkpoint's for a resume to be the same run
    RESUME_MUST_MATCH: tuple[str, ...] = ("model", "data")

    def __init__(self, cfg: dict, run_dir: Path, *, show_progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        t = cfg["train"]
        self.device = distributed.device_from(t["device"])
        self.dist = distributed.init_from_env(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(t["precision"], self.device)
        self.is_main = self.dist.is_main
        self.checkpoints = RunCheckpoints(self.run_dir, job_format=self.FORMAT, keep_last=t["keep_last"],
                                          must_match=self.RESUME_MUST_MATCH)
        if self.is_main:
            self.checkpoints.prepare_folder()
        distributed.barrier()
        torch.manual_seed(int(t["seed"]))  # the same initial weights on every rank
        self.step = 0
        self.resumed = False
        self.stop = StopReason()
        self.signals = StopSignals(self.dist)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)
        self.show_progress = show_progress and self.is_main
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        # set by the subclass
        self.loader = None
        self.steps_per_epoch = 1
        self.epochs = int(t["epochs"])
        # the steps this run's schedules span (a subclass fitting them to a budget lowers it)
        self.planned_steps: int | None = None
        # train.max_minutes is the wall time of the whole command: imports and set-up included
        self.t_start = command_start()
        self.clock = time.monotonic  # of the time budget (tests drive a fake one)
        self.budget = Budget(self.t_start, t.get("max_minutes"))  # run() starts it again with the config it runs
        # the fused ops' backends planned for this run (runtime/backends.py), set by the subclass
        self.backend_plan = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def end_step(self, max_steps: int | None) -> int:
        end = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        return end if self.planned_steps is None else min(end, self.planned_steps)

    # ---- subclass interface -----------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        """One optimiser step; returns at least {"loss": tensor}. Must advance self.step."""
        raise NotImplementedError

    def model_state(self) -> dict:
        raise NotImplementedError

    def load_model_state(self, state: dict) -> None:
        raise NotImplementedError

    def weights(self) -> Iterable[torch.Tensor]:
        raise NotImplementedError

    def batch_images(self, batch) -> int:
        """Images in one batch of this process (for images/s)."""
        raise NotImplementedError

    def log_fields(self, out: dict) -> dict:
        return {}

    def progress_fields(self, record: dict) -> dict:
        """Extra fields of the progress line, from the logged record."""
        return {}

    def on_start(self, progress: Progress) -> None:
        """Before the first step of this process (e.g. a baseline evaluation)."""

    def on_epoch_end(self, epoch: int, progress: Progress) -> None:
        pass

    def on_step_end(self, deadline: float | None, progress: Progress) -> None:
        """After every step (and its log line / checkpoint): e.g. refit schedules to the time left."""

    def on_finish(self) -> None:
        pass

    def end_reserve(self) -> float:
        """Seconds the work after the loop (on_finish: a final evaluation, a report) will take, kept
        free of the train.max_minutes budget (runtime/budget.py adds the final checkpoint and the exit)."""
        return 0.0

    def epoch_end_reserve(self, epoch: int) -> float:
        """Seconds ``on_epoch_end(epoch)`` will take (a kNN or validation pass, as last measured)."""
        return 0.0

    def whole_epochs_only(self) -> bool:
        """True when steps past the last epoch end would be thrown away (fine-tuning keeps the best
        validated epoch): under train.max_minutes, start an epoch only if it and its end fit."""
        return False

    def _next_step_fits(self) -> bool:
        """train.max_minutes: does the next step fit, with the epoch-end work between (this step
        ended an epoch) or after it (the next one ends one), and everything after the loop?"""
        if not self.budget.enabled:
            return True
        spe = self.steps_per_epoch
        extra = self.epoch_end_reserve(self.step // spe) if self.step % spe == 0 else 0.0
        if (self.step + 1) % spe == 0:
            extra += self.epoch_end_reserve((self.step + 1) // spe)
        return self.budget.fits(steps=1, extra=extra, end_reserve=self.end_reserve())

    def _next_epoch_fits(self) -> bool:
        if not self.budget.enabled or not self.whole_epochs_only():
            return True
        spe = self.steps_per_epoch
        steps = spe - self.step % spe
        return self.budget.fits(steps=steps, extra=self.epoch_end_reserve((self.step + steps) // spe),
                                end_reserve=self.end_reserve())

    def summary_lines(self, last: dict | None) -> list[str]:
        return []

    def startup_fields(self) -> list[tuple[str, object]]:
        """The subclass's lines of the start-up block: model, data (how many images, from where)."""
        return []

    # ---- setup, state ---------------------------------------------------------------------------
    def save_effective_config(self) -> None:
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")

    def state_dict(self) -> dict:
        return {
            "format": self.FORMAT,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            **self.model_state(),
            "scaler": self.scaler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.cfg,
        }

    def resume_from(self, path: Path) -> None:
        state = self.checkpoints.load_for_resume(path, self.cfg, self.device)
        self.load_model_state(state)
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.resumed = True
        log.info("resumed from %s at step %d", path, self.step)

    # ---- checkpoints ------------------------------------------------------------------------------
    def weights_finite(self) -> bool:
        norms = torch._foreach_norm([w.detach() for w in self.weights()])
        return bool(torch.isfinite(torch.stack(norms)).all())

    def save_checkpoint(self, final: bool = False) -> Path | None:
        if not self.is_main:
            return None
        if not self.weights_finite():
            raise NonFiniteLossError(
                f"step {self.step}: the weights hold NaN/inf; not writing a checkpoint over the last good one")
        return self.checkpoints.save(self.state_dict(), self.step, final=final)

    def _checkpoint(self, progress: Progress) -> None:
        t0, c0 = time.perf_counter(), self.clock()
        path = self.save_checkpoint()
        self.budget.checkpoint_took(self.clock() - c0)
        took = time.perf_counter() - t0
        # A write that the eye would notice says so; the routine sub-second ones (every epoch end
        # of a short run) stay off the console: summary.md names the checkpoints.
        if path is not None and took >= SLOW_CHECKPOINT_S:
            progress.write(f"checkpoint written: {path} ({took:.1f} s)")

    def non_finite(self, what: str, outputs: dict[str, torch.Tensor], debug: dict) -> NonFiniteLossError:
        """Save the last good state (the weights before this step) and what is needed to debug it;
        return the error to raise."""
        terms = [name for name, t in outputs.items() if not bool(torch.isfinite(t).all())]
        where = ", ".join(terms) or "the loss itself (outputs are finite)"
        message = (f"non-finite loss at step {self.step} (epoch {self.step // self.steps_per_epoch}): {what}; "
                   f"non-finite: {where}.")
        if self.is_main:
            saved = []
            try:
                saved.append(str(self.save_checkpoint()))
            except NonFiniteLossError:
                saved.append(f"no checkpoint (the weights are already non-finite; "
                             f"{self.checkpoints.last_good_state()})")
            saved.append(str(self.checkpoints.save_non_finite_dump(self.step, {"what": what, "terms": terms, **debug})))
            message += " Saved: " + "; ".join(saved)
        return NonFiniteLossError(message)

    # ---- helpers ------------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.precision)

    def _train_step_or_demote(self, batch):
        """``train_step``; a custom kernel that fails in its backward pass is demoted (ops/_dispatch.py)
        and the step recomputed on the vendor path. Its forward already ran once, so this one batch
        reaches the BatchNorm running statistics and the DINO centre twice (once per backend and
        process at most). Under DDP every rank must fail alike, or the others wait in all-reduce."""
        try:
            return self.train_step(batch)
        except _dispatch.BackendError as exc:
            exc.demote()
            if self.cfg["train"].get("compile"):
                torch.compiler.reset()  # the compiled graphs hold the demoted backend
            log.warning("step %d: %s; backend %r demoted for %s, the step recomputed on the vendor path",
                        self.step, exc, exc.backend, "/".join(exc.ops))
            return self.train_step(batch)

    def _out_of_time(self, fits: bool) -> bool:
        """The time budget is spent on this rank or (under torchrun) any: all ranks stop at the same step."""
        return distributed.any_rank(not fits) if self.dist.enabled and self.budget.enabled else not fits

    def _next_batch(self, batches):
        """The next batch; a loader whose workers a signal took down counts as a stop, not a crash."""
        try:
            return next(batches)
        except StopIteration:
            raise
        except Exception:
            time.sleep(0.5)  # the signal to this process may trail the one that hit a worker
            if self.signals.name is None:
                raise
            log.warning("the data loader failed after %s; stopping with a checkpoint", self.signals.name)
            return None

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self) -> StopReason:
        t = self.cfg["train"]
        max_steps = int(t["max_steps"]) if t.get("max_steps") is not None else None
        self.budget = Budget(self.t_start, t.get("max_minutes"), clock=self.clock)
        deadline = self.budget.deadline
        log_every, ckpt_every = max(int(t["log_every"]), 1), max(int(t["ckpt_every"]), 1)
        progress = Progress(self.end_step(max_steps), initial=self.step, enabled=self.show_progress)
        self.signals.install()
        window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        out = None
        if self.is_main:
            self._print_startup(max_steps)
        self.metrics.truncate_after(self.step if self.resumed else -1)  # no step logged twice
        out_of_time = f"{t['max_minutes']} min: the time left would not hold another step (or epoch) and the run's end"
        first_step = self.step
        try:
            self.on_start(progress)
            if self._out_of_time(self._next_step_fits()):  # set-up and on_start took the budget
                self.stop = StopReason("max_minutes", out_of_time)
            while self.stop.kind == "done" and self.step < self.end_step(max_steps):
                epoch = self.step // self.steps_per_epoch
                self.loader.set_epoch(epoch)
                batches = iter(self.loader)
                timed_out = stop_agreed = False
                while self.step < self.end_step(max_steps) and self.step // self.steps_per_epoch == epoch:
                    t_step, t_wait = self.clock(), time.perf_counter()
                    try:
                        batch = self._next_batch(batches)
                    except StopIteration:
                        break
                    if batch is None:
                        break
                    window["wait"] += time.perf_counter() - t_wait
                    out = self._train_step_or_demote(batch)
                    window["images"] += self.batch_images(batch) * self.dist.world_size
                    if self.step % log_every == 0 or self.step == self.end_step(max_steps):
                        self._log(out, window, progress)
                    elif self.step == first_step + 1:  # progress from the first step, not after log_every of them
                        progress.update(self.step, {"epoch": f"{self.step / self.steps_per_epoch:.2f}",
                                                    "loss": f"{float(out['loss']):.4f}"})
                    if self.step % ckpt_every == 0:
                        self._checkpoint(progress)
                    self.budget.step_took(self.clock() - t_step)
                    self.on_step_end(deadline, progress)
                    if self.signals.requested():
                        stop_agreed = True
                        break
                    if self.step < self.end_step(max_steps) and self._out_of_time(self._next_step_fits()):
                        timed_out = True
                        break
                # A signal that came after this epoch's last per-step agreement is so far one rank's
                # news: agree on it on every rank before acting, or one rank leaves and the others
                # wait for it in the next step's all-reduce (the inner loop ended alike on all ranks).
                if not stop_agreed:
                    self.signals.requested()
                if self.signals.name:
                    self.stop = StopReason("signal", self.signals.name)
                    break
                if self.step % self.steps_per_epoch == 0:  # an epoch ended: its work was reserved before its last step
                    if self.step % ckpt_every != 0 and self.step < self.end_step(max_steps) and not timed_out:
                        self._checkpoint(progress)  # a checkpoint at every epoch end, as base.yaml promises
                    self.on_epoch_end(self.step // self.steps_per_epoch, progress)
                    if not timed_out and self.step < self.end_step(max_steps):
                        timed_out = self._out_of_time(self._next_epoch_fits())
                if timed_out:
                    self.stop = StopReason("max_minutes", out_of_time)
                    break
            if self.stop.kind == "done":
                if max_steps is not None and max_steps <= self.step < self.total_steps:
                    self.stop = StopReason("max_steps", str(max_steps))
                elif self.step < self.total_steps:  # the schedules were fitted to the time budget
                    self.stop = StopReason("max_minutes", f"{t['max_minutes']} min, schedules fitted to it")
            self.save_checkpoint(final=self.stop.kind == "done")
        finally:
            self.signals.restore()
            progress.close()
            self.metrics.flush()
        self.on_finish()
        if self.is_main:
            self._write_summary(out)
        return self.stop

    def _print_startup(self, max_steps: int | None) -> None:
        t = self.cfg["train"]
        schedule = f"{self.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} steps"
        limits = [f"train.max_steps={max_steps}" if max_steps is not None else "",
                  f"train.max_minutes={t['max_minutes']} (wall time of the whole command)" if t.get("max_minutes") else ""]
        if any(limits):
            schedule += "; stops at " + " or ".join(x for x in limits if x)
        if self.step:
            schedule += f"; resuming at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})"
        print_startup(self.TITLE, [
            ("run folder", self.run_dir),
            ("device", f"{self.device}, {self.precision}, {self.dist.world_size} process(es)"),
            ("loader", self.loader.backend),
            *self.startup_fields(),
            *([("backends", self.backend_plan.summary)] if self.backend_plan is not None else []),
            ("schedule", schedule),
            ("checkpoints", f"every {t['ckpt_every']} steps and at every epoch end, in {self.run_dir}"),
        ])

    def _log(self, out: dict, window: dict, progress: Progress) -> None:
        elapsed = time.perf_counter() - window["t0"]
        loss = float(out["loss"])
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss,
            "images_per_s": window["images"] / elapsed if elapsed > 0 else 0.0,
            "data_wait_frac": window["wait"] / elapsed if elapsed > 0 else 0.0,
            "peak_mem_mb": peak_mem_mb(self.device),
            "skipped_files": self.loader.num_skipped,
            **self.log_fields(out),
        }
        self.metrics.write(record, self.step)
        progress.update(self.step, {"epoch": f"{record['epoch']:.2f}", "loss": f"{loss:.4f}",
                                    "img/s": f"{record['images_per_s']:.1f}", "wait": f"{record['data_wait_frac']:.0%}",
                                    **self.progress_fields(record)})
        window.update(t0=time.perf_counter(), wait=0.0, images=0)

    def _write_summary(self, last: dict | None) -> None:
        lines = [
            f"# {self.TITLE}: {self.run_dir.name}",
            "",
            f"- stopped: {self.stop.kind}{' (' + self.stop.detail + ')' if self.stop.detail else ''} at step "
            f"{self.step} of {self.total_steps} (epoch {self.step / self.steps_per_epoch:.2f} of {self.epochs})",
            f"- device: {self.device}, precision: {self.precision}, processes: {self.dist.world_size}, "
            f"loader: {self.loader.backend}",
        ]
        if last is not None:
            lines.append(f"- last loss: {float(last['loss']):.4f}")
        if self.loader.num_skipped:
            lines.append(f"- unreadable files skipped: {self.loader.num_skipped} (named in the log and in the "
                         "checkpoint's data state)")
        lines += self.summary_lines(last)
        (self.run_dir / "summary.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)

    TITLE = "training run"

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        self.metrics.close()
