"""Fine-tuning, linear evaluation and the evaluation report on the real cxr-sample X-rays."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_helpers import cxr_sample

from dinocxr_fast import evaluate, train
from dinocxr_fast.classifier import load_classifier
from dinocxr_fast.runtime import checkpoint as ckpt


FAST = ["--preset", "supervised_tiny_cpu", "--set", "data.image_size=64", "--set", "eval.bootstrap=50", "--quiet"]


@pytest.fixture(scope="module")
def sample() -> Path:
    return cxr_sample()


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pre") / "run"
    assert train.main(["--out", str(run), "--max-steps", "2", "--quiet", "--set", "data.synthetic_count=16",
                       "--set", "data.synthetic_size=64", "--set", "data.view_size=64", "--set", "optim.batch_size=4",
                       "--set", "model.out_dim=128", "--set", "model.head_hidden_dim=32",
                       "--set", "model.head_bottleneck_dim=16", "--set", "data.num_workers=1"]) == 0
    return run


def check_report(folder: Path) -> dict:
    for name in ("report.md", "metrics.json", "roc.png", "confusion.png"):
        assert (folder / name).is_file(), name
    for png in ("roc.png", "confusion.png"):
        with Image.open(folder / png) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    record = json.loads((folder / "metrics.json").read_text())
    m = record["metrics"]
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "precision", "recall", "specificity"):
        assert 0.0 <= m[key] <= 1.0
        lo, hi = m["ci95"][key]
        assert lo <= hi
    return record


def backends_line(err: str) -> str:
    """The start-up block's line naming the fused ops' backends."""
    return next(ln for ln in err.splitlines() if ln.strip().startswith("backends "))


def test_linear_grid_cache_and_report(sample, pretrained_run, tmp_path, capsys):
    out = tmp_path / "lin"
    args = ["linear", "--data", str(sample), "--pretrained", str(pretrained_run), "--out", str(out), *FAST,
            "--set", "linear.epochs=20", "--set", f"linear.cache_dir={tmp_path / 'cache'}"]
    assert train.main(args) == 0
    line = backends_line(capsys.readouterr().err)  # planned on the frozen backbone's forward
    assert "pcm " in line and "attention " in line and (out / "backends.md").is_file()
    results = json.loads((out / "linear_results.json").read_text())
    assert results["heads"] == 12 and not results["features_cached"]
    assert "teacher backbone" in results["pretrained"]
    record = check_report(out / "report")
    assert record["metrics"]["n"] == 40  # cxr-sample val: no test split, val is the test set
    # the same checkpoint, data and transform hit the cache
    assert train.main(args) == 0
    assert json.loads((out / "linear_results.json").read_text())["features_cached"]
    assert "none run: the features are cached" in backends_line(capsys.readouterr().err)
    # the saved classifier reproduces the reported test metrics through the evaluate CLI
    assert evaluate.main(["--checkpoint", str(out / "classifier.pt"), "--data", str(sample), "--split", "val",
                          "--out", str(tmp_path / "eval"), "--bootstrap", "50"]) == 0
    again = check_report(tmp_path / "eval")
    assert again["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"], abs=1e-6)
    assert again["metrics"]["roc_auc"] == pytest.approx(record["metrics"]["roc_auc"], abs=1e-6)


def test_finetune_with_label_fraction_resume_and_report(sample, pretrained_run, tmp_path, capsys):
    straight, split = tmp_path / "a", tmp_path / "b"
    common = ["finetune", "--data", str(sample), "--pretrained", str(pretrained_run), *FAST, "--epochs", "2",
              "--label-fraction", "0.25", "--batch-size", "8"]
    assert train.main([*common, "--out", str(straight)]) == 0
    line = backends_line(capsys.readouterr().err)  # the training and the scoring forwards
    assert "pcm " in line and f"(table: {straight / 'backends.md'})" in line
    shapes = {r["shape"].split("x")[0] for r in json.loads((straight / "backends.json").read_text())["rows"]}
    assert {"8", "32", "40"} <= shapes  # batch 8 training; 32 held out for selection, 40 reported (val/)
    assert train.main([*common, "--out", str(split), "--max-steps", "4"]) == 0
    assert train.main([*common, "--out", str(split), "--resume", "auto"]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a, b = losses(straight), losses(split)
    assert set(a) <= set(b) and all(a[k] == b[k] for k in a)  # b also logged the step it stopped at
    check_report(straight / "report")
    model, record = load_classifier(straight / "classifier.pt")
    assert record["classes"] == ["normal", "pneumonia"] and record["model"]["arch"] == "vitaev2_tiny"
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 2)
    state = ckpt.load(ckpt.latest(straight))
    assert state["format"] == "dinocxr_fast.finetune/1"


def test_random_init_baseline_and_bad_inputs(sample, tmp_path, capsys):
    out = tmp_path / "rand"
    assert train.main(["linear", "--data", str(sample), "--pretrained", "none", "--out", str(out), *FAST,
                       "--set", "linear.epochs=5"]) == 0
    assert json.loads((out / "linear_results.json").read_text())["pretrained"] == "random initialisation"
    assert train.main(["linear", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *FAST]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert train.main(["finetune", "--data", str(sample), "--pretrained", str(tmp_path / "nope"), *FAST]) == 1
    assert "nope" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(sample)]) == 1
