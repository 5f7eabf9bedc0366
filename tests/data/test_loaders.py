"""The loaders on real X-rays, both backends: views, agreement, determinism, resume, shards,
unreadable files, 16-bit PNG and DICOM inputs, and the GPU graph's structure."""
from __future__ import annotations

import glob
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import (
    cxr_sample,
    graph_ops,
    jpeg_bytes,
    link_tree,
    make_dicom,
    png_bytes,
    png_with_bad_crc,
    png_with_bad_stream,
)
from dinocxr_fast.data import (
    DatasetError,
    EvalConfig,
    ImageFolderSource,
    Source,
    ViewsConfig,
    ViewSpec,
    build_labelled_loader,
    build_pretrain_loader,
)
from dinocxr_fast.data.views import GRAY_MEAN, GRAY_STD

BACKENDS = ["dali", "torch"]
LO, HI = (0 - GRAY_MEAN) / GRAY_STD, (1 - GRAY_MEAN) / GRAY_STD  # normalised [0, 1]
SMALL = ViewsConfig.dino_cxr().with_size(48)
EVAL = EvalConfig.for_size(40)


@pytest.fixture(scope="module")
def train24() -> Source:
    """24 real training images (12 per class): small enough for quick epochs."""
    src = ImageFolderSource(cxr_sample() / "train")
    per_class = {0: [], 1: []}
    for s in src.samples:
        if len(per_class[s.label]) < 12:
            per_class[s.label].append(s)
    return src.with_samples(per_class[0] + per_class[1])


def collect(loader, limit=None):
    """Copies of the next ``limit`` batches (default: the rest of the epoch)."""
    out = []
    for _, batch in zip(range(limit if limit is not None else len(loader)), loader):
        out.append([t.clone() for t in batch] if isinstance(batch, list) else tuple(t.clone() for t in batch))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_have_the_right_shape_type_and_range(train24, backend):
    loader = build_pretrain_loader(train24, SMALL, 8, backend=backend, seed=0)
    batches = collect(loader)
    assert len(loader) == len(batches) == 3
    for views in batches:
        assert len(views) == 2
        for v in views:
            assert v.shape == (8, 1, 48, 48) and v.dtype == torch.float32 and v.device.type == "cpu"
            assert torch.isfinite(v).all()
            assert LO - 1e-4 <= v.min() and v.max() <= HI + 1e-4
            assert v.std() > 0.1  # an image, not a constant
    # Over the whole epoch the two views of a sample differ (different crops and jitter).
    assert (batches[0][0] - batches[0][1]).abs().mean() > 0.1


def test_dali_and_torch_produce_the_same_views(train24):
    cfg = ViewsConfig.dino_cxr().with_size(64)
    dali = collect(build_pretrain_loader(train24, cfg, 8, backend="dali", seed=5))
    ref = collect(build_pretrain_loader(train24, cfg, 8, backend="torch", seed=5))
    for d, r in zip(dali, ref):
        for a, b in zip(d, r):
            diff = (a - b).abs()
            # Resampler rounding (uint8 in PIL, uint16 in DALI) and border details only:
            # 1 gray level is 0.017 in normalised units.
            assert diff.mean() < 0.01, diff.mean()
            assert diff.max() < 0.3, diff.max()


def test_dali_and_torch_produce_the_same_eval_images():
    src = ImageFolderSource(cxr_sample() / "val")
    (xd, yd), = collect(build_labelled_loader(src, EVAL, 40, backend="dali"))
    (xt, yt), = collect(build_labelled_loader(src, EVAL, 40, backend="torch"))
    assert xd.shape == (40, 1, 40, 40)
    assert torch.equal(yd, yt) and yd.tolist() == src.labels()
    assert (xd - xt).abs().mean() < 0.01 and (xd - xt).abs().max() < 0.1


def test_same_seed_same_batches_and_epochs_differ(train24):
    a = build_pretrain_loader(train24, SMALL, 8, seed=1)
    b = build_pretrain_loader(train24, SMALL, 8, seed=1)
    ea, eb = collect(a), collect(b)
    assert all(torch.equal(x, y) for p, q in zip(ea, eb) for x, y in zip(p, q))
    a1 = collect(a)  # the epoch was finished: iterating again runs epoch 1
    assert a.state_dict()["epoch"] == 1
    assert not torch.equal(ea[0][0], a1[0][0])
    fresh = build_pretrain_loader(train24, SMALL, 8, seed=1)
    fresh.set_epoch(1)
    assert all(torch.equal(x, y) for p, q in zip(a1, collect(fresh)) for x, y in zip(p, q))
    other = collect(build_pretrain_loader(train24, SMALL, 8, seed=2), limit=1)
    assert not torch.equal(ea[0][0], other[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_with_the_same_batches(train24, backend):
    ref = build_pretrain_loader(train24, SMALL, 6, backend=backend, seed=4)
    ref.set_epoch(2)
    expected = collect(ref)
    first = build_pretrain_loader(train24, SMALL, 6, backend=backend, seed=4)
    first.set_epoch(2)
    head = collect(first, limit=2)  # a trainer stopped after two steps...
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (2, 2)
    resumed = build_pretrain_loader(train24, SMALL, 6, backend=backend, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a trainer's epoch loop does: keeps the position
    tail = collect(resumed)
    assert len(head) + len(tail) == len(expected) == 4
    for got, want in zip(head + tail, expected):
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    # The same loader also continues where it was left (DALI: after prefetching past it).
    rest = collect(first)
    assert all(torch.equal(x, y) for got, want in zip(rest, expected[2:]) for x, y in zip(got, want))
    with pytest.raises(ValueError, match="batch_size"):
        build_pretrain_loader(train24, SMALL, 4, backend=backend, seed=4).load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_cover_every_sample_once_per_epoch(train24, backend):
    seen = Counter()
    for shard in range(3):
        loader = build_pretrain_loader(
            train24, ViewsConfig.dino_cxr().with_size(16), 5, backend=backend, shard_id=shard,
            num_shards=3, seed=9, drop_last=False,
        )
        loader.set_epoch(1)
        for _ in loader:
            seen.update(loader.batch_indices.tolist())
    assert seen == Counter(range(len(train24)))
    lens = {len(build_pretrain_loader(train24, SMALL, 3, backend="torch", shard_id=k, num_shards=5)) for k in range(5)}
    assert lens == {1}  # drop_last: every rank the same number of steps


def test_eval_shards_give_every_label_once():
    src = ImageFolderSource(cxr_sample() / "val")
    labels = []
    for shard in range(3):
        for x, y in build_labelled_loader(src, EvalConfig.for_size(16), 7, shard_id=shard, num_shards=3):
            labels += y.tolist()
    assert sorted(labels) == sorted(src.labels())


@pytest.fixture
def planted(tmp_path):
    """12 real X-rays (symlinked in place) plus four broken files, in an ImageFolder."""
    files = sorted(glob.glob(str(cxr_sample() / "val" / "normal" / "*.png")))[:6]
    files += sorted(glob.glob(str(cxr_sample() / "val" / "pneumonia" / "*.png")))[:6]
    root = link_tree(files, tmp_path / "data")
    noise = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    broken = {
        "normal/bad_crc.png": png_with_bad_crc(noise),
        "normal/bad_stream.png": png_with_bad_stream(noise),  # passes the probe: the decoder fails
        "pneumonia/truncated.png": png_bytes(noise)[:-300],
        "pneumonia/empty.png": b"",
    }
    for name, data in broken.items():
        (root / name).write_bytes(data)
    return ImageFolderSource(root), sorted(Path(n).name for n in broken)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_files_are_skipped_counted_and_named(planted, backend, caplog):
    src, broken = planted
    caplog.set_level(logging.WARNING, logger="dinocxr_fast.data")
    loader = build_pretrain_loader(src, ViewsConfig.dino_cxr().with_size(24), 4, backend=backend, seed=0)
    batches = collect(loader)
    assert len(batches) == len(loader) == 4  # the epoch went on
    assert all(v.shape[0] == 4 for views in batches for v in views)  # bad slots refilled
    assert loader.num_skipped == 4
    assert sorted(Path(p).name for p in loader.skipped) == broken
    for name in broken:
        assert caplog.text.count(name) == 1, name  # named in the log, once
    if backend == "dali":  # found by the decoder, not the probe: the pipeline was rebuilt
        assert loader.skipped[str(src.root) + "/normal/bad_stream.png"].startswith("DALI decoder failed")
    assert len(collect(loader)) == 4  # the next epoch: known bad files are not logged again
    assert all(caplog.text.count(name) == 1 for name in broken)
    # Evaluation drops them instead, so the labels stay true.
    evl = build_labelled_loader(src, EvalConfig.for_size(24), 5, backend=backend)
    labels = [y for _, ys in evl for y in ys.tolist()]
    assert sorted(labels) == [0] * 6 + [1] * 6
    assert evl.num_skipped == 4


def test_a_batch_of_only_unreadable_files(tmp_path):
    (tmp_path / "a").mkdir()
    good = sorted(glob.glob(str(cxr_sample() / "val" / "normal" / "*.png")))[0]
    (tmp_path / "a" / "0.png").symlink_to(good)
    for k in range(1, 4):
        (tmp_path / "a" / f"{k}.png").write_bytes(b"not a png")
    src = ImageFolderSource(tmp_path)
    evl = build_labelled_loader(src, EvalConfig.for_size(16), 1)
    assert sum(len(y) for _, y in evl) == 1  # three empty batches left out, one image
    pre = build_pretrain_loader(src, ViewsConfig.dino_cxr().with_size(16), 2)
    assert all(v.shape[0] == 2 for views in pre for v in views)  # filled with the good one
    crops = ViewsConfig(views=(ViewSpec(16),))
    assert sum(len(y) for _, y in build_labelled_loader(src, crops, 1, shuffle=True)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_png_dicom_jpeg_and_rgb_inputs(tmp_path, backend):
    yy, xx = np.mgrid[0:96, 0:128]
    ramp = (xx * 128 + yy).astype(np.float64)  # left dark, right bright
    narrow = (20000 + ramp / ramp.max() * 400).astype(np.uint16)  # 400 levels of 65535
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "png16.png").write_bytes(png_bytes(narrow))
    (tmp_path / "a" / "png8.png").write_bytes(png_bytes((ramp / ramp.max() * 255).astype(np.uint8)))
    (tmp_path / "a" / "rgb.png").write_bytes(png_bytes(np.stack([(ramp / ramp.max() * 255).astype(np.uint8)] * 3, -1)))
    (tmp_path / "a" / "photo.jpg").write_bytes(jpeg_bytes((ramp / ramp.max() * 255).astype(np.uint8)))
    # MONOCHROME1: stored values grow to the left, so after inversion the image is bright on the right.
    make_dicom(tmp_path / "a" / "m1.dcm", (4000 - ramp / ramp.max() * 4000).astype(np.uint16), photometric="MONOCHROME1", slope=0.5, intercept=-100)
    src = ImageFolderSource(tmp_path)
    cfg = EvalConfig(resize=64, crop=64)
    (x, y), = collect(build_labelled_loader(src, cfg, 5, backend=backend))
    names = [Path(s.path).name for s in src.samples]
    assert x.shape == (5, 1, 64, 64)
    for name, img in zip(names, x[:, 0]):
        left, right = img[:, :16].mean(), img[:, -16:].mean()
        # The bright side stays bright (no lost inversion); png16 spans only 400 of 65535 levels.
        assert right > left + (0.01 if name == "png16.png" else 0.5), name
    png16 = x[names.index("png16.png"), 0]
    # 16 bits survive: an 8-bit path would leave 2 gray levels for these 400 values.
    assert len(torch.unique(png16)) > 150
    for name in ("png8.png", "rgb.png", "photo.jpg", "m1.dcm"):
        assert (x[names.index(name)] - x[names.index("png8.png")]).abs().mean() < 0.05, name


def test_multicrop_views(train24):
    cfg = ViewsConfig.dino_multicrop(global_size=48, local_size=24, n_local=4)
    views = next(iter(build_pretrain_loader(train24, cfg, 4)))
    assert [tuple(v.shape) for v in views] == [(4, 1, 48, 48)] * 2 + [(4, 1, 24, 24)] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_formats_bf16_fp16_and_three_channels(train24, backend):
    views = next(iter(build_pretrain_loader(train24, ViewsConfig.dino_cxr(size=32, dtype="bfloat16", channels=3), 4, backend=backend)))
    assert views[0].dtype == torch.bfloat16 and views[0].shape == (4, 3, 32, 32)
    assert torch.equal(views[0][:, 0], views[0][:, 2])
    x, y = next(iter(build_labelled_loader(train24, EvalConfig.for_size(32, dtype="float16"), 4, backend=backend)))
    assert x.dtype == torch.float16 and y.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_loader_gives_augmented_crops_with_their_labels(train24, backend):
    crop = ViewsConfig(views=(ViewSpec(32, scale=(0.5, 1.0), jitter_p=0.0, blur_p=0.0),))
    loader = build_labelled_loader(train24, crop, 8, backend=backend, seed=3, shuffle=True, drop_last=True)
    seen = []
    for x, y in loader:
        assert x.shape == (8, 1, 32, 32)
        assert y.tolist() == [train24[i].label for i in loader.batch_indices]
        seen += loader.batch_indices.tolist()
    assert sorted(seen) == list(range(24))  # shuffled, every sample once
    assert seen != list(range(24))
    with pytest.raises(ValueError, match="one view"):
        build_labelled_loader(train24, SMALL, 8)


def test_loader_errors(train24):
    with pytest.raises(DatasetError, match="make no batch of 64"):
        build_pretrain_loader(train24, SMALL, 64)
    with pytest.raises(ValueError, match="backend"):
        build_pretrain_loader(train24, SMALL, 4, backend="opencv")
    with pytest.raises(DatasetError, match="labelled"):
        build_labelled_loader(train24.unlabelled(), EVAL, 4)
    with pytest.raises(ValueError, match="shard_id"):
        next(iter(build_pretrain_loader(train24, SMALL, 4, shard_id=2, num_shards=2)))


@pytest.mark.parametrize("cfg", [ViewsConfig.dino_cxr(), ViewsConfig.dino_multicrop(n_local=2), EvalConfig()], ids=["cxr", "multicrop", "eval"])
def test_gpu_graph_is_the_cpu_graph_with_the_image_on_the_gpu(cfg):
    """The mixed/GPU path cannot run here (no GPU; no DALI on the GPU machine). Check what can be
    checked: it defines and serialises, the image work is on the GPU, and it has the same
    operators as the CPU graph the other tests run."""
    from nvidia.dali import Pipeline

    from dinocxr_fast.data.dali_graph import define_graph

    graphs = {}
    for device in ("cpu", "gpu"):
        pipe = Pipeline(batch_size=4, num_threads=1, device_id=None)
        with pipe:
            outs = define_graph(cfg, lambda: None, device)
            pipe.set_outputs(*outs)
        assert pipe.serialize()
        assert {o.device for o in outs} == {device}
        graphs[device] = graph_ops(outs)
    cpu, gpu = graphs["cpu"], graphs["gpu"]
    assert gpu[("decoders__Image", "gpu")] == 1  # device="mixed" produces GPU output
    image_ops = {"Resize", "GaussianBlur", "CropMirrorNormalize", "reductions__Mean"}
    for name in image_ops:
        assert cpu[(name, "cpu")] == gpu[(name, "gpu")] and (name, "cpu") not in gpu
    names = lambda g: Counter(n for (n, _), k in g.items() for _ in range(k))  # noqa: E731
    assert names(cpu) == names(gpu)
