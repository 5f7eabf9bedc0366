"""A ViTAEv2 backbone with a linear classifier: the model fine-tuning and linear evaluation
produce, evaluation scores and export deploys.

A classifier checkpoint (``classifier.pt``) is self-describing: architecture, input size,
normalisation, class names and weights, so ``evaluate``, ``export`` and ``infer`` need nothing
else. Pretrained backbones come from a pretraining run folder, one of its checkpoints (the
teacher backbone, as DINO evaluates), a ``--save-backbone`` safetensors file, or nothing (random
initialisation, the baseline).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dinocxr_fast.models import create_model
from dinocxr_fast.runtime import checkpoint as ckpt

CLASSIFIER_FORMAT = "dinocxr_fast.classifier/1"
FEATURE_BATCH = 64  # images per batch of a feature extraction


class Classifier(nn.Module):
    """Mean-pooled backbone features -> linear layer (DINO's LinearClassifier init)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        if hasattr(backbone, "head"):
            backbone.head = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(arch: str, in_chans: int, num_classes: int, drop_path_rate: float = 0.0) -> Classifier:
    return Classifier(create_model(arch, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate), num_classes)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def pretrained_backbone_state(source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone weights of ``source`` and a description of where they came from."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise ckpt.CheckpointError(f"--pretrained {path}: no checkpoint in that run folder")
        path = found
    if not path.is_file():
        raise ckpt.CheckpointError(f"--pretrained {source}: no such file or run folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path)), f"{path} (safetensors backbone)"
    state = ckpt.load(path)
    fmt = state.get("format", "")
    if fmt.startswith("dinocxr_fast.pretrain"):
        return _strip(state["teacher"], "backbone."), f"{path} (teacher backbone, step {state['step']})"
    if fmt == CLASSIFIER_FORMAT or fmt.startswith("dinocxr_fast.finetune"):
        weights = state["state_dict"] if fmt == CLASSIFIER_FORMAT else state["model"]
        return _strip(weights, "backbone."), f"{path} (classifier backbone)"
    raise ckpt.CheckpointError(f"--pretrained {path}: not a dinocxr_fast checkpoint (format {fmt!r})")


def load_backbone(model: Classifier, source: str | Path | None) -> str:
    """Load pretrained weights into ``model.backbone``; returns where they came from."""
    if source is None or str(source).lower() in ("", "none", "random"):
        return "random initialisation"
    state, origin = pretrained_backbone_state(source)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"--pretrained {source}: backbone weights do not fit {type(model.backbone).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); is the architecture the same?")
    return origin


def classifier_record(model: Classifier, *, arch: str, in_chans: int, classes: list[str], eval_cfg: Mapping,
                      extra: Mapping | None = None) -> dict:
    return {
        "format": CLASSIFIER_FORMAT,
        "model": {"arch": arch, "in_chans": in_chans, "num_classes": len(classes)},
        "classes": list(classes),
        "eval": dict(eval_cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }


def save_classifier(record: dict, path: Path) -> Path:
    ckpt.atomic_torch_save(record, path)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """(model in eval mode, its record without the weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "classifier.pt"
    record = ckpt.load(path)
    if record.get("format") != CLASSIFIER_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a classifier checkpoint (format {record.get('format')!r}); "
                                   "fine-tuning and linear evaluation write classifier.pt")
    m = record["model"]
    model = build_classifier(m["arch"], int(m["in_chans"]), int(m["num_classes"]))
    model.load_state_dict(record.pop("state_dict"))
    return model.to(device).eval(), record


@torch.no_grad()
def predict(model: nn.Module, loader, autocast=None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels over one pass of an eval loader (fp32 on the CPU); with
    ``progress`` (runtime.run_log.Progress), one update per batch."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for i, (images, y) in enumerate(loader, start=1):
            if autocast is not None:
                with autocast():
                    logits = model(images)
            else:
                logits = model(images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(y.cpu())
            if progress is not None:
                progress.update(i, {"images": str(sum(len(p) for p in probs))})
    finally:
        model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


@torch.no_grad()
def extract_features(backbone: nn.Module, source, eval_cfg, device, loader_backend: str, autocast,
                     progress_desc: str | None = None, batch_size: int = FEATURE_BATCH,
                     keep_on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-backbone features and labels of every image of ``source`` (eval transform), in eval
    mode (the backbone's mode is restored after); with ``progress_desc``, a progress line per batch.
    The linear probe, the kNN monitor and ssl_quality all take their features from here."""
    from dinocxr_fast.data import build_labelled_loader  # noqa: PLC0415
    from dinocxr_fast.runtime.run_log import Progress  # noqa: PLC0415

    loader = build_labelled_loader(source, eval_cfg, batch_size, device=device, backend=loader_backend, num_threads=2)
    progress = Progress(len(loader), enabled=progress_desc is not None, unit="batch", desc=progress_desc)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for i, (images, y) in enumerate(loader, start=1):
            with autocast():
                f = backbone(images).float()
            feats.append(f if keep_on_device else f.cpu())
            labels.append(y if keep_on_device else y.cpu())
            progress.update(i, {"images": str(sum(len(f) for f in feats))})
    finally:
        progress.close()
        loader.close()
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
