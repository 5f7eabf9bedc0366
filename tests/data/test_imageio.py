"""Format probes, integrity checks, DICOM decoding and the PIL decoder."""
from __future__ import annotations

import numpy as np
import pytest

from data_helpers import jpeg_bytes, make_dicom, png_bytes, png_with_bad_crc
from dinocxr_fast.data.imageio import (
    CorruptImageError,
    decode_pil,
    dicom_patient_id,
    dicom_to_uint16,
    load_encoded,
    pgm_bytes,
    probe,
)

RNG = np.random.default_rng(0)
NOISE = (RNG.random((48, 64)) * 255).astype(np.uint8)  # incompressible: truncation really cuts data


def test_probe_reads_sizes_and_depths():
    assert probe(png_bytes(NOISE))[:4] == ("png", 48, 64, 8)
    assert probe(png_bytes(NOISE.astype(np.uint16) * 257))[:4] == ("png", 48, 64, 16)
    assert probe(png_bytes(np.stack([NOISE] * 3, -1)))[:3] == ("png", 48, 64)
    assert probe(jpeg_bytes(NOISE))[:3] == ("jpeg", 48, 64)
    assert probe(pgm_bytes(NOISE.astype(np.uint16)))[:4] == ("pgm", 48, 64, 16)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (png_bytes(NOISE)[:-200], "truncated PNG"),
        (png_with_bad_crc(NOISE), "CRC mismatch in chunk IDAT"),
        (jpeg_bytes(NOISE)[:-300], "truncated JPEG"),
        (bytes(RNG.integers(0, 255, 500, dtype=np.uint8)), "unrecognised image format"),
        (pgm_bytes(NOISE)[:-10], "truncated PGM"),
    ],
    ids=["empty", "truncated-png", "bad-crc", "truncated-jpeg", "garbage", "truncated-pgm"],
)
def test_probe_rejects_broken_files_with_a_reason(data, reason):
    with pytest.raises(CorruptImageError, match=reason):
        probe(data)


def test_unreadable_path_is_a_corrupt_image(tmp_path):
    with pytest.raises(CorruptImageError, match="unreadable file"):
        load_encoded(str(tmp_path / "missing.png"))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(CorruptImageError, match="unreadable file"):
        load_encoded(str(tmp_path / "dir.png"))


def test_dicom_rescale_and_full_range_window(tmp_path):
    raw = np.array([[0, 100], [200, 400]], np.uint16)
    path = make_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-1024.0, patient_id="PX")
    out = dicom_to_uint16(path.read_bytes())
    assert out.dtype == np.uint16
    # Modality values 2*raw - 1024 windowed from their min to their max onto 0..65535.
    expected = np.rint((raw.astype(float) * 2 - 1024 + 1024) / 800 * 65535)
    np.testing.assert_array_equal(out, expected)
    assert dicom_patient_id(str(path)) == "PX"


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.array([[0, 1000], [3000, 4000]], np.uint16)
    m1 = dicom_to_uint16(make_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1").read_bytes())
    m2 = dicom_to_uint16(make_dicom(tmp_path / "m2.dcm", raw).read_bytes())
    np.testing.assert_array_equal(m1, 65535 - m2)
    assert m1[0, 0] == 65535 and m1[1, 1] == 0  # low stored value = bright in MONOCHROME1


def test_dicom_goes_to_the_decoder_as_16_bit_pgm(tmp_path):
    raw = (RNG.random((20, 30)) * 4095).astype(np.uint16)
    path = make_dicom(tmp_path / "x.dcm", raw)
    data, info = load_encoded(str(path))
    assert info[:4] == ("dicom", 20, 30, 16)
    assert data.startswith(b"P5") and probe(data)[:4] == ("pgm", 20, 30, 16)
    with pytest.raises(CorruptImageError, match="unreadable DICOM"):
        dicom_to_uint16(path.read_bytes()[:400])


def test_decode_pil_keeps_16_bit_precision_and_converts_rgb():
    ramp = np.arange(1000, 1000 + 48 * 64, dtype=np.uint16).reshape(48, 64)
    im = decode_pil(png_bytes(ramp))
    assert im.mode == "F"
    np.testing.assert_allclose(np.asarray(im), ramp * (255.0 / 65535.0), rtol=1e-6)
    rgb = decode_pil(png_bytes(np.stack([NOISE] * 3, -1)))
    assert rgb.mode == "L"
    np.testing.assert_array_equal(np.asarray(rgb), NOISE)
    with pytest.raises(CorruptImageError):
        decode_pil(png_bytes(NOISE)[:-200])
