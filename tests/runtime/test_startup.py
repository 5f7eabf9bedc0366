"""Every command prints a start-up block before its work (runtime.run_log.print_startup): evaluate,
export and infer here (pretrain, linear and finetune in test_dispatch / test_supervised). Those that
run the model name the backend each fused op got, planned on the forward they run; a second
command re-verifies nothing (the verdict cache). Export traces the vendor path only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_helpers import cxr_sample

from dinocxr_fast import evaluate, export, infer
from dinocxr_fast.classifier import build_classifier, classifier_record, save_classifier
from dinocxr_fast.data import EvalConfig
from dinocxr_fast.ops import _dispatch, _verify

SIZE = 64
OPS = ("pcm", "conv_bn_act", "window_attention", "attention")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCXR_CACHE_DIR", str(tmp_path / "verdicts"))
    monkeypatch.delenv("DINOCXR_BACKEND", raising=False)
    _dispatch.reset()
    yield
    _dispatch.reset()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_classifier("vitaev2_tiny", 1, 2)
    record = classifier_record(model, arch="vitaev2_tiny", in_chans=1, classes=["normal", "pneumonia"],
                               eval_cfg=EvalConfig.for_size(SIZE).to_dict())
    return save_classifier(record, tmp_path_factory.mktemp("clf") / "classifier.pt")


def block(err: str, title: str) -> dict[str, str]:
    """The fields of the start-up block titled ``title`` in ``err``."""
    lines = err.splitlines()
    start = lines.index(f"== {title} ==")
    fields = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition("  ")
        fields[key] = value.strip()
    return fields


def test_evaluate_block_plans_its_forward_and_the_second_run_verifies_nothing(classifier, tmp_path, capsys, monkeypatch):
    sample = cxr_sample()
    args = ["--checkpoint", str(classifier), "--data", str(sample), "--split", "val", "--bootstrap", "20",
            "--loader", "torch"]
    assert evaluate.main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    fields = block(err, "evaluation")
    assert fields["data"] == f"40 images from {sample / 'val'}" and fields["loader"] == "torch"
    assert fields["device"].startswith("cpu") and "vitaev2_tiny" in fields["model"]
    assert all(f"{op} " in fields["backends"] for op in OPS) and "backends.md" in fields["backends"]
    rows = json.loads((tmp_path / "a" / "backends.json").read_text())["rows"]
    assert rows and all(r["shape"].startswith("40x") for r in rows)  # the forward it runs: one batch of 40
    assert "scoring val/: batch 1/1" in err  # progress from the first batch
    # a second command (fresh process state, same verdict cache) plans from the cache alone
    _dispatch.reset()

    def no_verification(*a, **k):
        raise AssertionError("re-verified a case the verdict cache holds")

    monkeypatch.setattr(_verify, "verify_case", no_verification)
    monkeypatch.setattr(_verify, "verify_isolated", no_verification)
    assert evaluate.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert block(capsys.readouterr().err, "evaluation")["backends"].split(" (table")[0] == \
        fields["backends"].split(" (table")[0]


def test_export_block_and_the_trace_uses_the_vendor_path_only(classifier, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    _dispatch.set_forced("cpp")  # an earlier --backend in this process must not reach the trace
    chosen = []
    real_choose = _dispatch.choose

    def spy(*a, **k):
        choice = real_choose(*a, **k)
        chosen.append((a[0], choice.backend))
        return choice

    monkeypatch.setattr(_dispatch, "choose", spy)
    out = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(classifier), "--out", str(out)]) == 0
    fields = block(capsys.readouterr().err, "ONNX export")
    assert fields["backends"] == export.TRACED_BACKENDS and str(out) in fields["output"]
    assert {op for op, _ in chosen} >= {"pcm", "attention"} and {b for _, b in chosen} == {"torch"}
    assert _dispatch.forced() == "cpp"  # restored after the trace


def test_infer_block_for_torch_and_onnx(classifier, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    images = sorted(str(p) for p in (cxr_sample() / "val").rglob("*.png"))[:3]
    assert infer.main([*images, "--model", str(classifier), "--out", str(tmp_path / "t.csv"), "--loader", "torch"]) == 0
    err = capsys.readouterr().err
    fields = block(err, "inference")
    assert fields["data"].startswith("3 images from") and fields["device"] == "cpu, fp32"
    assert all(f"{op} " in fields["backends"] for op in OPS)
    assert "step 1/1" in err
    onnx_path = export.export_onnx(classifier, tmp_path / "m.onnx")
    assert infer.main([*images, "--model", str(onnx_path), "--out", str(tmp_path / "o.csv"), "--loader", "torch"]) == 0
    fields = block(capsys.readouterr().err, "inference")
    assert fields["backends"].startswith("none of ours: ONNX Runtime") and "CPUExecutionProvider" in fields["device"]
