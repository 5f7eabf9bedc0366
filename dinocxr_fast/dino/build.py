"""Student, teacher, optimiser and schedules from a config (facebookresearch/dino's recipe)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dinocxr_fast.config import ConfigError
from dinocxr_fast.dino.schedules import constant_schedule, cosine_schedule
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


def fused_optimizer_ok(device: torch.device) -> bool:
    """torch has fused (single-kernel) Adam/AdamW/SGD for CUDA and, since 2.4, the CPU: on the
    CPU it steps vitaev2_tiny's optimiser in 3.5-3.9 ms against 10-12 ms for foreach."""
    return device.type in ("cuda", "cpu")


def build_optimizer(optim_cfg: dict, groups: list[dict], fused_ok: bool) -> torch.optim.Optimizer:
    name = optim_cfg["name"]
    extra = {"foreach": True} if not fused_ok else {"fused": True}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(optim_cfg["betas"]), **extra)
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0, betas=tuple(optim_cfg["betas"]), **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=float(optim_cfg["momentum"]), **extra)
    raise ConfigError(f"unknown optimiser optim.name={name!r} (adam, adamw, sgd)")


def effective_lr(optim_cfg: dict, global_batch: int) -> float:
    lr = float(optim_cfg["lr"])
    scaling = optim_cfg["lr_scaling"]
    if scaling == "linear":
        return lr * global_batch / 256.0
    if scaling == "none":
        return lr
    raise ConfigError(f"unknown optim.lr_scaling={scaling!r} (linear, none)")


def build_schedules(cfg: dict, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """Per-step lr, weight decay and teacher momentum over the whole run."""
    o, epochs = cfg["optim"], int(cfg["train"]["epochs"])
    base_lr = effective_lr(o, global_batch)
    warmup = int(o["warmup_epochs"])
    if warmup >= epochs and epochs > 0:
        raise ConfigError(f"optim.warmup_epochs={warmup} must be smaller than train.epochs={epochs}")
    if o["schedule"] == "cosine":
        lr = cosine_schedule(base_lr, float(o["min_lr"]), epochs, steps_per_epoch, warmup)
    elif o["schedule"] == "constant":
        lr = constant_schedule(base_lr, epochs, steps_per_epoch, warmup)
    else:
        raise ConfigError(f"unknown optim.schedule={o['schedule']!r} (cosine, constant)")
    wd = cosine_schedule(float(o["weight_decay"]), float(o["weight_decay_end"]), epochs, steps_per_epoch)
    momentum = cosine_schedule(float(cfg["dino"]["momentum_teacher"]), 1.0, epochs, steps_per_epoch)
    return {"lr": lr, "weight_decay": wd, "momentum": momentum}


def fit_schedules(nominal: dict[str, np.ndarray], planned_steps: int) -> dict[str, np.ndarray]:
    """The nominal (whole-run) schedules compressed to ``planned_steps``: step i of the planned
    run takes the nominal value at the same fraction of the run, so a run cut short by a step or
    time budget still warms up, finishes its cosine and ends at the final values."""
    total = len(next(iter(nominal.values())))
    if planned_steps >= total:
        return nominal
    idx = nominal_step_index(np.arange(planned_steps), total, planned_steps)
    return {name: values[idx] for name, values in nominal.items()}


def nominal_step_index(step, total_steps: int, planned_steps: int):
    """The nominal step at the same fraction of the run as ``step`` of a ``planned_steps`` run
    (the last planned step maps to the last nominal step)."""
    if planned_steps >= total_steps or planned_steps <= 1:
        return np.minimum(step, total_steps - 1)
    return np.minimum(np.round(np.asarray(step) * (total_steps - 1) / (planned_steps - 1)).astype(np.int64),
                      total_steps - 1)


@torch.no_grad()
def clip_gradients_per_tensor(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """DINO's clip_gradients: each tensor's gradient norm capped at ``clip``. Returns the total
    gradient norm before clipping (for logging), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads))
    if clip > 0:
        coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms.float().square().sum().sqrt()


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
