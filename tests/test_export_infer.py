"""ONNX export (checked with ONNX Runtime on the CPU), batch inference, attention maps, and the
TensorRT engine (GPU only)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import cxr_sample

from dinocxr_fast import artefact, export, infer
from dinocxr_fast.classifier import build_classifier, classifier_record, load_classifier, save_classifier
from dinocxr_fast.data import EvalConfig

SIZE = 96


@pytest.fixture(scope="module")
def sample_images() -> list[str]:
    return sorted(str(p) for p in (cxr_sample() / "val").rglob("*.png"))[:: 4]  # 10 images, both classes


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_classifier("vitaev2_tiny", 1, 2)
    with torch.no_grad():  # a head that is not near zero, so the parity check means something
        model.head.weight.normal_(std=1.0)
    record = classifier_record(model, arch="vitaev2_tiny", in_chans=1, classes=["normal", "pneumonia"],
                               eval_cfg=EvalConfig.for_size(SIZE).to_dict())
    return save_classifier(record, tmp_path_factory.mktemp("clf") / "classifier.pt")


@pytest.fixture(scope="module")
def onnx_model(classifier, tmp_path_factory) -> Path:
    return export.export_onnx(classifier, tmp_path_factory.mktemp("onnx") / "model.onnx")


def preprocessed(files, meta) -> torch.Tensor:
    dl = infer.preprocess_batches(files, meta, 16, "cpu", loader="torch")
    try:
        return torch.cat([x for x, _ in dl])
    finally:
        dl.close()


def test_onnx_graph_is_standard_and_matches_torch(classifier, onnx_model, sample_images):
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(onnx_model))
    onnx.checker.check_model(graph)
    assert {n.domain for n in graph.graph.node} <= set(export.STANDARD_DOMAINS)
    assert graph.opset_import[0].version >= 17
    meta = artefact.read_metadata(onnx_model)
    assert meta["input"]["size"] == SIZE and meta["classes"] == ["normal", "pneumonia"]
    assert len(meta["source_sha256"]) == 64

    model, _ = load_classifier(classifier)
    images = preprocessed(sample_images, meta)
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # dynamic batch: 1 and 10
        ours = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            ref = model(batch).numpy()
        max_abs = float(np.abs(ours - ref).max())
        cosine = float((ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref))
        print(f"batch {batch.shape[0]}: torch vs ONNX Runtime max abs diff {max_abs:.2e}, cosine {cosine:.8f}")
        assert cosine > 0.9999 and max_abs < 1e-3
        assert (ours.argmax(1) == ref.argmax(1)).all()


def test_features_export(classifier, tmp_path):
    path = export.export_onnx(classifier, tmp_path / "features.onnx", features_only=True)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": np.zeros((2, 1, SIZE, SIZE), np.float32)})[0]
    assert out.shape == (2, 64)  # vitaev2_tiny's feature width
    assert artefact.read_metadata(path)["output"] == "features"


def test_infer_csv_same_for_onnx_and_torch_and_reports_bad_files(classifier, onnx_model, sample_images, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for f in sample_images[:4]:
        shutil.copy(f, folder)
    (folder / "truncated.png").write_bytes(Path(sample_images[0]).read_bytes()[:200])
    results = {}
    for name, model in (("onnx", onnx_model), ("torch", classifier)):
        out = tmp_path / f"{name}.csv"
        assert infer.main([str(folder), "--model", str(model), "--out", str(out), "--quiet", "--loader", "torch"]) == 0
        with out.open() as f:
            results[name] = list(csv.DictReader(f))
    onnx_rows, torch_rows = results["onnx"], results["torch"]
    assert len(onnx_rows) == 5
    bad = [r for r in onnx_rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["file"].endswith("truncated.png") and bad[0]["status"].startswith("error")
    for a, b in zip(onnx_rows, torch_rows):
        assert a["file"] == b["file"] and a["predicted"] == b["predicted"]
        if a["status"] == "ok":
            assert abs(float(a["p_pneumonia"]) - float(b["p_pneumonia"])) < 1e-4


def test_attention_overlays_are_pictures(classifier, sample_images, tmp_path):
    assert infer.main([*sample_images[:2], "--model", str(classifier), "--out", str(tmp_path / "p.csv"),
                       "--attention-maps", str(tmp_path / "maps"), "--quiet", "--loader", "torch"]) == 0
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[1] > 3 * arr.shape[0]  # input + 4 heads + mean side by side
    assert arr.std() > 10  # not a blank canvas


def test_clear_errors(tmp_path, capsys):
    assert infer.main([str(tmp_path), "--model", str(tmp_path / "none.onnx")]) == 1
    assert "no images" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "missing.pt" in capsys.readouterr().err


@pytest.mark.cuda
def test_tensorrt_fp16_engine_matches_onnxruntime(onnx_model, sample_images, tmp_path):
    reason = artefact.tensorrt_available()
    if reason:
        pytest.skip(reason)
    import onnxruntime as ort

    plan = export.build_tensorrt(onnx_model, tmp_path / "model.plan", precision="fp16", max_batch=16,
                                 timing_cache=tmp_path / "cache")
    meta = artefact.read_metadata(plan)
    images = preprocessed(sample_images, meta)
    run, _ = infer.tensorrt_runner(plan)
    ours = run(images)
    ref = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    cosine = float((ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert cosine > 0.999
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert (tmp_path / "cache").stat().st_size > 0
