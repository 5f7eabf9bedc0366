"""Prepared datasets: round trip, skipped inputs, resume, --verify, sharding, the same views as
from the source files, and the trainer reading one (``--data OUT``)."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import graph_ops, jpeg_bytes, make_dicom, png_bytes
from dinocxr_fast import prepare as prepare_cli
from dinocxr_fast.data import (
    ImageFolderSource,
    ViewsConfig,
    build_labelled_loader,
    build_pretrain_loader,
    dali_available,
    label_fraction,
)
from dinocxr_fast.data.imageio import decode_pil, load_encoded
from dinocxr_fast.data.prepared import PreparedDataset, is_prepared, shard_name, verify
from dinocxr_fast.data import prepared_write as pw
from dinocxr_fast.data.prepared_write import Settings, prepare
from dinocxr_fast.runtime import data_setup

BACKENDS = ["torch"] + (["dali"] if dali_available() else [])
VIEWS = ViewsConfig.dino_cxr(size=32)


def noise(h: int, w: int, seed: int, dtype=np.uint8) -> np.ndarray:
    hi = 255 if dtype == np.uint8 else 65535
    return np.random.default_rng(seed).integers(0, hi + 1, (h, w)).astype(dtype)


@pytest.fixture
def tree(tmp_path) -> Path:
    """train/ and val/ of two classes: 8-bit and 16-bit PNG, JPEG, DICOM, Kermany file names."""
    root = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(("normal", "pneumonia")):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                seed = zlib.crc32(f"{split}{cls}{k}".encode())
                (d / f"person{10 * c + k}_x_{k}.png").write_bytes(png_bytes(noise(40 + k, 56, seed)))
    (root / "train" / "normal" / "person50_deep.png").write_bytes(png_bytes(noise(48, 40, 7, np.uint16)))
    (root / "train" / "pneumonia" / "person51_jpeg.jpg").write_bytes(jpeg_bytes(noise(44, 52, 8)))
    make_dicom(root / "val" / "normal" / "scan.dcm", noise(50, 42, 9, np.uint16), patient_id="PAT-9")
    return root


def decoded(path: str) -> np.ndarray:
    """What the loaders decode from a source file, as stored pixels (uint8, or uint16 for 16-bit)."""
    im = decode_pil(load_encoded(path)[0])
    if im.mode == "L":
        return np.asarray(im)
    return np.rint(np.asarray(im, np.float32) * (65535.0 / 255.0)).astype(np.uint16)


def test_round_trip_pixels_labels_patients(tree, tmp_path):
    out = tmp_path / "prep"
    result = prepare(tree, out, Settings(short_side=1024), progress=False)
    assert is_prepared(out) and result.images == 15 and result.skipped == 0
    ds = PreparedDataset(out)
    assert ds.classes == ("normal", "pneumonia") and ds.splits == ["train", "val"]
    for i, e in enumerate(ds.entries):
        np.testing.assert_array_equal(ds.pixels(i), decoded(e.path))  # no resize below the short side
        assert e.label == ("pneumonia" in e.path) and e.split == Path(e.path).parts[-3]
    deep = next(e for e in ds.entries if "deep" in e.path)
    assert deep.dtype == "uint16"
    assert next(e for e in ds.entries if e.path.endswith(".dcm")).patient_id == "PAT-9"
    assert next(e for e in ds.entries if "person11_" in e.path).patient_id == "P11"
    train = ds.source("train", labelled=True)
    ref = ImageFolderSource(tree / "train")
    assert [(s.path, s.label, s.patient_id) for s in train.samples] == [(s.path, s.label, s.patient_id) for s in ref.samples]
    # a label-fraction subset keeps the link to the stored pixels
    sub = label_fraction(train, 0.5, 0)
    pixels, info = sub.read_pixels(0)
    assert pixels.shape == (info.height, info.width)
    assert ds.source("val", classes=["pneumonia", "normal"], labelled=True).samples[0].label == 1


def test_resize_to_the_stored_size(tree, tmp_path):
    out = tmp_path / "prep"
    settings = Settings(short_side=20, max_long_side=26)
    prepare(tree, out, settings, progress=False, workers=2)
    ds = PreparedDataset(out)
    for i, e in enumerate(ds.entries):
        assert (e.height, e.width) == pw.stored_size(e.source_height, e.source_width, settings)
        assert min(e.height, e.width) <= 20 and max(e.height, e.width) <= 26
    e = ds.entries[0]
    want = np.asarray(decode_pil(load_encoded(e.path)[0]).resize((e.width, e.height), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds.pixels(0), want)
    assert pw.default_short_side(224, 0.4) == 355 and pw.default_short_side(224, 0.4, cap=300) == 300


def test_corrupt_and_oversized_inputs_are_skipped_with_a_reason(tree, tmp_path):
    bad = tree / "train" / "normal" / "person60_bad.png"
    bad.write_bytes(png_bytes(noise(30, 30, 1))[:60])
    big = tree / "train" / "normal" / "person61_big.png"
    big.write_bytes(png_bytes(noise(300, 300, 2)))
    result = prepare(tree, tmp_path / "prep", Settings(max_pixels=100 * 100), progress=False)
    assert result.images == 15 and result.skipped == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in PreparedDataset(tmp_path / "prep").skipped}
    assert "truncated PNG" in reasons["person60_bad.png"]
    assert reasons["person61_big.png"].startswith("oversized: 300x300")


def test_interrupted_prepare_resumes_and_matches_a_straight_run(tree, tmp_path, monkeypatch):
    settings = Settings(short_side=30, shard_images=4)
    straight = prepare(tree, tmp_path / "a", settings, progress=False)
    real_finish, calls = pw._ShardWriter.finish, []

    def finish_then_stop(self):
        if len(calls) == 2:  # the third shard never completes: as if the run were killed
            raise KeyboardInterrupt
        calls.append(self.shard)
        return real_finish(self)

    monkeypatch.setattr(pw._ShardWriter, "finish", finish_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "b", settings, progress=False)
    assert not is_prepared(tmp_path / "b") and (tmp_path / "b" / "pixels-00001.json").is_file()
    monkeypatch.setattr(pw._ShardWriter, "finish", real_finish)
    resumed = prepare(tree, tmp_path / "b", settings, progress=False)
    assert resumed.processed == straight.processed - 8  # the two finished shards were kept
    a, b = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("a", "b"))
    assert a["entries"] == b["entries"] and a["shards"] == b["shards"]
    for s in a["shards"]:
        name = shard_name(s["shard"])
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert prepare(tree, tmp_path / "b", settings, progress=False).processed == 0  # complete: nothing to do
    with pytest.raises(ValueError, match="another prepared dataset"):
        prepare(tree, tmp_path / "b", Settings(short_side=31), progress=False)


def test_verify_catches_a_corrupted_or_truncated_shard(tree, tmp_path, capsys):
    out = tmp_path / "prep"
    prepare(tree, out, Settings(), progress=False)
    assert verify(out) == [] and prepare_cli.main(["--verify", str(out)]) == 0
    e = PreparedDataset(out).entries[3]
    with open(out / shard_name(0), "r+b") as f:
        f.seek(e.offset + 5)
        byte = f.read(1)
        f.seek(e.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = verify(out)
    assert len(problems) == 1 and "entry 3" in problems[0] and "checksum" in problems[0]
    assert prepare_cli.main(["--verify", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    with open(out / shard_name(0), "r+b") as f:
        f.truncate(e.offset)
    assert any("bytes, the index says" in p for p in verify(out))
    assert "not a prepared dataset" in verify(tmp_path)[0]


def test_rank_and_node_sharding(tree, tmp_path, monkeypatch):
    prepare(tree, tmp_path / "prep", Settings(shard_images=3), progress=False)
    src = PreparedDataset(tmp_path / "prep").source(labelled=False)
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(src, VIEWS, 2, backend="torch", num_threads=0, shard_id=rank, num_shards=2, seed=3)
        seen.append({int(i) for _ in loader for i in loader.batch_indices})
        loader.close()
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 6  # 15 // 2 per rank, 3 full batches
    # by node: 4 ranks on 2 nodes; each node reads only its pixel files, all ranks the same length
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    parts = [data_setup.shard_for_rank(src, {"shard_by": "node"}, r, 4) for r in range(4)]
    assert [(p[1], p[2]) for p in parts] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    ds = src.dataset
    for rank, (part, _, _) in enumerate(parts):
        assert {ds.entries[k].shard % 2 for k in part.entry_ids} == {rank // 2}
    assert len({len(p[0]) for p in parts}) == 1
    assert data_setup.shard_for_rank(src, {}, 3, 4) == (src, 3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_views_as_from_the_source_at_the_stored_size(tree, tmp_path, backend):
    """Prepared pixels give exactly the views the source files give when they are stored at that
    size: the crops, jitters, blurs are drawn from (seed, epoch, index) and the stored shape. (DALI
    on an all-8-bit prepared dataset: within a gray level, its resampler rounds to 8 bits.)"""
    prepare(tree, tmp_path / "prep", Settings(short_side=24), progress=False)
    ds = PreparedDataset(tmp_path / "prep")
    resized = tmp_path / "resized"  # the source stored at the prepared size, losslessly
    for i, e in enumerate(ds.entries):
        target = resized / Path(e.path).relative_to(tree).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_bytes(np.array(ds.pixels(i))))
    src = ImageFolderSource(resized, labelled=False)
    prep = ds.source(labelled=False)
    assert [Path(s.path).stem for s in src.samples] == [Path(s.path).stem for s in prep.samples]
    threads = 1 if backend == "dali" else 0
    a = build_pretrain_loader(src, VIEWS, 4, backend=backend, num_threads=threads, seed=5)
    b = build_pretrain_loader(prep, VIEWS, 4, backend=backend, num_threads=threads, seed=5)
    b.load_state_dict(a.state_dict())  # same epoch and step
    for _ in range(2):
        for va, vb in zip(next(iter(a)), next(iter(b))):
            torch.testing.assert_close(va, vb, rtol=0, atol=0)
    # exact resume inside an epoch
    state = b.state_dict()
    after = [v.clone() for v in next(iter(b))]
    c = build_pretrain_loader(prep, VIEWS, 4, backend=backend, num_threads=threads, seed=5)
    c.load_state_dict(state)
    for x, y in zip(after, next(iter(c))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for loader in (a, b, c):
        loader.close()
    if backend == "dali":  # all-8-bit pixels go through the graph as uint8, resampled to 8 bits like PIL does
        eight = [k for k, s in enumerate(prep.samples) if ds.entries[prep.entry_ids[k]].dtype == "uint8"]
        src8, prep8 = src.with_samples([src[k] for k in eight]), prep.with_samples([prep[k] for k in eight])
        assert prep8.pixel_dtype == "uint8" and prep.pixel_dtype == "uint16"
        for va, vb in zip(*(next(iter(build_pretrain_loader(s, VIEWS, 8, backend="dali", num_threads=1, seed=5)))
                            for s in (src8, prep8))):
            diff = (va - vb).abs()  # 1 gray level is 0.017 normalised
            assert diff.mean() < 0.01 and diff.max() < 0.3, (diff.mean(), diff.max())
    ev = build_labelled_loader(ds.source("val", labelled=True), None, 4, backend=backend, num_threads=threads)
    images, labels = next(iter(ev))
    assert images.shape == (4, 1, 224, 224) and labels.tolist() == [0, 0, 0, 1]
    ev.close()


def test_trainer_reads_a_prepared_dataset(tree, tmp_path):
    """``--data OUT`` for pretraining and the kNN monitor; the supervised splits resolve alike."""
    from dinocxr_fast import train

    sample = tree
    out = tmp_path / "prep"
    assert prepare_cli.main([str(sample), str(out), "--workers", "1", "--quiet"]) == 0
    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--max-steps", "2", "--data", str(out), "--knn-data", str(out), "--quiet",
                       "--set", "data.view_size=64", "--set", "optim.batch_size=4", "--set", "model.out_dim=64",
                       "--set", "model.head_hidden_dim=32", "--set", "model.head_bottleneck_dim=16",
                       "--set", "data.num_workers=1", "--set", "train.knn_size=64", "--set", "train.epochs=1",
                       "--set", "optim.warmup_epochs=0"]) == 0
    knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "knn_acc" in line]
    assert knn and all(0.0 <= r["knn_acc"] <= 1.0 for r in knn)
    cfg = {"path": str(out), "train_split": "train", "val_split": "val", "test_split": "test",
           "label_fraction": 1.0, "label_seed": 0}
    mine = data_setup.supervised_sources(cfg)
    theirs = data_setup.supervised_sources({**cfg, "path": str(sample)})
    for a, b in zip(mine[:3], theirs[:3]):
        assert [(s.path, s.label) for s in a.samples] == [(s.path, s.label) for s in b.samples]
    assert mine[3] == theirs[3] == "val"


@pytest.mark.parametrize("sigma, window", [(0.4, 3), (1.7, 13), (2.0, 31)])
def test_blur_fast_path_matches_the_conv_form(sigma, window):
    """The torch loader's SciPy blur (reflect-101) is the conv2d blur up to float rounding."""
    from dinocxr_fast.data import torch_ops

    if torch_ops._correlate1d is None:
        pytest.skip("SciPy is not installed: the conv2d form is the only one in use")
    x = torch.rand(24, 20, generator=torch.Generator().manual_seed(0))
    r = window // 2
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    torch.testing.assert_close(torch_ops.gaussian_blur(x, sigma, window), torch_ops._blur_conv(x, k / k.sum(), r),
                               rtol=0, atol=1e-6)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
@pytest.mark.parametrize("raw", [None, "uint8", "uint16"])
def test_gpu_graphs_decode_with_nvjpeg_or_take_prepared_pixels(raw):
    """On a GPU the source graph decodes with device="mixed" (nvJPEG for JPEG) and the prepared
    graph copies the pixels to the GPU with no decoder; every image operator runs on the GPU.
    (Built and serialised here on the CPU; test_gpu_loaders_run below runs them on a GPU.)"""
    from nvidia.dali import Pipeline

    from dinocxr_fast.data.dali_graph import define_graph

    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None)
    with pipe:
        outs = define_graph(ViewsConfig.dino_cxr(), lambda: None, "gpu", raw)
        pipe.set_outputs(*outs)
    assert pipe.serialize() and {o.device for o in outs} == {"gpu"}
    ops = set(graph_ops(outs))
    decoders = {d for name, d in ops if name == "decoders__Image"}
    assert decoders == (set() if raw else {"gpu"})  # "mixed" decodes on the host/nvJPEG, outputs on the GPU
    for name in ("Resize", "GaussianBlur", "CropMirrorNormalize", "reductions__Mean"):
        assert (name, "gpu") in ops and (name, "cpu") not in ops
    with pytest.raises(ValueError, match="raw must be"):
        define_graph(ViewsConfig.dino_cxr(), lambda: None, "gpu", "float32")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_loaders_run(tmp_path, backend):
    """On a GPU: JPEG sources through DALI's mixed (nvJPEG) decoder, and a prepared dataset through
    external_source, give the CPU graph's views (within the GPU resampler's rounding)."""
    root = tmp_path / "jpegs"
    root.mkdir()
    for k in range(8):
        (root / f"person{k}_x.jpg").write_bytes(jpeg_bytes(noise(64, 80, k)))
    prepare(root, tmp_path / "prep", Settings(short_side=48), progress=False)
    for src in (ImageFolderSource(root, labelled=False), PreparedDataset(tmp_path / "prep").source(labelled=False)):
        gpu = next(iter(build_pretrain_loader(src, VIEWS, 4, device="cuda", backend=backend, num_threads=2)))
        cpu = next(iter(build_pretrain_loader(src, VIEWS, 4, device="cpu", backend=backend, num_threads=0 if backend == "torch" else 2)))
        for g, c in zip(gpu, cpu):
            assert g.device.type == "cuda"
            assert (g.cpu() - c).abs().mean() < 0.02  # nvJPEG's IDCT and the GPU resampler round differently
