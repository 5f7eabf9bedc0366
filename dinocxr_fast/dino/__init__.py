"""DINO training pieces: the loss module with its centre and teacher-temperature schedule."""
from dinocxr_fast.dino.loss import DINOLoss, teacher_temp_schedule

__all__ = ["DINOLoss", "teacher_temp_schedule"]
