"""Helpers for the data tests: the shared real-X-ray sample, broken files, small DICOMs."""
from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

CXR_SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cxr-sample"


def cxr_sample() -> Path:
    """The real-X-ray sample (read in place): $DINOCXR_CXR_SAMPLE, else ../shared/data/cxr-sample beside
    the repository. Missing: FAIL under CI=true, else skip saying how to point at it."""
    root = Path(os.environ.get("DINOCXR_CXR_SAMPLE") or CXR_SAMPLE)  # an empty variable counts as unset
    if not (root / "train").is_dir():
        msg = (f"real X-ray sample not found at {root}; point at it with "
               "DINOCXR_CXR_SAMPLE=/path/to/cxr-sample (an ImageFolder with train/ and val/)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must provide it")
        pytest.skip(msg)
    return root


def link_tree(files: list[str], root: Path, label_of=lambda f: Path(f).parent.name) -> Path:
    """An ImageFolder under ``root`` made of symlinks to ``files`` (the data stays in place)."""
    for f in files:
        d = root / label_of(f)
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(f).name).symlink_to(f)
    return root


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def png_with_bad_stream(image: np.ndarray) -> bytes:
    """A PNG whose chunks and CRCs are all valid but whose compressed data is garbage: only a
    real decode finds it (the case the loaders' decoder-failure recovery exists for)."""
    good = png_bytes(image)
    ihdr = good[8 : 8 + 25]
    garbage = b"\x78\x9c" + bytes(range(256)) * 2
    return good[:8] + ihdr + _chunk(b"IDAT", garbage) + _chunk(b"IEND", b"")


def png_with_bad_crc(image: np.ndarray) -> bytes:
    data = bytearray(png_bytes(image))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip a byte of the compressed stream, keep the stored CRC
    return bytes(data)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    patient_id: str = "PAT-1",
) -> Path:
    """A minimal valid DICOM file (explicit VR little endian) with uint16 pixels."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = str(slope)
    ds.RescaleIntercept = str(intercept)
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def gradient_image(h: int, w: int, hi: int = 255, dtype=np.uint8) -> np.ndarray:
    """A smooth test pattern: a diagonal ramp from 0 to ``hi``."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.rint((yy / (h - 1) + xx / (w - 1)) / 2 * hi).astype(dtype)


def graph_ops(outputs) -> Counter:
    """(operator, device) of every node behind the outputs of a DALI pipeline definition, counted."""
    seen, stack = {}, [o.source for o in outputs]
    while stack:
        op = stack.pop()
        if op.id not in seen:
            seen[op.id] = (getattr(op._op, "schema_name", type(op._op).__name__), op.outputs[0].device)
            stack += [i.source for i in op.inputs]
    return Counter(seen.values())
