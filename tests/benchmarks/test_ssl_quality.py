"""benchmarks/ssl_quality's mechanics on tiny fake data: the patient-disjoint split, the paired
bootstrap, and one end-to-end run to the JSON (the accuracy itself is measured, not tested)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import ssl_quality


def _png(path: Path, value: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(np.clip(rng.normal(value, 20, (size, size)), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture()
def fake_data(tmp_path):
    pool, sample = tmp_path / "pool", tmp_path / "sample"
    rows = []
    for i in range(24):  # 12 patients with two images each
        label = ssl_quality.CLASSES[i % 2]
        name = f"p{i}.png"
        _png(pool / "images" / name, 60 + 100 * (i % 2) + i)
        rows.append({"file": name, "label": label, "patient_key": f"P{i // 2 * 2 + i % 2}"})
    with open(pool / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "patient_key"])
        writer.writeheader()
        writer.writerows(rows)
    for split, n in (("train", 8), ("val", 4)):
        for c, label in enumerate(ssl_quality.CLASSES):
            for i in range(n):
                _png(sample / split / label / f"{split}{i}.png", 60 + 100 * c + i)
    return pool, sample, rows


def test_protocol_is_patient_disjoint_and_never_pretrains_on_test_images(tmp_path, fake_data):
    pool, sample, rows = fake_data
    protocol = ssl_quality.build_protocol(tmp_path / "p", pool, sample, None, holdout=0.34, seed=0)
    pretrain = {p.resolve() for p in protocol["pretrain"].iterdir()}
    test = {p.resolve() for p in (protocol["eval"] / "val").rglob("*.png")}
    train = {p.resolve() for p in (protocol["eval"] / "train").rglob("*.png")}
    assert pretrain and test and not pretrain & test
    assert train <= pretrain  # the labelled training images join the pretraining set unlabelled
    patient_of = {(pool / "images" / r["file"]).resolve(): r["patient_key"] for r in rows}
    held = {patient_of[p] for p in test if p in patient_of}
    assert held and not held & {patient_of[p] for p in pretrain if p in patient_of}
    assert protocol["test_split"] == "val"
    assert sum(v for k, v in protocol["counts"].items() if k.startswith("pretrain")) == len(pretrain)


def test_paired_bootstrap_sees_a_real_difference_and_no_false_one():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    good = [labels + rng.normal(0, 0.3, 100) for _ in range(2)]
    noise = [rng.normal(0, 1, 100) for _ in range(2)]
    better = ssl_quality.paired_bootstrap(labels, good, noise, n_boot=300)
    assert better["diff_auc"] > 0.3 and better["ci_low"] > 0
    same = ssl_quality.paired_bootstrap(labels, good, good, n_boot=300)
    assert same["diff_auc"] == 0 and same["ci_low"] == 0 == same["ci_high"]


def test_missing_data_is_one_line(tmp_path, capsys):
    assert ssl_quality.main(["--pool", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_end_to_end_writes_every_comparison(tmp_path, fake_data):
    pool, sample, _ = fake_data
    out_json = tmp_path / "r.json"
    argv = ["--pool", str(pool), "--sample", str(sample), "--out", str(tmp_path / "o"), "--json", str(out_json),
            "--pretrain-steps", "2", "--seeds", "2", "--size", "32", "--protocols", "knn", "--holdout", "0.34",
            "--set", "optim.batch_size=4", "--set", "model.out_dim=64", "--set", "model.head_hidden_dim=32",
            "--set", "model.head_bottleneck_dim=16", "--set", "data.num_workers=1", "--set", "data.loader=torch"]
    assert ssl_quality.main(argv) == 0
    result = json.loads(out_json.read_text())
    assert [(c["protocol"], c["label_fraction"]) for c in result["comparisons"]] == [("knn", 0.1), ("knn", 1.0)]
    for c in result["comparisons"]:
        assert c["ci_low"] <= c["diff_auc"] <= c["ci_high"]
        assert {"auc_pretrained", "auc_random", "n_test"} <= c.keys()
    assert result["pretraining"]["steps"] == 2
    assert len(result["per_seed_auc"]) == 2 * 2 * 2
