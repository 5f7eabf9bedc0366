"""benchmarks/bench_views on tiny data: both view modes timed, pretrained in their own process,
and reported (step time, FLOPs, peak memory, kNN over wall time)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from benchmarks import bench_views


def _images(root, n, labelled):
    rng = np.random.default_rng(0)
    for i in range(n):
        label = ("normal", "pneumonia")[i % 2]
        path = root / label / f"{i}.png" if labelled else root / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8) // (1 + i % 2)).save(path)


def test_both_view_modes_are_measured(tmp_path):
    _images(tmp_path / "pool", 16, labelled=False)
    for split in ("train", "val"):
        _images(tmp_path / "knn" / split, 8, labelled=True)
    out_json = tmp_path / "views.json"
    argv = ["--json", str(out_json), "--allow-busy", "--size", "32", "--batch", "4", "--steps", "1", "--minutes", "0.25",
            "--data", str(tmp_path / "pool"), "--knn-data", str(tmp_path / "knn"), "--out", str(tmp_path / "runs"),
            "--set", "model.out_dim=64", "--set", "model.head_hidden_dim=32", "--set", "model.head_bottleneck_dim=16",
            "--set", "data.num_workers=1", "--set", "data.loader=torch", "--device", "cpu"]
    assert bench_views.main(argv) == 0
    extra = json.loads(out_json.read_text())[0]["extra"]  # _harness.write_json: a list of records
    step, runs = extra["step"], extra["pretrain"]
    assert set(step) == set(runs) == set(bench_views.MODES)
    assert len(step["dino_cxr"]["views"]) == 2 and len(step["dino_multicrop"]["views"]) == 10
    assert step["dino_multicrop"]["gflops_per_step"] > step["dino_cxr"]["gflops_per_step"]
    for run in runs.values():
        assert run["peak_mem_mb"] > 0 and run["knn_trace"] and 0 <= run["knn_end"] <= 1
