"""``train.precision``: which autocast every job runs its forward passes under (one rule for all)."""
from __future__ import annotations

import torch


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if choice not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown train.precision={choice!r} (auto, bf16, fp16, fp32)")
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return choice


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (as ``resolve_precision`` returns it) on ``device``."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
