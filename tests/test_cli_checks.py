"""What a person sees before any work: --help fast and complete, options that cannot work
refused in one line, pretraining on a labelled root reads train/ only, and finetune's files after
a time-budget stop."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import cxr_sample

from dinocxr_fast import artefact, evaluate, export, infer, train
from dinocxr_fast.runtime import data_setup

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["evaluate", "export", "infer"])
def test_help_answers_without_importing_torch(module):
    code = ("import runpy, sys\n"
            f"sys.argv = ['x', '--help']\n"
            "try:\n"
            f"    runpy.run_module('dinocxr_fast.{module}', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out
    assert "``" not in out and "(default: " in out


def test_train_help_lists_subcommands_and_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for name in ("pretrain", "linear", "finetune", "export-backbone"):
        assert name in text
    assert "default: tiny_cpu" in text


def test_evaluate_missing_split_names_the_existing_ones(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path), "--split", "test"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no test/" in err and "train, val" in err


def test_export_trt_without_tensorrt_refused_before_any_work(tmp_path, capsys):
    pytest.importorskip("onnx")
    if artefact.tensorrt_available() is None:
        pytest.skip("TensorRT works here")
    out = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(out), "--trt", str(tmp_path / "m.plan")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing was written" in err
    assert not out.exists()


def test_infer_refuses_before_any_work(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    # --attention-maps with an ONNX model: one line, no CSV
    csv = tmp_path / "p.csv"
    assert infer.main([str(image), "--model", str(tmp_path / "m.onnx"), "--out", str(csv), "--attention-maps",
                       str(tmp_path / "maps")]) == 1
    assert "--attention-maps needs the PyTorch model" in capsys.readouterr().err and not csv.exists()
    # an existing CSV is kept
    csv.write_text("keep me\n")
    assert infer.main([str(image), "--model", str(tmp_path / "m.onnx"), "--out", str(csv)]) == 1
    assert "--overwrite" in capsys.readouterr().err and csv.read_text() == "keep me\n"


def test_infer_skips_hidden_files(tmp_path):
    for name in ("a.png", ".hidden.png", ".cache/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    assert infer.collect_images([str(tmp_path)]) == [str(tmp_path / "a.png")]


def test_pretrain_on_a_labelled_root_reads_train_only(tmp_path):
    for split in ("train", "val", "test"):
        for i in range(2):
            (tmp_path / split / "x").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / "x" / f"{i}.png")
    cfg = {"path": str(tmp_path), "split": None, "csv": None}
    source = data_setup.pretrain_source(cfg, 0)
    assert Path(source.root) == tmp_path / "train" and len(source) == 2
    assert len(data_setup.pretrain_source({**cfg, "split": "val"}, 0)) == 2


def test_finetune_stopped_by_its_time_budget_leaves_classifier_and_report(tmp_path):
    """train.max_minutes so small that the set-up spends it: the run stops before its first step."""
    sample = cxr_sample()
    run = tmp_path / "ft"
    assert train.main(["finetune", "--pretrained", "none", "--data", str(sample), "--preset", "supervised_tiny_cpu",
                       "--out", str(run), "--set", "data.image_size=64", "--set", "eval.bootstrap=20",
                       "--set", "train.max_minutes=0.0001", "--quiet"]) == 0
    assert (run / "classifier.pt").is_file() and (run / "report" / "report.md").is_file()
    summary = (run / "summary.md").read_text()
    assert "max_minutes" in summary and "selection split" in summary and "reported split: val/" in summary
    assert "reported split" in (run / "report" / "report.md").read_text()
