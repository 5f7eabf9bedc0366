"""benchmarks/bench_dino_reference.py without the reference checkout: a clear error, no traceback.

The comparison itself needs a facebookresearch/dino checkout, which CI cannot download; its
figures come from runs recorded in benchmarks/results/."""
from __future__ import annotations

import pytest

from benchmarks import bench_dino_reference as bench


def test_missing_checkout_is_named(tmp_path):
    (tmp_path / "main_dino.py").write_text("")
    with pytest.raises(SystemExit, match="utils.py not found"):
        bench.import_reference(tmp_path)
