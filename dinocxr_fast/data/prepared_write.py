"""Writing a prepared dataset (the format is described in ``prepared``).

Every image is read with the loaders' own code (``imageio.load_encoded`` + ``decode_pil``: PNG
8/16-bit, JPEG, DICOM, ...), resized once with PIL (antialiased, the views' interpolation) so its
short side is ``short_side`` (never enlarged; the long side capped at ``max_long_side``), and
stored as uint8 (8-bit sources) or uint16 (16-bit sources and DICOM). Workers decode in parallel;
the main process writes the pixels in source order, one shard file after another.

Resume: each finished shard gets a marker file (``pixels-NNNNN.json``, its entries), written after
its pixel file is complete; a rerun with the same plan keeps those shards and redoes the rest.
``index.json`` is written last, then the markers are removed.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .imageio import CorruptImageError, decode_pil, dicom_patient_id, load_encoded
from .prepared import ALIGN, FORMAT, INDEX, VERSION, Entry, shard_name
from .samples import DatasetError
from .sources import CsvSource, ImageFolderSource

PLAN = "prepare-plan.json"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
_FILTERS = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling.BICUBIC / BILINEAR


def default_short_side(view_size: int = 224, min_scale: float = 0.4, cap: int = 1024) -> int:
    """The smallest stored short side at which a random-resized crop of ``min_scale`` of the area
    (square) still has ``view_size`` source pixels per side: view_size / sqrt(min_scale), capped."""
    return min(int(math.ceil(view_size / math.sqrt(min_scale))), cap)


@dataclass(frozen=True)
class Settings:
    short_side: int = default_short_side()
    max_long_side: int = 2048
    max_pixels: int = 64_000_000  # larger inputs are skipped as oversized (decompression bombs)
    interpolation: str = "bicubic"
    shard_images: int = 4096

    def __post_init__(self) -> None:
        if self.short_side < 1 or self.max_long_side < self.short_side:
            raise ValueError(f"need 1 <= short_side <= max_long_side, got {self.short_side}, {self.max_long_side}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {self.interpolation!r}")
        if self.shard_images < 1 or self.max_pixels < 1:
            raise ValueError("shard_images and max_pixels must be positive")


def stored_size(height: int, width: int, s: Settings) -> tuple[int, int]:
    """(height, width) after the one resize: short side to s.short_side at most, long side capped."""
    scale = min(1.0, s.short_side / min(height, width), s.max_long_side / max(height, width))
    if scale >= 1.0:
        return height, width
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


# ----------------------------------------------------------------------------- listing the source


@dataclass(frozen=True)
class Item:
    path: str
    label: int
    patient_id: str | None
    split: str | None


def list_source(source: str | os.PathLike, *, labelled: bool | None = None, image_root: str | None = None,
                path_col: str = "filename", label_col: str | None = "label",
                patient_col: str | None = "auto") -> tuple[list[str], list[Item]]:
    """(class names, items) of a source: a CSV/TXT list, a root with split folders (train/, val/,
    test/) of class folders, an ImageFolder of class folders, or a folder of images (unlabelled;
    also ``labelled=False``). DICOM files are found by extension like any image."""
    path = Path(source).expanduser()
    if path.is_file():
        src = CsvSource(path, image_root, path_col=path_col, label_col=label_col, patient_col=patient_col)
        return list(src.classes), [Item(s.path, s.label, s.patient_id, None) for s in src.samples]
    if not path.is_dir():
        raise DatasetError(f"source {path} is neither a folder nor a list file")
    subdirs = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    splits = [d for d in subdirs if d in SPLIT_NAMES]
    if splits and labelled is not False:
        parts = {sp: ImageFolderSource(path / sp) for sp in splits}
        classes = sorted({c for src in parts.values() for c in src.classes})
        items = [Item(s.path, classes.index(src.classes[s.label]), s.patient_id, sp)
                 for sp, src in parts.items() for s in src.samples]
        return classes, items
    if labelled is False or not subdirs:
        src = ImageFolderSource(path, labelled=False)
        return [], [Item(s.path, s.label, s.patient_id, None) for s in src.samples]
    src = ImageFolderSource(path)
    return list(src.classes), [Item(s.path, s.label, s.patient_id, None) for s in src.samples]


# ----------------------------------------------------------------------------- one image (in a worker)


def process_image(path: str, s: Settings) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(stored pixels, facts) or (None, {"reason": ...}) for an input that cannot be used."""
    try:
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        data, info = load_encoded(path)
        if info.height * info.width > s.max_pixels:
            return None, {"reason": f"oversized: {info.width}x{info.height} = {info.height * info.width} pixels "
                                    f"> max_pixels {s.max_pixels}"}
        image = decode_pil(data)
    except OSError as e:
        return None, {"reason": f"unreadable file ({e.strerror or e})"}
    except CorruptImageError as e:
        return None, {"reason": str(e)}
    height, width = image.height, image.width
    new_h, new_w = stored_size(height, width, s)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), _FILTERS[s.interpolation])
    if image.mode == "L":
        pixels = np.asarray(image, dtype=np.uint8)
    else:  # 'F' on the 0..255 scale: a 16-bit source
        pixels = np.clip(np.rint(np.asarray(image, np.float32) * np.float32(65535.0 / 255.0)), 0, 65535).astype(np.uint16)
    facts = {"sha256": sha, "source_height": height, "source_width": width}
    if path.lower().endswith((".dcm", ".dicom")):
        facts["patient_id"] = dicom_patient_id(path)
    return np.ascontiguousarray(pixels), facts


def _work(task: tuple[int, str, Settings]):
    index, path, settings = task
    return index, *process_image(path, settings)


def _pool_context():
    """Forked workers, unless DALI's native threads live in this process (a forked child of it
    can deadlock): then a fork server."""
    return multiprocessing.get_context("forkserver" if "nvidia.dali" in sys.modules else "fork")


# ----------------------------------------------------------------------------- the whole dataset


@dataclass
class PrepareResult:
    root: Path
    images: int
    skipped: int
    bytes: int
    seconds: float
    processed: int  # images decoded by this call (0 when everything was already there)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def _write_json(path: Path, obj: Any) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _marker(out: Path, shard: int) -> Path:
    return out / shard_name(shard).replace(".bin", ".json")


def _finished_shard(out: Path, shard: int) -> dict | None:
    """The marker of a complete shard whose pixel file has the recorded size, else None."""
    marker, pixels = _marker(out, shard), out / shard_name(shard)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return done if pixels.is_file() and pixels.stat().st_size == done["bytes"] else None


class _ShardWriter:
    """Appends images to one shard's pixel file; ``finish`` renames it and writes the marker."""

    def __init__(self, out: Path, shard: int) -> None:
        self.out, self.shard = out, shard
        self.partial = out / (shard_name(shard) + ".partial")
        self.f = open(self.partial, "wb")
        self.offset = 0
        self.entries: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, item: Item, pixels: np.ndarray | None, facts: dict) -> None:
        if pixels is None:
            self.skipped.append({"path": item.path, "reason": facts["reason"]})
            return
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        raw = pixels.tobytes()
        self.f.write(raw)
        self.entries.append(Entry(
            shard=self.shard, offset=self.offset, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
            dtype=str(pixels.dtype), crc32=zlib.crc32(raw), path=item.path, label=item.label,
            patient_id=facts.get("patient_id") or item.patient_id, split=item.split, sha256=facts["sha256"],
            source_height=facts["source_height"], source_width=facts["source_width"],
        ).to_json())
        self.offset += len(raw)

    def finish(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial, self.out / shard_name(self.shard))
        done = {"shard": self.shard, "bytes": self.offset, "entries": self.entries, "skipped": self.skipped}
        _write_json(_marker(self.out, self.shard), done)
        return done


def prepare(source: str | os.PathLike, out: str | os.PathLike, settings: Settings = Settings(), *,
            workers: int = 1, progress: bool = True, overwrite: bool = False, **list_kw: Any) -> PrepareResult:
    """Prepare ``source`` into the folder ``out`` (see the module docstring); resumes an
    interrupted run of the same plan. ``list_kw`` go to ``list_source``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    classes, items = list_source(source, **list_kw)
    plan = {"format": FORMAT, "version": VERSION, "source": str(Path(source).expanduser().resolve()),
            "settings": asdict(settings), "classes": classes,
            "items": hashlib.sha256(json.dumps([list(asdict(i).values()) for i in items]).encode()).hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_plan(out)
    if existing is not None and (existing != plan or overwrite):
        if existing != plan and not overwrite:
            raise DatasetError(f"{out} holds another prepared dataset (different source, files or settings); "
                               "choose another folder or pass --overwrite")
        _clear(out)
    elif existing is not None and (out / INDEX).exists():  # already complete: nothing to do
        index = json.loads((out / INDEX).read_text())
        return PrepareResult(out, len(index["entries"]), len(index["skipped"]),
                             sum(s["bytes"] for s in index["shards"]), time.perf_counter() - t0, 0)
    _write_json(out / PLAN, plan)

    n_shards = max(1, -(-len(items) // settings.shard_images))
    bounds = [(k * settings.shard_images, min(len(items), (k + 1) * settings.shard_images)) for k in range(n_shards)]
    done = {k: d for k in range(n_shards) if (d := _finished_shard(out, k)) is not None}
    todo = [k for k in range(n_shards) if k not in done]
    tasks = [(i, items[i].path, settings) for k in todo for i in range(*bounds[k])]
    bar = tqdm(total=len(items), initial=len(items) - len(tasks), unit="img", desc=f"prepare {out.name}",
               disable=not progress, smoothing=0.1)
    pool = _pool_context().Pool(workers) if workers > 1 and len(tasks) > 1 else None
    results = pool.imap(_work, tasks, chunksize=8) if pool else map(_work, tasks)
    try:
        for k in todo:
            writer = _ShardWriter(out, k)
            for i in range(*bounds[k]):
                index, pixels, facts = next(results)
                assert index == i  # imap keeps the order
                writer.add(items[i], pixels, facts)
                bar.update(1)
            done[k] = writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    entries = [e for k in range(n_shards) for e in done[k]["entries"]]
    skipped = [s for k in range(n_shards) for s in done[k]["skipped"]]
    shards = [{"shard": k, "bytes": done[k]["bytes"]} for k in range(n_shards)]
    _write_json(out / INDEX, {"format": FORMAT, "version": VERSION, "plan": plan, "classes": classes,
                              "shards": shards, "entries": entries, "skipped": skipped})
    for k in range(n_shards):
        _marker(out, k).unlink(missing_ok=True)
    (out / PLAN).unlink(missing_ok=True)
    return PrepareResult(out, len(entries), len(skipped), sum(s["bytes"] for s in shards), time.perf_counter() - t0,
                         len(tasks))


def _existing_plan(out: Path) -> dict | None:
    """The plan of what ``out`` holds: a finished dataset's, or an interrupted run's."""
    for name, key in ((INDEX, "plan"), (PLAN, None)):
        try:
            obj = json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise DatasetError(f"{out / name} is unreadable ({e}); pass --overwrite to start again") from None
        return obj.get(key) if key else obj
    return None


def _clear(out: Path) -> None:
    """Remove what an earlier prepare wrote in ``out`` (only its own files)."""
    for p in out.iterdir():
        if p.name in (INDEX, PLAN) or (p.name.startswith("pixels-") and p.suffix in (".bin", ".json", ".partial", ".tmp")):
            p.unlink()


def describe(skipped: Sequence[dict]) -> str:
    """One line per skipped input, for the command's output."""
    return "\n".join(f"  skipped {s['path']}: {s['reason']}" for s in skipped)


__all__ = ["Item", "PrepareResult", "Settings", "default_short_side", "describe", "list_source", "prepare",
           "process_image", "stored_size"]
