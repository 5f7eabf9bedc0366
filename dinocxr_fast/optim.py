"""What every training job shares about optimisation: the optimiser, per-step schedules (fitted to a
step or time budget), applying them to the parameter groups, gradient clipping and class weights.
The recipe is facebookresearch/dino's; DINO's own additions (teacher momentum, parameter groups,
the frozen last layer) are in ``dino/build.py``."""
from __future__ import annotations

import numpy as np
import torch

from dinocxr_fast.config import ConfigError
from dinocxr_fast.dino.schedules import constant_schedule, cosine_schedule


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


def optimizer_schedules(optim_cfg: dict, epochs: int, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """Per-step learning rate (warm-up, then cosine or constant) and weight decay (cosine) over ``epochs``."""
    o = optim_cfg
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
    return {"lr": lr, "weight_decay": wd}


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: dict[str, np.ndarray], step: int) -> None:
    """Step ``step``'s learning rate into every group (times its ``lr_scale``, layer decay) and its
    weight decay into the group named "decay" (the others keep theirs, 0)."""
    for group in optimizer.param_groups:
        group["lr"] = float(schedules["lr"][step]) * group.get("lr_scale", 1.0)
        if group.get("name") == "decay":
            group["weight_decay"] = float(schedules["weight_decay"][step])


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


def class_weights(labels, n_classes: int, mode: str) -> torch.Tensor:
    """Loss weights per class: "balanced" (n / (classes x count), sklearn's) or "none" (ones)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if mode == "balanced":
        weights = counts.sum() / (n_classes * np.maximum(counts, 1))
    elif mode == "none":
        weights = np.ones(n_classes)
    else:
        raise ConfigError(f"unknown optim.class_weighting={mode!r} (balanced, none)")
    return torch.tensor(weights, dtype=torch.float32)
