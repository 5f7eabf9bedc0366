"""DINO's student and teacher, parameter groups and schedules from a config (facebookresearch/dino's
recipe); the optimiser and the schedules every job shares are in ``optim.py``."""
from __future__ import annotations

import numpy as np
from torch import nn

from dinocxr_fast import optim
from dinocxr_fast.dino.schedules import cosine_schedule
from dinocxr_fast.models import DINOHead, MultiCropWrapper, create_model


def build_backbone(model_cfg: dict, drop_path_rate: float) -> nn.Module:
    return create_model(model_cfg["arch"], num_classes=0, in_chans=int(model_cfg["in_chans"]),
                        drop_path_rate=float(drop_path_rate))


def build_head(model_cfg: dict, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, int(model_cfg["out_dim"]), use_bn=bool(model_cfg["use_bn_in_head"]),
                    norm_last_layer=bool(model_cfg["norm_last_layer"]), nlayers=int(model_cfg["head_layers"]),
                    hidden_dim=int(model_cfg["head_hidden_dim"]), bottleneck_dim=int(model_cfg["head_bottleneck_dim"]))


def build_student_teacher(model_cfg: dict) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Same architecture twice; the teacher starts as a copy of the student, gets no gradients,
    and has no stochastic depth (as in DINO)."""
    s_backbone = build_backbone(model_cfg, model_cfg["drop_path_rate"])
    t_backbone = build_backbone(model_cfg, 0.0)
    student = MultiCropWrapper(s_backbone, build_head(model_cfg, s_backbone.num_features))
    teacher = MultiCropWrapper(t_backbone, build_head(model_cfg, t_backbone.num_features))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only, not on biases and norm parameters (DINO's get_params_groups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def build_schedules(cfg: dict, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """Per-step lr, weight decay and teacher momentum over the whole run."""
    epochs = int(cfg["train"]["epochs"])
    schedules = optim.optimizer_schedules(cfg["optim"], epochs, steps_per_epoch, global_batch)
    schedules["momentum"] = cosine_schedule(float(cfg["dino"]["momentum_teacher"]), 1.0, epochs, steps_per_epoch)
    return schedules


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
