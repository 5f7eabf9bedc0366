"""Shared pytest setup: GPU tests carry @pytest.mark.cuda and skip cleanly without a GPU.

Without a GPU the Triton kernels run in the Triton interpreter. TRITON_INTERPRET must be set
before anything imports ``triton``, not only before our kernel modules: ``triton.language``'s own
``@jit`` helpers (``tl.zeros`` ...) are decorated when triton is imported, and torch imports it
behind ``torch._dynamo`` (any ``torch.compiler`` decorator at a module's top level). This file is
loaded before any test module is collected, so it is the one place early enough. On a GPU machine
the variable is left alone and the kernels compile; there the autotuned kernels are pinned to
their first config (DINOCXR_TRITON_CONFIG=0): autotuning compiles every config of every
specialisation, minutes on a fresh machine, and correctness does not depend on it.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("DINOCXR_TRITON_CONFIG", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _backend_verdicts_in_a_temporary_cache(tmp_path_factory):
    """Backend verdicts (ops/_verdict_cache.py) go to a folder of this session, not the user's cache."""
    previous = os.environ.get("DINOCXR_CACHE_DIR")
    os.environ["DINOCXR_CACHE_DIR"] = str(tmp_path_factory.mktemp("dinocxr-cache"))
    yield
    if previous is None:
        os.environ.pop("DINOCXR_CACHE_DIR", None)
    else:
        os.environ["DINOCXR_CACHE_DIR"] = previous
