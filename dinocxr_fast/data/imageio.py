"""Reading image files: format sniffing, cheap integrity checks, DICOM, and a PIL decoder.

Both loaders (DALI and torch) go through ``load_encoded``: it returns bytes that an image decoder
accepts plus the image size, or raises ``CorruptImageError`` with a reason. The size is needed in
Python because the augmentation parameters (random-resized-crop boxes) are drawn here, not in the
decoder, so both backends apply identical crops.

Decompression bombs never reach a decoder: the pixel count is read from the header (PNG IHDR,
JPEG frame header, PGM header, PIL's header parse, DICOM Rows x Columns x frames) and checked
against one limit (``DecodePolicy.max_pixels``, config key ``data.max_image_pixels``) before any
pixel is decoded, on every path (DALI on the CPU or the GPU and PIL both take the bytes
``load_encoded`` returns). DICOM files that are not radiographs are refused unless
``data.dicom_any_modality`` says otherwise.

DICOM pixel data is decoded here (pydicom: modality rescale, MONOCHROME1 inversion, window to the
full 16-bit range) and handed to the decoder as a 16-bit binary PGM: a 15-byte header in front of
the raw big-endian uint16 samples. That keeps one decoder input for every format, so the DALI graph
has no conditional branch; DALI's decoder reads 16-bit PGM and PNG at full precision.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from typing import NamedTuple

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class CorruptImageError(Exception):
    """The bytes are not a decodable image; the message says why."""


class DecodePolicy(NamedTuple):
    """What a decode may cost and accept; one default for every decode path."""

    max_pixels: int = 50_000_000  # a 7000 x 7000 radiograph; a 30000 x 30000 bomb is 18 times more
    dicom_any_modality: bool = False


_policy = DecodePolicy()


def set_policy(max_pixels: int | None = None, dicom_any_modality: bool | None = None) -> DecodePolicy:
    """Set the process-wide default (loaders capture it when they are built, workers included)."""
    global _policy
    _policy = DecodePolicy(_policy.max_pixels if max_pixels is None else int(max_pixels),
                           _policy.dicom_any_modality if dicom_any_modality is None else bool(dicom_any_modality))
    return _policy


def policy() -> DecodePolicy:
    return _policy


def policy_from_config(data_cfg) -> DecodePolicy:
    """The config's data.max_image_pixels and data.dicom_any_modality made the default."""
    default = DecodePolicy()
    return set_policy(data_cfg.get("max_image_pixels", default.max_pixels),
                      data_cfg.get("dicom_any_modality", default.dicom_any_modality))


def check_size(height: int, width: int, limit: int, frames: int = 1) -> None:
    pixels = int(height) * int(width) * max(int(frames), 1)
    if pixels > limit:
        where = f"{frames} frames of " if frames > 1 else ""
        raise CorruptImageError(f"image too large: {where}{width} x {height} = {pixels:,} pixels is over the limit of "
                                f"{limit:,} (data.max_image_pixels); not decoded")


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def describe(exc: BaseException) -> str:
    """An exception as a message about the file's content: library messages name the in-memory
    buffer (``<_io.BytesIO object at 0x...>``), which tells a user nothing."""
    text = _BUFFER_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageInfo(NamedTuple):
    fmt: str  # "png", "jpeg", "pgm", "dicom", or a PIL format name in lower case
    height: int
    width: int
    bit_depth: int = 8


# ----------------------------------------------------------------------------- format probes


def _probe_png(data: bytes, check_crc: bool) -> ImageInfo:
    """Walk the chunk list: sizes must fit, CRCs must match, IHDR first, IDAT present, IEND last."""
    pos, n = 8, len(data)
    info = None
    seen_idat = False
    while True:
        if pos + 8 > n:
            raise CorruptImageError("truncated PNG (file ends inside the chunk list, no IEND)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            raise CorruptImageError(f"truncated PNG (chunk {ctype.decode('latin-1')} runs past the end of the file)")
        if check_crc:
            crc = struct.unpack(">I", data[end - 4 : end])[0]
            if zlib.crc32(data[pos + 4 : end - 4]) & 0xFFFFFFFF != crc:
                raise CorruptImageError(f"corrupt PNG (CRC mismatch in chunk {ctype.decode('latin-1')})")
        if info is None:
            if ctype != b"IHDR" or length != 13:
                raise CorruptImageError("corrupt PNG (first chunk is not IHDR)")
            width, height, depth = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            if width == 0 or height == 0:
                raise CorruptImageError("corrupt PNG (zero width or height)")
            info = ImageInfo("png", height, width, depth)
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            if not seen_idat:
                raise CorruptImageError("corrupt PNG (no image data)")
            return info
        pos = end


# JPEG start-of-frame markers (baseline, progressive, lossless...), not DHT/JPG/DAC.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _probe_jpeg(data: bytes) -> ImageInfo:
    """Find the frame header for the size, and require the end-of-image marker."""
    pos, n = 2, len(data)
    info = None
    while pos + 4 <= n and info is None:
        if data[pos] != 0xFF:
            raise CorruptImageError("corrupt JPEG (bad marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                break
            depth, height, width = struct.unpack(">BHH", data[pos + 4 : pos + 9])
            info = ImageInfo("jpeg", height, width, depth)
        pos += 2 + length
    if info is None:
        raise CorruptImageError("truncated JPEG (no frame header)")
    if info.height == 0 or info.width == 0:
        raise CorruptImageError("corrupt JPEG (zero width or height)")
    # Encoders may pad after EOI; look for it near the end instead of at the last two bytes.
    if data.rfind(b"\xff\xd9", max(0, n - 1024)) < 0:
        raise CorruptImageError("truncated JPEG (no end-of-image marker)")
    return info


def _probe_pgm(data: bytes) -> ImageInfo:
    fields, pos = _pnm_header(data)
    width, height, maxval = fields
    depth = 16 if maxval > 255 else 8
    if len(data) - pos < width * height * (depth // 8):
        raise CorruptImageError("truncated PGM")
    return ImageInfo("pgm", height, width, depth)


def _pnm_header(data: bytes) -> tuple[list[int], int]:
    """Parse 'P5 <w> <h> <maxval>' (with comments); return the fields and the pixel offset."""
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1
            if pos == 0:
                raise CorruptImageError("truncated PGM header")
            continue
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise CorruptImageError("corrupt PGM header")
        fields.append(int(data[start:pos]))
    return fields, pos + 1  # exactly one whitespace byte before the pixels


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _probe_other(data: bytes) -> ImageInfo:
    """Formats without a hand-written probe (BMP, TIFF, WebP): PIL reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = (im.format or "unknown").lower()
            depth = 16 if im.mode in ("I;16", "I;16B", "I") else 8
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"unrecognised image format ({describe(e)})") from None
    return ImageInfo(fmt, height, width, depth)


def probe(data: bytes, check_crc: bool = True) -> ImageInfo:
    """Identify the format and size of encoded image bytes; raise CorruptImageError if broken."""
    if not data:
        raise CorruptImageError("empty file")
    if data.startswith(PNG_SIGNATURE):
        return _probe_png(data, check_crc)
    if data.startswith(b"\xff\xd8"):
        return _probe_jpeg(data)
    if data.startswith(b"P5"):
        return _probe_pgm(data)
    return _probe_other(data)


# ----------------------------------------------------------------------------- DICOM


# Modalities of a projection radiograph; anything else (CT, MR, PT, US, RT*, waveforms, reports,
# secondary captures) is refused by default.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_WAVEFORM = "1.2.840.10008.5.1.4.1.1.9."


def _not_a_radiograph(ds) -> str | None:
    """Why ``ds`` is not a plain radiograph (Modality, SOP class and pixel attributes), or None."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    sop = str(getattr(ds, "SOPClassUID", "") or "")
    if "WaveformSequence" in ds or sop.startswith(_WAVEFORM):
        return f"a waveform (Modality {modality or 'not set'}), not an image"
    if sop.startswith(_SECONDARY_CAPTURE):
        return f"a secondary capture (Modality {modality or 'not set'}), not an acquired radiograph"
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"Modality {modality}, not a radiograph ({', '.join(RADIOGRAPH_MODALITIES)})"
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        return f"a colour image ({photometric}), not a radiograph"
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return f"{ds.NumberOfFrames} frames (a volume or a cine), not a single radiograph"
    return None


def _transfer_syntax_mismatch(data: bytes, declared) -> str | None:
    """The encoding the data set really has when it is not the declared one (None: no better guess)."""
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - no file meta to start from
        return None
    start = fp.tell()
    for uid, implicit, little in ((ExplicitVRLittleEndian, False, True), (ImplicitVRLittleEndian, True, True),
                                  (ExplicitVRBigEndian, False, False)):
        if uid == declared:
            continue
        fp.seek(start)
        try:
            ds = read_dataset(fp, implicit, little)
            if "PixelData" in ds and int(ds.Rows) > 0:
                return uid.name
        except Exception:  # noqa: BLE001, S112 - try the next encoding
            continue
    return None


def _transfer_syntax(ds):
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return UID(str(uid)) if uid else None


def _ts_name(uid) -> str:
    return f"{uid.name} ({uid})" if uid is not None and uid.name != str(uid) else f"{uid or 'not declared'}"


def dicom_to_uint16(data: bytes, policy: DecodePolicy | None = None) -> np.ndarray:
    """Decode a DICOM file to a 2-D uint16 image, bright = dense (X-ray convention).

    Checks first, from the header: a radiograph (unless ``policy.dicom_any_modality``), within
    ``policy.max_pixels``, pixel data present and in the declared transfer syntax. Then applies
    the modality LUT (RescaleSlope/RescaleIntercept), inverts MONOCHROME1 (where low values are
    bright), and windows linearly from the image minimum to its maximum onto the full uint16 range.
    """
    import pydicom

    policy = policy or _policy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what the checks below report
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as e:  # pydicom raises many types for broken files
            raise CorruptImageError(f"unreadable DICOM ({describe(e)})") from None
        if not policy.dicom_any_modality:
            why = _not_a_radiograph(ds)
            if why:
                raise CorruptImageError(f"DICOM is {why}; set data.dicom_any_modality=true to accept it")
        ts = _transfer_syntax(ds)
        if "PixelData" not in ds:
            real = _transfer_syntax_mismatch(data, ts)
            if real:
                raise CorruptImageError(f"wrong DICOM transfer syntax: declared {_ts_name(ts)}, but the data set is "
                                        f"encoded as {real}")
            raise CorruptImageError(f"unreadable DICOM: no pixel data in transfer syntax {_ts_name(ts)} "
                                    "(the file is cut short or holds no image)")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise CorruptImageError("DICOM header lacks Rows/Columns") from None
        check_size(rows, cols, policy.max_pixels, int(getattr(ds, "NumberOfFrames", 1) or 1))
        try:
            pixels = ds.pixel_array
        except Exception as e:  # noqa: BLE001
            expected = rows * cols * int(getattr(ds, "BitsAllocated", 16) or 16) // 8 * \
                int(getattr(ds, "SamplesPerPixel", 1) or 1) * int(getattr(ds, "NumberOfFrames", 1) or 1)
            if ts is not None and ts.is_compressed and len(ds.PixelData) == expected:
                raise CorruptImageError(f"wrong DICOM transfer syntax: declared {_ts_name(ts)} (compressed), but the "
                                        "pixel data has the size of uncompressed pixels") from None
            raise CorruptImageError(f"cannot decode DICOM pixel data in transfer syntax {_ts_name(ts)} "
                                    f"({describe(e)})") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if pixels.ndim == 3:  # colour DICOM (accepted with dicom_any_modality): luma
        pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if pixels.ndim != 2 or pixels.size == 0:
        raise CorruptImageError(f"DICOM pixel data has shape {pixels.shape}, expected a 2-D image")
    x = pixels.astype(np.float64)
    x = x * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        x = -x
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        x = (x - lo) * (65535.0 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.rint(x).astype(np.uint16)


def dicom_patient_id(path: str) -> str | None:
    """PatientID from a DICOM header without reading the pixel data."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
    except Exception:
        return None
    pid = str(getattr(ds, "PatientID", "") or "").strip()
    return pid or None


def pgm_bytes(image: np.ndarray) -> bytes:
    """Wrap a 2-D uint8 or uint16 array as binary PGM (P5), the decoder's raw-pixel container."""
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    h, w = image.shape
    if image.dtype == np.uint16:
        return b"P5\n%d %d\n65535\n" % (w, h) + image.astype(">u2", copy=False).tobytes()
    if image.dtype == np.uint8:
        return b"P5\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(image).tobytes()
    raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")


# ----------------------------------------------------------------------------- entry points


def load_encoded(path: str, known: ImageInfo | None = None,
                 policy: DecodePolicy | None = None) -> tuple[bytes, ImageInfo]:
    """Read one sample and return (decoder-ready bytes, info); raise CorruptImageError.

    ``known`` is the info from an earlier successful probe of the same file; passing it skips the
    CRC walk (the bytes are still read). Phantom URIs are rendered in memory. ``policy`` (default:
    the process-wide one) bounds the pixel count, checked from the header before decoding.
    """
    policy = policy or _policy
    if path.startswith("phantom://"):
        from .synthetic import render_uri

        image = render_uri(path)
        return pgm_bytes(image), ImageInfo("pgm", image.shape[0], image.shape[1], 8)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImageError(f"unreadable file ({e.strerror or e})") from None
    if known is not None and known.fmt != "dicom":
        return data, known
    if is_dicom(data) or (path.lower().endswith((".dcm", ".dicom")) and not data.startswith(PNG_SIGNATURE)):
        image = dicom_to_uint16(data, policy)
        return pgm_bytes(image), ImageInfo("dicom", image.shape[0], image.shape[1], 16)
    info = probe(data)
    check_size(info.height, info.width, policy.max_pixels)
    return data, info


def decode_pil(data: bytes, policy: DecodePolicy | None = None):
    """Decode bytes from ``load_encoded`` to a PIL image: mode 'L' (8-bit) or 'F' (0..255 scale).

    16-bit inputs become float images so no precision is lost before resampling; colour images
    are converted to luma like DALI's GRAY output. Raises CorruptImageError.
    """
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        check_size(im.height, im.width, (policy or _policy).max_pixels)  # from the header, before im.load()
        im.load()
    except CorruptImageError:
        raise
    except Exception as e:
        raise CorruptImageError(f"undecodable image ({describe(e)})") from None
    if im.mode == "L":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32) * np.float32(255.0 / 65535.0)
        return Image.fromarray(arr)  # float32 -> mode "F"
    return im.convert("L")
