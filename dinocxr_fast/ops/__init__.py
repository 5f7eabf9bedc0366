"""Fused ops: one entry point each, a plain-PyTorch reference beside it (DESIGN.md)."""
from dinocxr_fast.ops.attention import (
    attention,
    attention_probs,
    attention_reference,
    window_attention,
    window_attention_reference,
)
from dinocxr_fast.ops.center import update_center, update_center_reference
from dinocxr_fast.ops.conv_bn_act import conv_bn_act, conv_bn_act_reference
from dinocxr_fast.ops.dino_loss import dino_loss, dino_loss_and_teacher_sum, dino_loss_reference
from dinocxr_fast.ops.pcm import pcm, pcm_reference

__all__ = [
    "attention",
    "attention_probs",
    "attention_reference",
    "conv_bn_act",
    "conv_bn_act_reference",
    "dino_loss",
    "dino_loss_and_teacher_sum",
    "dino_loss_reference",
    "pcm",
    "pcm_reference",
    "update_center",
    "update_center_reference",
    "window_attention",
    "window_attention_reference",
]
