"""Full fine-tuning of a (pretrained) ViTAEv2 backbone with a linear classifier.

SGD by default (the paper fine-tunes with SGD, batch 512, lr from a grid search) with warm-up +
cosine, optional layer-wise lr decay, class weighting for imbalanced sets, bf16 on GPU. The loop,
checkpoints, resume, signals and DDP are ``TrainingJob``'s, shared with pretraining. After each
epoch the model is scored on the validation split; the best one (by ``eval.select_by``) is kept as
``classifier.pt`` and, at the end, evaluated on the test split into ``report/``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dinocxr_fast import optim
from dinocxr_fast.classifier import (
    build_classifier,
    classifier_record,
    load_backbone,
    predict,
    save_classifier,
)
from dinocxr_fast.data import build_labelled_loader
from dinocxr_fast.evaluate import require_every_class, write_report
from dinocxr_fast.metrics import classification_metrics
from dinocxr_fast.runtime import backends, distributed
from dinocxr_fast.runtime import data_setup
from dinocxr_fast.trainer.loop import TrainingJob
from dinocxr_fast.runtime.run_log import Progress

EVAL_BATCH = 64  # images per batch of the validation and test scoring
REPORT_S = 1.5  # report/: metrics, bootstrap intervals, two figures (0.75 s on 2 CPU cores with matplotlib's import)


def layer_ids(model: torch.nn.Module) -> dict[str, int]:
    """Depth index of every parameter for layer-wise lr decay: 0 for the first reduction cell,
    +1 per cell (reduction or normal) in order, the classifier head last."""
    ids, depth = {}, 0
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "backbone" and len(parts) > 3 and parts[1] == "stages":
            stage = int(parts[2])
            if parts[3] == "reduction":
                key = (stage, -1)
            else:
                key = (stage, int(parts[4]))
            ids[name] = key
        elif parts[0] == "head":
            ids[name] = None
        else:
            ids[name] = (-1, -1)
    ordered = sorted({k for k in ids.values() if k is not None})
    rank = {k: i for i, k in enumerate(ordered)}
    depth = len(ordered)
    return {name: (depth if key is None else rank[key]) for name, key in ids.items()}


def layer_decay_groups(model: torch.nn.Module, layer_decay: float) -> list[dict]:
    """Parameter groups with lr_scale = layer_decay ** (depth - layer id); no weight decay on biases
    and norm parameters."""
    ids = layer_ids(model)
    depth = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith(".bias") or p.ndim == 1
        key = (ids[name], no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": layer_decay ** (depth - ids[name]),
                           "name": "no_decay" if no_decay else "decay"}
            if no_decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(p)
    return list(groups.values())


class FinetuneJob(TrainingJob):
    FORMAT = "dinocxr_fast.finetune/1"
    TITLE = "DINO-CXR fine-tuning run"

    def __init__(self, cfg: dict, run_dir: Path, *, resume: Path | None = None, show_progress: bool = True):
        super().__init__(cfg, run_dir, show_progress=show_progress)
        d, m, o = cfg["data"], cfg["model"], cfg["optim"]
        seed = int(cfg["train"]["seed"])
        in_chans = int(m["in_chans"])
        self.train_src, self.val_src, self.test_src, self.test_split = data_setup.supervised_sources(d)
        self.classes = list(self.train_src.classes)
        per_rank = len(self.train_src) // self.dist.world_size
        self.batch_size = min(int(o["batch_size"]), per_rank)
        if self.batch_size < 1:
            raise ValueError(f"{len(self.train_src)} training images cannot feed {self.dist.world_size} processes")
        self.loader = data_setup.supervised_train_loader(
            self.train_src, d, self.batch_size, channels=in_chans, device=self.device, shard_id=self.dist.rank,
            num_shards=self.dist.world_size, seed=seed)
        self.steps_per_epoch = len(self.loader)
        self.eval_cfg = data_setup.eval_config(d["image_size"], in_chans)

        self.model = build_classifier(m["arch"], in_chans, len(self.classes), float(m["drop_path_rate"]))
        self.pretrained_from = load_backbone(self.model, m["pretrained"])
        self.model.to(self.device)
        # the fused ops of the training forward (batch statistics) and of the scoring forwards
        eval_batches = sorted({min(EVAL_BATCH, len(s)) for s in (self.val_src, self.test_src)})

        def calls():
            out = backends.model_calls(self.model, batch=self.batch_size, channels=in_chans, size=int(d["image_size"]),
                                       device=self.device, train=True, autocast=self.autocast)
            for b in eval_batches:
                out += backends.model_calls(self.model, batch=b, channels=in_chans, size=self.eval_cfg.crop,
                                            device=self.device, autocast=self.autocast)
            return out

        self.backend_plan = backends.plan(calls, self.device, out_dir=self.run_dir, write=self.is_main)
        self.model_ddp = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
        ) if self.dist.enabled else self.model
        groups = layer_decay_groups(self.model, float(o["layer_decay"]))
        self.optimizer = optim.build_optimizer(o, groups, fused_ok=optim.fused_optimizer_ok(self.device))
        self.schedules = optim.optimizer_schedules(o, int(cfg["train"]["epochs"]), self.steps_per_epoch,
                                                   self.batch_size * self.dist.world_size)
        self.class_weights = optim.class_weights(self.train_src.labels(), len(self.classes),
                                                 o["class_weighting"]).to(self.device)
        self.best = {"metric": -math.inf, "epoch": None}
        self._val_seconds = 0.0
        if resume is not None:
            self.resume_from(resume)
        self.save_effective_config()

    # ---- TrainingJob interface ------------------------------------------------------------------
    def model_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best": dict(self.best)}

    def load_model_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best = dict(state["best"])

    def weights(self):
        return self.model.parameters()

    def batch_images(self, batch) -> int:
        return batch[0].shape[0]

    def train_step(self, batch) -> dict:
        images, labels = batch
        it = self.step
        optim.apply_schedules(self.optimizer, self.schedules, it)
        with self.autocast():
            logits = self.model_ddp(images)
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                               label_smoothing=float(self.cfg["optim"]["label_smoothing"]))
        if not math.isfinite(loss.item()):
            raise self.non_finite("the loss is not finite", {"logits": logits.detach()},
                                  {"images": images.detach().cpu(), "labels": labels.cpu()})
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = optim.clip_gradients_per_tensor(params, float(self.cfg["optim"]["clip_grad"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    def log_fields(self, out: dict) -> dict:
        return {"lr": float(self.schedules["lr"][self.step - 1]), "grad_norm": float(out["grad_norm"]),
                "weight_decay": float(self.schedules["weight_decay"][self.step - 1])}

    # ---- validation, best checkpoint, final report ----------------------------------------------
    def _loader(self, source):
        return build_labelled_loader(source, self.eval_cfg, EVAL_BATCH, device=self.device,
                                 backend=data_setup.loader_backend(self.cfg["data"]), num_threads=2)

    def _score(self, source) -> tuple[np.ndarray, np.ndarray]:
        loader = self._loader(source)
        try:
            probs, labels = predict(self.model, loader, self.autocast)
        finally:
            loader.close()
        return labels.numpy(), probs.numpy()

    def _record(self) -> dict:
        m = self.cfg["model"]
        return classifier_record(self.model, arch=m["arch"], in_chans=int(m["in_chans"]), classes=self.classes,
                                 eval_cfg=self.eval_cfg.to_dict(),
                                 extra={"pretrained": self.pretrained_from, "best": dict(self.best)})

    def _scoring_seconds(self, images: int) -> float:
        """Seconds to score ``images`` images: scaled from the last validation pass, or before one,
        half a training step's time per batch (a forward without the backward)."""
        if self._val_seconds > 0:
            return self._val_seconds * images / max(len(self.val_src), 1)
        return math.ceil(images / self.batch_size) * self.budget.step_s() / 2

    def end_reserve(self) -> float:
        # rank 0's final work: the test scoring and the report (any rank out of time stops them all)
        return self._scoring_seconds(len(self.test_src)) + REPORT_S if self.is_main else 0.0

    def epoch_end_reserve(self, epoch: int) -> float:
        return self._scoring_seconds(len(self.val_src)) if self.is_main else 0.0

    def whole_epochs_only(self) -> bool:
        # the final report scores the best validated epoch: steps after the last validation are lost
        return self.best["epoch"] is not None

    def on_epoch_end(self, epoch: int, progress: Progress) -> None:
        if self.is_main:
            t0 = time.monotonic()
            y, probs = self._score(self.val_src)
            self._val_seconds = time.monotonic() - t0
            require_every_class(y, self.classes, f"the validation split ({self.val_src.root})")
            metrics = classification_metrics(y, probs)
            key = self.cfg["eval"]["select_by"]
            value = metrics[key]
            self.metrics.write({"step": self.step, "epoch": epoch, "val_accuracy": metrics["accuracy"],
                                "val_roc_auc": metrics["roc_auc"], "val_f1": metrics["f1"]}, self.step)
            progress.write(f"epoch {epoch}: val accuracy {metrics['accuracy']:.4f}, AUC {metrics['roc_auc']:.4f}")
            if value > self.best["metric"]:
                self.best = {"metric": float(value), "epoch": epoch, "select_by": key}
                save_classifier(self._record(), self.run_dir / "classifier.pt")
        distributed.barrier()

    def on_finish(self) -> None:
        # Every clean stop (done, train.max_steps, train.max_minutes) leaves classifier.pt (the best
        # epoch so far) and report/; a signal stop leaves the checkpoint to resume from, and the
        # summary says what exists.
        if not self.is_main or self.stop.kind == "signal":
            return
        if self.best["epoch"] is None:  # no validation pass yet: keep the current weights
            save_classifier(self._record(), self.run_dir / "classifier.pt")
        from dinocxr_fast.classifier import load_classifier  # noqa: PLC0415

        best, _ = load_classifier(self.run_dir / "classifier.pt", self.device)
        current = self.model
        self.model = best
        try:
            y, probs = self._score(self.test_src)
        finally:
            self.model = current
        selection, reported = data_setup.split_names(self.cfg["data"], self.test_split)
        write_report(self.run_dir / "report", y, probs, self.classes, paths=self.test_src.paths(),
                     title=f"Fine-tuned {self.cfg['model']['arch']} ({self.run_dir.name}), reported split: {reported}",
                     meta={"run": str(self.run_dir), "pretrained": self.pretrained_from,
                           "label_fraction": self.cfg["data"]["label_fraction"],
                           "train_images": len(self.train_src),
                           "best_epoch": self.best["epoch"] if self.best["epoch"] is not None else
                           f"none (stopped by {self.stop.kind} before the first validation: the last weights)",
                           "selection split": f"{selection} ({self.best.get('select_by', self.cfg['eval']['select_by'])})",
                           "reported split": reported},
                     n_boot=int(self.cfg["eval"]["bootstrap"]))

    def startup_fields(self) -> list[tuple[str, object]]:
        selection, reported = data_setup.split_names(self.cfg["data"], self.test_split)
        return [("model", f"{self.cfg['model']['arch']} from {self.pretrained_from}"),
                ("data", f"{self.cfg['data']['path']}: train {len(self.train_src)} images (label fraction "
                         f"{self.cfg['data']['label_fraction']}), selection split {selection} {len(self.val_src)}, "
                         f"reported split {reported} {len(self.test_src)}")]

    def summary_lines(self, last: dict | None) -> list[str]:
        selection, reported = data_setup.split_names(self.cfg["data"], self.test_split)
        key = self.cfg["eval"]["select_by"]
        lines = [f"- model: {self.cfg['model']['arch']} from {self.pretrained_from}; {len(self.train_src)} training "
                 f"images (label fraction {self.cfg['data']['label_fraction']}), classes {self.classes}",
                 f"- selection split: {selection}; reported split: {reported}",
                 f"- best {key} on the selection split: {self.best['metric']:.4f} (epoch {self.best['epoch']})"
                 if self.best["epoch"] is not None else "- no validation pass on the selection split yet"]
        report, classifier = self.run_dir / "report" / "report.md", self.run_dir / "classifier.pt"
        if report.is_file():
            lines.append(f"- report on the reported split: {report}")
        else:
            lines.append(f"- no report/: the run was stopped by {self.stop.kind} ({self.stop.detail}); resume it to finish "
                         f"(`python -m dinocxr_fast.train finetune --out {self.run_dir} --resume auto`)")
        if classifier.is_file():
            lines.append(f"- classifier: {classifier} (evaluate: `python -m dinocxr_fast.evaluate "
                         f"--checkpoint {classifier} --data {self.cfg['data']['path']} --split {self.test_split}`)")
        else:
            lines.append(f"- no classifier.pt: stopped by {self.stop.kind} before the first validation pass")
        return lines
