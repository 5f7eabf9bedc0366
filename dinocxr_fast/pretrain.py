"""DINO-CXR pretraining: self-distillation of a ViTAEv2 student into an EMA teacher.

One ``PretrainJob`` owns a run folder; ``run()`` trains until the epochs, ``train.max_steps`` or
``train.max_minutes`` are done, or a signal arrives, checkpointing as it goes. Resuming from a
checkpoint continues the same run exactly: the data position, the schedules' position, the
centre, the optimiser and every RNG state are restored.
"""
from __future__ import annotations

import logging
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dinocxr_fast.config import save_config
from dinocxr_fast.data import build_eval_loader, build_pretrain_loader
from dinocxr_fast.dino import DINOLoss
from dinocxr_fast.dino import build as dino_build
from dinocxr_fast.dino.ema import ema_update
from dinocxr_fast.dino.knn import knn_accuracy
from dinocxr_fast.runtime import checkpoint as ckpt
from dinocxr_fast.runtime import data as data_setup
from dinocxr_fast.runtime import distributed
from dinocxr_fast.runtime.metrics import MetricsWriter, Progress

log = logging.getLogger("dinocxr_fast.train")


class NonFiniteLossError(RuntimeError):
    """The loss (or a model output) became NaN/inf; the last good state was saved first."""


@dataclass
class StopReason:
    kind: str = "done"  # done | max_steps | max_minutes | signal
    detail: str = ""


def _precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if choice not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown train.precision={choice!r} (auto, bf16, fp16, fp32)")
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return choice


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PretrainJob:
    def __init__(self, cfg: dict, run_dir: Path, *, resume: Path | None = None, save_backbone: bool = False,
                 show_progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.save_backbone = save_backbone
        t = cfg["train"]
        self.device = data_setup.device_from(t["device"])
        self.dist = distributed.init_from_env(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = _precision(t["precision"], self.device)
        self.is_main = self.dist.is_main
        if self.is_main:
            self._prepare_run_dir()
        distributed.barrier()

        seed = int(t["seed"])
        torch.manual_seed(seed)  # the same initial weights on every rank

        # data
        in_chans = int(cfg["model"]["in_chans"])
        self.source = data_setup.pretrain_source(cfg["data"], seed)
        self.views = data_setup.views_config(cfg["data"], channels=in_chans)
        self.n_global = 2 if cfg["data"]["views"] == "dino_multicrop" else min(2, self.views.n_views)
        batch = int(cfg["optim"]["batch_size"])
        self.loader = build_pretrain_loader(
            self.source, self.views, batch, device=self.device, shard_id=self.dist.rank,
            num_shards=self.dist.world_size, seed=seed, backend=data_setup.loader_backend(cfg["data"]),
            num_threads=int(cfg["data"]["num_workers"]),
        )
        self.steps_per_epoch = len(self.loader)
        self.epochs = int(t["epochs"])
        self.total_steps = self.epochs * self.steps_per_epoch
        global_batch = batch * self.dist.world_size

        # models, loss, optimiser, schedules
        self.student, self.teacher = dino_build.build_student_teacher(cfg["model"])
        # BatchNorm in the PCM: under DDP on GPUs the statistics are synchronised (as DINO does for
        # backbones with BN). SyncBatchNorm has no CPU kernel, so CPU/gloo runs keep per-rank batch
        # statistics and take rank 0's running statistics (see _sync_teacher_buffers).
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
            n_global=self.n_global, backend=d["backend"],
            # on the CPU the check is free; on a GPU it would sync every step (the loop checks instead)
            check_finite=self.device.type == "cpu",
        ).to(self.device)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = dino_build.build_optimizer(
            cfg["optim"], dino_build.param_groups(self.student), fused_ok=self.device.type == "cuda")
        self.schedules = dino_build.build_schedules(cfg, self.steps_per_epoch, global_batch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if t["compile"]:
            self.student_ddp = torch.compile(self.student_ddp)
            self.teacher_fwd = torch.compile(self.teacher)
        else:
            self.teacher_fwd = self.teacher

        self.step = 0
        self.stop = StopReason()
        self._signal = None
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)
        self.show_progress = show_progress and self.is_main
        if resume is not None:
            self._load(resume)
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    # ---- setup ---------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ckpt.CheckpointError(f"run folder {self.run_dir} is not writable: {exc.strerror or exc}") from exc

    def _state(self) -> dict:
        return {
            "format": "dinocxr_fast.pretrain/1",
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "data": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.cfg,
        }

    def _load(self, path: Path) -> None:
        state = ckpt.load(path, map_location=self.device)
        if state.get("format") != "dinocxr_fast.pretrain/1":
            raise ckpt.CheckpointError(f"{path} is not a dinocxr_fast pretraining checkpoint")
        for section in ("model", "data"):
            if state["config"][section] != self.cfg[section]:
                raise ckpt.CheckpointError(
                    f"cannot resume from {path}: its '{section}' config differs from this run's "
                    f"({state['config'][section]} vs {self.cfg[section]})")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.loader.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        norms = torch._foreach_norm([p.detach() for p in self.student.parameters()])
        return bool(torch.isfinite(torch.stack(norms)).all())

    def save_checkpoint(self, final: bool = False) -> Path | None:
        if not self.is_main:
            return None
        if not self._weights_finite():
            raise NonFiniteLossError(
                f"step {self.step}: the student weights hold NaN/inf; not writing a checkpoint over the last good one")
        path = self.run_dir / (ckpt.FINAL_NAME if final else ckpt.step_name(self.step))
        ckpt.atomic_torch_save(self._state(), path)
        if not final:
            ckpt.prune(self.run_dir, int(self.cfg["train"]["keep_last"]))
        return path

    # ---- signals -------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._signal = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return previous

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, views: list[torch.Tensor]) -> dict:
        """Forward teacher (global views) and student (all views), DINO loss, update, EMA."""
        it = self.step
        epoch = it // self.steps_per_epoch
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.schedules["lr"][it])
            if group.get("name") == "decay":
                group["weight_decay"] = float(self.schedules["weight_decay"][it])
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher_fwd(views[: self.n_global])
            student_out = self.student_ddp(views)
        student_out, teacher_out = student_out.float(), teacher_out.float()
        try:
            loss = self.dino_loss(student_out, teacher_out, epoch)
        except ValueError as exc:  # the CPU check names the non-finite argument
            raise self._non_finite(views, str(exc), student_out, teacher_out) from None
        check_every = max(int(self.cfg["train"]["loss_check_every"]), 1)
        if it % check_every == 0 and not math.isfinite(loss.item()):
            raise self._non_finite(views, "the loss is not finite", student_out, teacher_out)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = dino_build.clip_gradients_per_tensor(self.params, float(self.cfg["optim"]["clip_grad"]))
        dino_build.cancel_last_layer_gradients(self.student, epoch, int(self.cfg["optim"]["freeze_last_layer_epochs"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = float(self.schedules["momentum"][it])
        ema_update(self.teacher, self.student, momentum)
        if self.dist.enabled and not self.sync_bn:
            distributed.broadcast_buffers(self.teacher)
        self.step += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm, "momentum": momentum, "epoch": epoch,
                "teacher_out": teacher_out.detach()}

    def _non_finite(self, views, what: str, student_out, teacher_out) -> NonFiniteLossError:
        """Save the last good state (weights before this step) and what is needed to debug."""
        terms = []
        for name, t in (("student output", student_out), ("teacher output", teacher_out)):
            if not bool(torch.isfinite(t).all()):
                terms.append(name)
        where = ", ".join(terms) or "the loss itself (outputs are finite)"
        message = f"non-finite loss at step {self.step} (epoch {self.step // self.steps_per_epoch}): {what}; non-finite: {where}."
        if self.is_main:
            saved = []
            try:
                saved.append(str(self.save_checkpoint()))
            except NonFiniteLossError:
                saved.append("no checkpoint (weights already non-finite; the previous checkpoint is the last good state)")
            debug = self.run_dir / f"nonfinite-step{self.step:08d}.pt"
            ckpt.atomic_torch_save({"step": self.step, "what": what, "terms": terms,
                                    "views": [v.detach().cpu() for v in views]}, debug)
            saved.append(str(debug))
            message += " Saved: " + "; ".join(saved)
        return NonFiniteLossError(message)

    # ---- kNN monitor ---------------------------------------------------------------------------
    @torch.no_grad()
    def knn_eval(self) -> float | None:
        t = self.cfg["train"]
        if not t["knn_data"] or not self.is_main:
            return None
        eval_cfg = data_setup.eval_config(t["knn_size"], int(self.cfg["model"]["in_chans"]))
        backbone = self.teacher.backbone
        was_training = backbone.training
        backbone.eval()
        feats = {}
        try:
            for split in ("train", "val"):
                source = data_setup.labelled_split(t["knn_data"], split)
                loader = build_eval_loader(source, eval_cfg, 32, device=self.device,
                                           backend=data_setup.loader_backend(self.cfg["data"]), num_threads=2)
                xs, ys = [], []
                for images, labels in loader:
                    with self._autocast():
                        xs.append(backbone(images).float())
                    ys.append(labels)
                loader.close()
                feats[split] = (torch.cat(xs), torch.cat(ys))
        finally:
            backbone.train(was_training)
        return knn_accuracy(*feats["train"], *feats["val"], k=int(t["knn_k"]), temperature=float(t["knn_temperature"]))

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> StopReason:
        t = self.cfg["train"]
        max_steps = int(t["max_steps"]) if t["max_steps"] is not None else None
        deadline = time.monotonic() + float(t["max_minutes"]) * 60 if t["max_minutes"] else None
        log_every, ckpt_every = max(int(t["log_every"]), 1), max(int(t["ckpt_every"]), 1)
        knn_every = int(t["knn_every"])
        end_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        progress = Progress(end_step, initial=self.step, enabled=self.show_progress)
        previous_handlers = self._install_signal_handlers()
        window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        out = None
        try:
            while self.step < end_step:
                epoch = self.step // self.steps_per_epoch
                self.loader.set_epoch(epoch)
                batches = iter(self.loader)
                while self.step < end_step and self.step // self.steps_per_epoch == epoch:
                    t_wait = time.perf_counter()
                    try:
                        views = next(batches)
                    except StopIteration:
                        break
                    window["wait"] += time.perf_counter() - t_wait
                    out = self.train_step(views)
                    window["images"] += views[0].shape[0] * self.dist.world_size
                    if self.step % log_every == 0 or self.step == end_step:
                        self._log(out, window, progress)
                    if self.step % ckpt_every == 0:
                        self.save_checkpoint()
                    if self._signal or (deadline and time.monotonic() > deadline):
                        break
                if self._signal:
                    self.stop = StopReason("signal", self._signal)
                    break
                if deadline and time.monotonic() > deadline:
                    self.stop = StopReason("max_minutes", f"{t['max_minutes']} min")
                    break
                if self.step % self.steps_per_epoch == 0:  # an epoch ended
                    finished = self.step // self.steps_per_epoch
                    if knn_every > 0 and t["knn_data"] and finished % knn_every == 0:
                        acc = self.knn_eval()
                        if acc is not None:
                            self.metrics.write({"step": self.step, "epoch": finished, "knn_acc": acc}, self.step)
                            progress.write(f"epoch {finished}: kNN accuracy {acc:.4f} on {t['knn_data']}/val")
                    if self.step % ckpt_every != 0:
                        self.save_checkpoint()
            else:
                if max_steps is not None and self.step >= max_steps and self.step < self.total_steps:
                    self.stop = StopReason("max_steps", str(max_steps))
            if self.stop.kind in ("done", "max_steps", "max_minutes"):
                final = self.stop.kind == "done"
                self.save_checkpoint(final=final)
            else:
                self.save_checkpoint()
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            progress.close()
            self.metrics.flush()
        if self.dist.enabled:
            self.check_replicas()
        if self.is_main and self.save_backbone:
            self.export_backbone()
        if self.is_main:
            self._write_summary(out)
        return self.stop

    def _log(self, out: dict, window: dict, progress: Progress) -> None:
        elapsed = time.perf_counter() - window["t0"]
        loss = float(out["loss"])
        probs = F.softmax(out["teacher_out"] / self.dino_loss.teacher_temp(out["epoch"]), dim=-1)
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss,
            "lr": float(self.schedules["lr"][self.step - 1]),
            "weight_decay": float(self.schedules["weight_decay"][self.step - 1]),
            "momentum": out["momentum"],
            "teacher_temp": self.dino_loss.teacher_temp(out["epoch"]),
            "images_per_s": window["images"] / elapsed if elapsed > 0 else 0.0,
            "data_wait_frac": window["wait"] / elapsed if elapsed > 0 else 0.0,
            "peak_mem_mb": _peak_mem_mb(self.device),
            "grad_norm": float(out["grad_norm"]),
            "teacher_entropy": entropy,
            "skipped_files": self.loader.num_skipped,
        }
        self.metrics.write(record, self.step)
        progress.update(self.step, {"epoch": f"{record['epoch']:.2f}", "loss": f"{loss:.4f}",
                                    "img/s": f"{record['images_per_s']:.1f}", "wait": f"{record['data_wait_frac']:.0%}"})
        window.update(t0=time.perf_counter(), wait=0.0, images=0)

    @torch.no_grad()
    def check_replicas(self) -> None:
        """DDP: every rank must hold the same student, teacher and centre; compare with rank 0."""
        import sys  # noqa: PLC0415

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
        path = self.run_dir / "teacher_backbone.safetensors"
        m = self.cfg["model"]
        ckpt.export_safetensors(self.teacher.backbone.state_dict(), path, metadata={
            "arch": m["arch"], "in_chans": str(m["in_chans"]), "step": str(self.step), "source": "dinocxr_fast pretrain teacher"})
        return path

    def _write_summary(self, out: dict | None) -> None:
        lines = [
            f"# DINO-CXR pretraining run: {self.run_dir.name}",
            "",
            f"- stopped: {self.stop.kind}{' (' + self.stop.detail + ')' if self.stop.detail else ''} at step {self.step} of {self.total_steps}"
            f" (epoch {self.step / self.steps_per_epoch:.2f} of {self.epochs})",
            f"- model: {self.cfg['model']['arch']}, data: {self.source.root} ({len(self.source)} images), views: "
            f"{self.views.n_views} x {[v.size for v in self.views.views]}, loader: {self.loader.backend}",
            f"- device: {self.device}, precision: {self.precision}, processes: {self.dist.world_size}",
        ]
        if out is not None:
            lines.append(f"- last loss: {float(out['loss']):.4f}")
        if self.loader.num_skipped:
            lines.append(f"- unreadable files skipped: {self.loader.num_skipped} (names in the log and in the checkpoint's data state)")
        lines += [
            "",
            "## Files",
            "- `config.yaml`: the effective configuration",
            "- `metrics.jsonl`, `tensorboard/`: per-step metrics (`tensorboard --logdir " + str(self.run_dir) + "`)",
            "- `checkpoint-*.pt`: resumable checkpoints (student, teacher, optimiser, centre, data position, RNG)",
        ]
        if self.save_backbone:
            lines.append("- `teacher_backbone.safetensors`: the teacher backbone weights for downstream use")
        lines += ["", "## Next"]
        if self.step < self.total_steps:
            lines.append(f"- continue this run: `python -m dinocxr_fast.train pretrain --out {self.run_dir} --resume auto`")
        lines.append(f"- export the teacher backbone: `python -m dinocxr_fast.train pretrain --out {self.run_dir} --resume auto --save-backbone`")
        lines.append("- pretrain on real X-rays: `python -m dinocxr_fast.train pretrain --data PATH --preset dino_cxr_vitaev2_s`")
        (self.run_dir / "summary.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()
