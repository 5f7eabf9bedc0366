"""Triton tests: on a machine without a GPU the kernels run in the Triton interpreter.

TRITON_INTERPRET must be set before a kernel module is imported (@triton.jit reads it when it
decorates), and conftest files load before any test runs; nothing imports the kernel modules
during collection (the ops import them on first use). On a GPU machine the variable is left alone
and the kernels compile; the interpreted tests then skip and the ``cuda``-marked ones run. There
the autotuned kernels are pinned to their first config (DINOCXR_TRITON_CONFIG=0): autotuning
compiles every config of every specialisation, minutes on a fresh machine, and correctness does
not depend on it; test_triton_attention.py checks every config once.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("DINOCXR_TRITON_CONFIG", "0")
