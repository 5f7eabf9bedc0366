"""DINO-CXR pretraining: self-distillation of a ViTAEv2 student into an EMA teacher.

``PretrainJob`` builds the student/teacher pair, the DINO loss, the optimiser and schedules, and
the view loader; the loop, checkpoints, resume, signals and budgets are ``TrainingJob``'s.
Resuming continues the same run exactly: the data position, the schedules' position, the centre,
the optimiser and every RNG state are restored.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from dinocxr_fast import optim
from dinocxr_fast.classifier import extract_features
from dinocxr_fast.data import build_pretrain_loader
from dinocxr_fast.dino import DINOLoss
from dinocxr_fast.dino import build as dino_build
from dinocxr_fast.dino.ema import ema_lerp, ema_pairs
from dinocxr_fast.dino.knn import knn_accuracy
from dinocxr_fast.dino.koleo import koleo_loss
from dinocxr_fast.dino.monitor import (
    CollapseWatch,
    collapse_stats,
    knn_noise_margin,
    learning_verdict,
)
from dinocxr_fast.ops._checks import NonFiniteInputError
from dinocxr_fast.runtime import data_setup
from dinocxr_fast.runtime import distributed
from dinocxr_fast.runtime.backends import plan_backends
from dinocxr_fast.trainer.loop import NonFiniteLossError, TrainingJob
from dinocxr_fast.trainer.teacher_backbone import BACKBONE_NAME, PRETRAIN_FORMAT, write_teacher_backbone
from dinocxr_fast.runtime.run_log import Progress

log = logging.getLogger("dinocxr_fast.train")
# The kNN monitor of a run on the phantoms (train.knn_data: auto): this many labelled phantoms per
# split, of the 'subtle' variant (data/synthetic.py), on which random features are near chance.
KNN_PHANTOMS = 256
KNN_VARIANT = "subtle"


class PretrainJob(TrainingJob):
    FORMAT = PRETRAIN_FORMAT
    TITLE = "DINO-CXR pretraining run"

    def __init__(self, cfg: dict, run_dir: Path, *, resume: Path | None = None, save_backbone: bool = False,
                 show_progress: bool = True):
        super().__init__(cfg, run_dir, show_progress=show_progress)
        self.save_backbone = save_backbone
        t, seed = cfg["train"], int(cfg["train"]["seed"])

        # data
        in_chans = int(cfg["model"]["in_chans"])
        self.source = data_setup.pretrain_source(cfg["data"], seed)
        self.views = data_setup.views_config(cfg["data"], channels=in_chans)
        self.n_global = 2 if cfg["data"]["views"] == "dino_multicrop" else min(2, self.views.n_views)
        batch = int(cfg["optim"]["batch_size"])
        source, shard_id, num_shards = data_setup.shard_for_rank(self.source, cfg["data"], self.dist.rank,
                                                                 self.dist.world_size)
        self.loader = build_pretrain_loader(
            source, self.views, batch, device=self.device, shard_id=shard_id,
            num_shards=num_shards, seed=seed, backend=data_setup.loader_backend(cfg["data"]),
            num_threads=int(cfg["data"]["num_workers"]),
        )
        self.steps_per_epoch = len(self.loader)
        global_batch = batch * self.dist.world_size

        # models, loss, optimiser, schedules
        self.student, self.teacher = dino_build.build_student_teacher(cfg["model"])
        # BatchNorm in the PCM: under DDP on GPUs the statistics are synchronised (as DINO does for
        # backbones with BN). SyncBatchNorm has no CPU kernel, so CPU/gloo runs keep per-rank batch
        # statistics and take rank 0's running statistics (distributed.broadcast_buffers).
        self.sync_bn = self.dist.enabled and self.device.type == "cuda"
        if self.sync_bn:
            self.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.student_ddp = (
            DistributedDataParallel(self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else self.student
        )
        d = cfg["dino"]
        self.dino_loss = DINOLoss(
            int(cfg["model"]["out_dim"]), self.views.n_views, warmup_teacher_temp=float(d["warmup_teacher_temp"]),
            teacher_temp=float(d["teacher_temp"]), warmup_teacher_temp_epochs=int(d["warmup_teacher_temp_epochs"]),
            epochs=self.epochs, student_temp=float(d["student_temp"]), center_momentum=float(d["center_momentum"]),
            n_global=self.n_global, backend="auto",  # dino.backend applies to every op: plan_backends below
            # on the CPU the check is free; on a GPU it would sync every step (the loop checks instead)
            check_finite=self.device.type == "cpu",
            centering=d["centering"], sinkhorn_iterations=int(d["sinkhorn_iterations"]),
        ).to(self.device)
        self.koleo_weight = float(d["koleo_weight"])
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = optim.build_optimizer(
            cfg["optim"], dino_build.param_groups(self.student), fused_ok=optim.fused_optimizer_ok(self.device))
        # Schedules span the run that will actually happen: all epochs, or train.max_steps, or
        # (refitted as the run measures its speed) what train.max_minutes leaves time for.
        self.nominal_schedules = dino_build.build_schedules(cfg, self.steps_per_epoch, global_batch)
        self.fit = bool(t.get("fit_schedules", True))
        self.max_planned = self.total_steps
        if self.fit and t.get("max_steps") is not None:
            self.max_planned = max(min(self.total_steps, int(t["max_steps"])), 1)
        self._plan(self.max_planned)
        self._fit_clock: dict | None = None
        self.knn_trace: list[tuple[int, float]] = []
        self._knn_seconds = 0.0  # the last kNN pass (none yet: 0)
        self._knn_on: bool | None = None
        self.first_loss: tuple[int, float] | None = None
        self.backend_plan = plan_backends(self, d["backend"])  # before compile, which bakes the choices in
        if t["compile"]:
            self.student_ddp = torch.compile(self.student_ddp)
            self.teacher_fwd = torch.compile(self.teacher)
        else:
            self.teacher_fwd = self.teacher

        self.ema_pairs = ema_pairs(self.teacher, self.student)
        # collapse monitor: the teacher backbone's features of the last step, and a watch that
        # warns once the run sits at log K or collapses (after the lr warm-up)
        self._teacher_features: torch.Tensor | None = None
        self.teacher.backbone.register_forward_hook(self._keep_teacher_features)
        warmup_steps = int(cfg["optim"]["warmup_epochs"]) * self.steps_per_epoch
        self.collapse_watch = CollapseWatch(int(cfg["model"]["out_dim"]),
                                            after_step=min(warmup_steps, (self.planned_steps or self.total_steps) // 4))
        self._finite_since_check: torch.Tensor | None = None
        if resume is not None:
            self.resume_from(resume)
        self.save_effective_config()

    def _keep_teacher_features(self, _module, _inputs, output) -> None:
        self._teacher_features = output.detach()

    # ---- schedules fitted to the run's budget -----------------------------------------------------
    def _plan(self, planned_steps: int) -> None:
        self.planned_steps = planned_steps if planned_steps < self.total_steps else None
        self.schedules = optim.fit_schedules(self.nominal_schedules, planned_steps)

    def schedule_epoch(self, it: int) -> int:
        """The epoch of the nominal run at the same fraction of the run as step ``it``: drives the
        epoch-based parts of the recipe (teacher temperature warm-up, frozen last layer)."""
        planned = self.planned_steps or self.total_steps
        return int(optim.nominal_step_index(it, self.total_steps, planned)) // self.steps_per_epoch

    def on_step_end(self, deadline: float | None, progress: Progress) -> None:
        """With train.max_minutes: from the measured seconds per step (kNN passes and checkpoints
        included), refit the schedules at step 10 of this process and at every epoch end so the
        run ends its cosine when the budget ends."""
        if deadline is None or not self.fit:
            return
        now = time.monotonic()
        if self._fit_clock is None:  # the first step carries one-off costs: measure from after it
            self._fit_clock = {"t0": now, "step0": self.step}
            return
        done = self.step - self._fit_clock["step0"]
        if done < 10 or (done != 10 and self.step % self.steps_per_epoch != 0):
            return
        per_step = (now - self._fit_clock["t0"]) / done
        # keep time for the end (a last kNN pass if one runs, the final checkpoint, the exit: runtime/budget.py)
        # and one step of slack for the steps' spread
        fitted = min(self.max_planned, self.step + max(self.budget.steps_that_fit(self.end_reserve(), per_step) - 1, 1))
        current = self.planned_steps or self.total_steps
        if abs(fitted - current) > max(1, current // 100):
            self._plan(fitted)
            progress.set_total(self.end_step(None))
            progress.write(f"schedules fitted to train.max_minutes={self.cfg['train']['max_minutes']}: "
                           f"{fitted} steps in all at {per_step:.2f} s/step (was {current})")

    # ---- TrainingJob interface --------------------------------------------------------------------
    def model_state(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "dino_loss": self.dino_loss.state_dict(),
                "planned_steps": self.planned_steps or self.total_steps}

    def load_model_state(self, state: dict) -> None:
        # The schedules are planned from this command's budget (same max_steps: the same run,
        # exactly); a resume with a larger budget re-plans them for the longer run.
        if int(state.get("planned_steps", self.max_planned)) != self.max_planned:
            log.info("resume: the schedules now span %d steps (the checkpoint's run planned %s)",
                     self.max_planned, state.get("planned_steps"))
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])

    def weights(self):
        return self.student.parameters()

    def batch_images(self, views) -> int:
        return views[0].shape[0]

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, views: list[torch.Tensor]) -> dict:
        """Forward teacher (global views) and student (all views), DINO loss, update, EMA."""
        loss, student_out, teacher_out = self.forward_loss(views)
        self.backward(loss)
        grad_norm, momentum = self.update()
        return {"loss": loss.detach(), "grad_norm": grad_norm, "momentum": momentum,
                "epoch": (self.step - 1) // self.steps_per_epoch, "schedule_epoch": self.schedule_epoch(self.step - 1),
                "teacher_out": teacher_out.detach(), "student_out": student_out.detach()}

    # The three phases of a step, separate so benchmarks/bench_train.py can time each one.
    def forward_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        it = self.step
        epoch = self.schedule_epoch(it)
        optim.apply_schedules(self.optimizer, self.schedules, it)
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher_fwd(views[: self.n_global])
            if self.koleo_weight > 0:
                student_out, student_features = self.student_ddp(views, return_features=True)
            else:
                student_out = self.student_ddp(views)
        student_out, teacher_out = student_out.float(), teacher_out.float()
        try:
            loss = self.dino_loss(student_out, teacher_out, epoch)
        except NonFiniteInputError as exc:  # the CPU check names the non-finite argument; other errors are bugs
            raise self._non_finite(views, str(exc), student_out, teacher_out) from None
        if self.koleo_weight > 0:  # DINOv2: on the student's backbone features of each global view
            global_features = student_features[: self.n_global * views[0].shape[0]].chunk(self.n_global)
            loss = loss + self.koleo_weight * sum(koleo_loss(f) for f in global_features)
        # A device-side flag over the steps since the last check: checking every N steps (one host
        # sync each) still catches a non-finite loss at any step, N - 1 steps late at most.
        finite = torch.isfinite(loss.detach())
        self._finite_since_check = finite if self._finite_since_check is None else self._finite_since_check & finite
        check_every = max(int(self.cfg["train"]["loss_check_every"]), 1)
        if it % check_every == 0:
            all_finite, self._finite_since_check = bool(self._finite_since_check), None
            if not all_finite:
                what = "the loss is not finite" if not math.isfinite(loss.item()) else (
                    f"the loss was not finite at one of steps {max(it - check_every + 1, 0)}..{it - 1} "
                    f"(checked every {check_every} steps: train.loss_check_every)")
                raise self._non_finite(views, what, student_out, teacher_out)
        return loss, student_out, teacher_out

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def update(self) -> tuple[torch.Tensor, float]:
        """Clip, optimiser step, EMA of the teacher; advances the step. Returns (grad norm, momentum)."""
        it = self.step
        epoch = self.schedule_epoch(it)
        self.scaler.unscale_(self.optimizer)
        grad_norm = optim.clip_gradients_per_tensor(self.params, float(self.cfg["optim"]["clip_grad"]))
        dino_build.cancel_last_layer_gradients(self.student, epoch, int(self.cfg["optim"]["freeze_last_layer_epochs"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = float(self.schedules["momentum"][it])
        ema_lerp(self.ema_pairs, momentum)
        if self.dist.enabled and not self.sync_bn:
            distributed.broadcast_buffers(self.teacher)
        self.step += 1
        return grad_norm, momentum

    def _non_finite(self, views, what: str, student_out, teacher_out) -> NonFiniteLossError:
        return self.non_finite(what, {"student output": student_out, "teacher output": teacher_out},
                               {"views": [v.detach().cpu() for v in views]})

    # ---- kNN monitor ---------------------------------------------------------------------------
    def knn_sources(self):
        """(train, val, name) of the kNN monitor: train.knn_data's ImageFolder, or with 'auto' and
        pretraining on the phantoms, labelled 'subtle' phantoms the pretraining never saw; None: off."""
        t, d = self.cfg["train"], self.cfg["data"]
        choice = t["knn_data"]
        if not choice or (choice == "auto" and d.get("path") is not None):
            return None
        if choice == "auto":
            from dinocxr_fast.data import SyntheticSource  # noqa: PLC0415

            size, seed = int(d["synthetic_size"]), int(t["seed"])
            return (SyntheticSource(KNN_PHANTOMS, size, seed=seed + 1000, variant=KNN_VARIANT),
                    SyntheticSource(KNN_PHANTOMS, size, seed=seed + 2000, variant=KNN_VARIANT),
                    f"held-out {KNN_VARIANT} phantoms")
        return data_setup.labelled_split(choice, "train"), data_setup.labelled_split(choice, "val"), f"{choice}/val"

    @torch.no_grad()
    def knn_eval(self) -> float | None:
        t = self.cfg["train"]
        sources = self.knn_sources()
        if sources is None or not self.is_main:
            return None
        eval_cfg = data_setup.eval_config(t["knn_size"], int(self.cfg["model"]["in_chans"]))
        feats = {split: extract_features(self.teacher.backbone, source, eval_cfg, self.device,
                                         data_setup.loader_backend(self.cfg["data"]), self.autocast, batch_size=32,
                                         keep_on_device=True)
                 for split, source in zip(("train", "val"), sources[:2])}
        return knn_accuracy(*feats["train"], *feats["val"], k=int(t["knn_k"]), temperature=float(t["knn_temperature"]))

    def _knn(self, epoch: int, progress: Progress | None) -> None:
        t0 = time.monotonic()
        sources = self.knn_sources()
        if sources is not None and self.is_main:  # the pass takes a while: say so before it
            line = (f"epoch {epoch}: kNN monitor, teacher features of {len(sources[0])} + {len(sources[1])} images "
                    f"({sources[2]}) ...")
            _say(progress, line)
        acc = self.knn_eval()
        if acc is not None:
            self.metrics.write({"step": self.step, "epoch": epoch, "knn_acc": acc}, self.step)
            self.knn_trace.append((self.step, acc))
            line = f"epoch {epoch}: kNN accuracy {acc:.4f} on {sources[2]} ({time.monotonic() - t0:.1f} s)"
            _say(progress, line)
            self._knn_seconds = time.monotonic() - t0  # train.max_minutes keeps room for the next pass
        distributed.barrier()

    # ---- hooks ----------------------------------------------------------------------------------------
    def log_fields(self, out: dict) -> dict:
        temp = self.dino_loss.teacher_temp(out["schedule_epoch"])
        stats = collapse_stats(out["teacher_out"], self.dino_loss.center, temp, float(out["loss"]),
                               self._teacher_features)
        if self.first_loss is None:
            self.first_loss = (self.step, float(out["loss"]))
        warning = self.collapse_watch.check(self.step, {"loss": float(out["loss"]), **stats})
        if warning:
            log.warning("%s", warning)
        return {
            "lr": float(self.schedules["lr"][self.step - 1]),
            "weight_decay": float(self.schedules["weight_decay"][self.step - 1]),
            "momentum": out["momentum"],
            "teacher_temp": temp,
            "grad_norm": float(out["grad_norm"]),
            **stats,  # collapse monitor (dino/monitor.py)
        }

    def progress_fields(self, record: dict) -> dict:
        return {"H(t)": f"{record['teacher_entropy']:.2f}/{self.collapse_watch.log_k:.2f}",
                "f_std": f"{record.get('feature_std', float('nan')):.2f}"}

    def _knn_runs(self) -> bool:
        if self._knn_on is None:
            self._knn_on = int(self.cfg["train"]["knn_every"]) > 0 and self.knn_sources() is not None and self.is_main
        return self._knn_on

    def end_reserve(self) -> float:
        return self._knn_seconds if self._knn_runs() else 0.0  # the last kNN pass (on_finish)

    def epoch_end_reserve(self, epoch: int) -> float:
        knn_every = int(self.cfg["train"]["knn_every"])
        return self._knn_seconds if self._knn_runs() and epoch % knn_every == 0 else 0.0

    def on_start(self, progress: Progress) -> None:
        if self.step == 0 and int(self.cfg["train"]["knn_every"]) > 0:
            self._knn(0, progress)  # the baseline the run's learning is measured against

    def on_epoch_end(self, epoch: int, progress: Progress) -> None:
        knn_every = int(self.cfg["train"]["knn_every"])
        last = self.step >= self.end_step(self._max_steps())
        if knn_every > 0 and (epoch % knn_every == 0 or last):
            self._knn(epoch, progress)

    def _max_steps(self) -> int | None:
        m = self.cfg["train"].get("max_steps")
        return int(m) if m is not None else None

    def on_finish(self) -> None:
        ran_knn = int(self.cfg["train"]["knn_every"]) > 0
        if ran_knn and self.stop.kind != "signal" and (not self.knn_trace or self.knn_trace[-1][0] != self.step):
            self._knn(self.step // self.steps_per_epoch, None)  # the run ended mid-epoch: its last kNN
        if self.dist.enabled:
            self.check_replicas()
        if self.is_main and self.save_backbone:
            self.export_backbone()

    def startup_fields(self) -> list[tuple[str, object]]:
        knn = self.knn_sources()
        return [("model", f"{self.cfg['model']['arch']}, DINO head K={self.cfg['model']['out_dim']}"),
                ("data", f"{len(self.source)} images from {self.source.root}"),
                ("views", f"{self.views.n_views} x {[v.size for v in self.views.views]} px"),
                ("kNN monitor", f"{knn[2]}, every {self.cfg['train']['knn_every']} epoch(s)" if knn else "off")]

    def summary_lines(self, last: dict | None) -> list[str]:
        lines = [
            f"- model: {self.cfg['model']['arch']}, data: {self.source.root} ({len(self.source)} images), views: "
            f"{self.views.n_views} x {[v.size for v in self.views.views]}",
            "",
            "## Files",
            "- `config.yaml`: the effective configuration",
            f"- `metrics.jsonl`, `tensorboard/`: per-step metrics (`tensorboard --logdir {self.run_dir}`)",
            "- `checkpoint-*.pt`: resumable checkpoints (student, teacher, optimiser, centre, data position, RNG)",
        ]
        if self.save_backbone:
            lines.append(f"- `{BACKBONE_NAME}`: the teacher backbone weights for downstream use")
        lines += ["", "## Did it learn?", *self.learning_lines(last)]
        lines += ["", "## Next"]
        if self.step < self.total_steps:
            lines.append(f"- continue this run: `python -m dinocxr_fast.train pretrain --out {self.run_dir} --resume auto`")
        lines.append(f"- export the teacher backbone (seconds, no training): "
                     f"`python -m dinocxr_fast.train export-backbone {self.run_dir}`")
        lines.append(f"- linear evaluation of the teacher backbone: `python -m dinocxr_fast.train linear --pretrained "
                     f"{self.run_dir} --data LABELLED_ROOT` (train/ and val/ class folders)")
        lines.append(f"- fine-tuning: `python -m dinocxr_fast.train finetune --pretrained {self.run_dir} --data LABELLED_ROOT`")
        lines.append("- pretrain on real X-rays: `python -m dinocxr_fast.train pretrain --data PATH --preset dino_cxr_vitaev2_s`")
        return lines

    def learning_lines(self, last: dict | None) -> list[str]:
        """The run's own quality signal: loss against its start and log K, the kNN trace against its
        noise margin, and the collapse monitor's warnings; then the verdict (monitor.learning_verdict)."""
        log_k = self.collapse_watch.log_k
        lines = []
        loss = None
        if self.first_loss is not None and last is not None:
            loss = (self.first_loss[1], float(last["loss"]))
            lines.append(f"- loss: {loss[0]:.3f} at step {self.first_loss[0]} -> {loss[1]:.3f} at step {self.step} "
                         f"(log K = {log_k:.3f}: uniform outputs)")
        knn = None
        if len(self.knn_trace) >= 2:
            (s0, a0), (s1, a1) = self.knn_trace[0], self.knn_trace[-1]
            sources = self.knn_sources()
            n_val = len(sources[1])
            knn = (a0, a1, n_val)
            trace = ", ".join(f"{a:.3f}" for _, a in self.knn_trace)
            lines.append(f"- kNN accuracy on {sources[2]} ({len(sources[0])} labelled, {n_val} scored): {a0:.3f} at "
                         f"step {s0} -> {a1:.3f} at step {s1}, {a1 - a0:+.3f} (noise margin "
                         f"{knn_noise_margin(a0, a1, n_val):.3f}; trace: {trace})")
        lines += [f"- WARNING {w}" for w in self.collapse_watch.warnings] or ["- collapse monitor: no warning"]
        if loss is not None:
            ok, reasons = learning_verdict(loss[0], loss[1], log_k, self.collapse_watch.warnings, knn)
            lines.append(f"- learned: {'yes' if ok else 'no'}" + ("" if ok else f" ({'; '.join(reasons)})"))
            lines.append("  (yes means: the loss ended below its start and below 0.97 log K"
                         + (", the kNN accuracy rose by more than its noise margin" if knn else "")
                         + ", no collapse warning)")
        return lines

    @torch.no_grad()
    def check_replicas(self) -> None:
        """DDP: every rank must hold the same student, teacher and centre; compare with rank 0."""
        import torch.distributed as dist  # noqa: PLC0415

        if not self.sync_bn:  # DDP broadcasts the student's buffers at the next forward; do it now
            distributed.broadcast_buffers(self.student)
        tensors = [*self.student.state_dict().values(), *self.teacher.state_dict().values(), self.dino_loss.center]
        local = torch.stack([t.double().sum() for t in tensors if t.is_floating_point()])
        reference = local.clone()
        dist.broadcast(reference, src=0)
        mismatch = torch.tensor(float(not torch.equal(local, reference)), device=local.device)
        dist.all_reduce(mismatch)
        if mismatch.item() > 0:
            raise RuntimeError(f"DDP replicas diverged at step {self.step}: {int(mismatch.item())} rank(s) differ from rank 0")
        if self.is_main:
            print(f"DDP: {self.dist.world_size} replicas agree on student, teacher and centre at step {self.step}",
                  file=sys.stderr, flush=True)

    def export_backbone(self) -> Path:
        return write_teacher_backbone(self.teacher.backbone.state_dict(), self.cfg["model"], self.step,
                                      self.run_dir / BACKBONE_NAME)


def _say(progress: Progress | None, line: str) -> None:
    """A line beside the progress display (or on stderr once the loop has closed it)."""
    if progress is not None:
        progress.write(line)
    else:
        print(line, file=sys.stderr, flush=True)
