"""Shared pytest setup: GPU tests carry @pytest.mark.cuda and skip cleanly without a GPU."""
from __future__ import annotations

import pytest
import torch


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
    import os

    previous = os.environ.get("DINOCXR_CACHE_DIR")
    os.environ["DINOCXR_CACHE_DIR"] = str(tmp_path_factory.mktemp("dinocxr-cache"))
    yield
    if previous is None:
        os.environ.pop("DINOCXR_CACHE_DIR", None)
    else:
        os.environ["DINOCXR_CACHE_DIR"] = previous
