"""Dataset sources, label-fraction subsets and the errors for unusable datasets."""
from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from data_helpers import cxr_sample, make_dicom, png_bytes
from dinocxr_fast.data import (
    UNLABELLED,
    CsvSource,
    DatasetError,
    DicomSource,
    ImageFolderSource,
    Sample,
    Source,
    kermany_patient_id,
    label_fraction,
    label_fraction_subset,
    source_from_config,
    split_by_patient,
)


def _manifest(root):
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_imagefolder_reads_the_real_sample_with_sorted_classes_and_patients():
    root = cxr_sample()
    src = ImageFolderSource(root / "train")
    assert src.classes == ("normal", "pneumonia")
    assert src.class_counts() == {"normal": 80, "pneumonia": 80}
    # Patient keys parsed from Kermany file names agree with the manifest for every image.
    keys = {r["file"]: r["patient_key"] for r in _manifest(root)}
    for s in src.samples:
        rel = s.path[len(str(root)) + 1 :]
        assert s.patient_id == keys[rel], rel
        assert src.classes[s.label] == rel.split("/")[1]


def test_imagefolder_unlabelled_takes_every_image_at_any_depth():
    src = ImageFolderSource(cxr_sample(), labelled=False)
    assert len(src) == 200
    assert src.classes == () and not src.labelled
    assert all(s.label == UNLABELLED for s in src.samples)


@pytest.mark.parametrize("name", ["kermany-does-not-exist", "a/b/c"])
def test_missing_dataset_is_an_error_naming_the_path(tmp_path, name):
    with pytest.raises(DatasetError, match=str(tmp_path / name)):
        ImageFolderSource(tmp_path / name)


def test_empty_dataset_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"no class sub-folders in {tmp_path}"):
        ImageFolderSource(tmp_path)
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=f"no images .* found under {tmp_path}"):
        ImageFolderSource(tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path)):
        ImageFolderSource(tmp_path, labelled=False)


def test_csv_source_reads_the_manifest_with_a_filter():
    root = cxr_sample()
    src = CsvSource(root / "manifest.csv", root, path_col="file", patient_col="patient_key", where={"split": "val"})
    assert len(src) == 40
    assert src.class_counts() == {"normal": 20, "pneumonia": 20}
    assert all(s.path.startswith(str(root / "val")) and s.patient_id for s in src.samples)


def test_covidx_list_with_a_missing_file(tmp_path, caplog):
    img = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    rows = [("101", "a.png", "positive", "cohen"), ("101", "b.png", "positive", "cohen"),
            ("7", "c.png", "negative", "rsna"), ("8", "gone.png", "negative", "rsna")]
    for _, name, _, _ in rows[:3]:
        (tmp_path / name).write_bytes(png_bytes(img))
    listing = tmp_path / "train.txt"
    listing.write_text("".join(" ".join(r) + "\n" for r in rows))
    src = CsvSource.covidx(listing, tmp_path)
    assert src.classes == ("negative", "positive")
    assert [(s.path.split("/")[-1], s.label, s.patient_id) for s in src.samples] == [
        ("a.png", 1, "101"), ("b.png", 1, "101"), ("c.png", 0, "7")]
    assert "gone.png" in caplog.text


def test_csv_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="list file does not exist"):
        CsvSource(tmp_path / "nope.csv")
    listing = tmp_path / "list.csv"
    listing.write_text("filename,label\nx.png,a\n")
    with pytest.raises(DatasetError, match=f"none of the 1 files listed in {listing}"):
        CsvSource(listing)
    with pytest.raises(DatasetError, match="no column 'patient'"):
        CsvSource(listing, patient_col="patient")


def test_dicom_source_takes_patients_from_the_tags(tmp_path):
    px = np.arange(64, dtype=np.uint16).reshape(8, 8)
    make_dicom(tmp_path / "COVID" / "1.dcm", px, patient_id="P-9")
    make_dicom(tmp_path / "COVID" / "2.dcm", px, patient_id="P-9")
    make_dicom(tmp_path / "NORMAL" / "3.dcm", px, patient_id="P-3")
    src = DicomSource(tmp_path, labelled=True)
    assert src.classes == ("COVID", "NORMAL")
    assert [(s.label, s.patient_id) for s in src.samples] == [(0, "P-9"), (0, "P-9"), (1, "P-3")]
    assert not DicomSource(tmp_path).labelled


def test_kermany_patient_ids():
    assert kermany_patient_id("x/person1001_bacteria_2932.jpeg") == "P1001"
    assert kermany_patient_id("IM-0117-0001.jpeg") == "N-117"
    assert kermany_patient_id("NORMAL2-IM-1427-0001.jpeg") == "N2-1427"
    assert kermany_patient_id("scan.png") is None


def _patients(n_patients=60, seed=0):
    """Samples with 1-4 images per patient, two classes, unbalanced."""
    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        label = int(p % 3 == 0)
        out += [Sample(f"/d/p{p}_{k}.png", label, f"p{p}") for k in range(rng.randint(1, 4))]
    return out


def test_label_fraction_is_stratified_and_reproducible():
    src = ImageFolderSource(cxr_sample() / "train")
    sub = label_fraction(src, 0.1, seed=0)
    assert sub.class_counts() == {"normal": 8, "pneumonia": 8}
    assert sub.samples == label_fraction(src, 0.1, seed=0).samples
    assert sub.samples != label_fraction(src, 0.1, seed=1).samples
    tiny = label_fraction(src, 0.01, seed=0)
    assert tiny.class_counts() == {"normal": 1, "pneumonia": 1}  # never an empty class
    assert label_fraction(src, 1.0).samples == src.samples


def test_label_fraction_never_splits_a_patient_and_ignores_input_order():
    samples = _patients()
    for fraction in (0.01, 0.1, 0.5):
        chosen, rest = split_by_patient(samples, fraction, seed=3)
        assert {s.patient_id for s in chosen}.isdisjoint({s.patient_id for s in rest})
        assert len(chosen) + len(rest) == len(samples)
        for label in (0, 1):
            n = sum(s.label == label for s in samples)
            got = sum(s.label == label for s in chosen)
            assert 1 <= got <= max(round(fraction * n), 4)  # whole patients of up to 4 images
        shuffled = samples[:]
        random.Random(1).shuffle(shuffled)
        assert set(label_fraction_subset(shuffled, fraction, seed=3)) == set(chosen)
    with pytest.raises(ValueError):
        split_by_patient(samples, 0.0)


def test_source_rejects_labels_outside_its_classes():
    with pytest.raises(DatasetError, match="label 2"):
        Source([Sample("/x.png", 2)], ("a", "b"), "/data")
    with pytest.raises(DatasetError, match="no samples"):
        Source([], (), "/data")


def test_source_from_config(tmp_path):
    root = cxr_sample()
    src = source_from_config({"kind": "imagefolder", "root": str(root / "train"), "label_fraction": 0.1, "label_seed": 2})
    assert src.class_counts() == {"normal": 8, "pneumonia": 8}
    syn = source_from_config({"kind": "synthetic", "n": 6, "size": 32, "in_memory": True, "unlabelled": True})
    assert len(syn) == 6 and not syn.labelled
    with pytest.raises(ValueError, match="unknown source kind"):
        source_from_config({"kind": "tfrecord"})


def test_pretraining_builds_any_source_kind_from_the_config(tmp_path):
    """data.source goes through source_from_config, the one way a config becomes a source (here a
    folder and the phantoms; dicom / csv / covidx take the same road); mistakes are one-line config errors."""
    from PIL import Image

    from dinocxr_fast.config import ConfigError, load_config
    from dinocxr_fast.runtime import data_setup

    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / f"img{i}.png")

    def source(*sets):
        return data_setup.pretrain_source(load_config("tiny_cpu", {}, list(sets))["data"], seed=0)

    folder = source(f"data.source={{kind: imagefolder, root: {tmp_path}}}")
    assert len(folder.samples) == 3 and not folder.labelled
    phantoms = source("data.source={kind: synthetic, n: 5, size: 32}")
    assert len(phantoms.samples) == 5 and not phantoms.labelled
    for sets, match in [((f"data.source={{kind: imagefolder, root: {tmp_path}}}", f"data.path={tmp_path}"), "both"),
                        (("data.source={kind: bogus}",), "unknown source kind"),
                        (("data.source={kind: imagefolder}",), "needs the key 'root'"),
                        (("data.source={root: /tmp}",), "must be a mapping with a kind")]:
        with pytest.raises(ConfigError, match=match):
            source(*sets)
