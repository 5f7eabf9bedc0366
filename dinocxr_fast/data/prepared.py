"""Reading a prepared dataset: images decoded and resized once, stored as raw pixels to memory-map.

Layout of a prepared dataset folder (written by ``python -m dinocxr_fast.prepare``)::

    index.json            format version, settings, classes, shard list, one entry per image,
                          the inputs skipped with their reason (written last: its presence marks
                          a complete dataset, and is how loaders detect a prepared --data folder)
    pixels-00000.bin ...  the pixels of each image, row-major, back to back (uint8 or uint16),
                          each image at a 16-byte aligned offset

Why a plain numpy memmap and a JSON index, not safetensors / WebDataset / LitData: the loaders
read random images in a seeded order that is a pure function of (seed, epoch, index) (exact
resume, identical views on every backend), so the store must give O(1) random access to one
image without decoding anything. A memmap gives exactly that, zero-copy, with the page cache
shared by every rank and DataLoader worker on a node. WebDataset and LitData are sequential or
chunk-streaming formats with their own shuffling (they would replace the planner and the exact
resume); safetensors holds named tensors of one file with a JSON header, which would work but
needs one tensor per image (a header of 100k names) or a padded batch, and gives nothing a raw
file does not. Entries carry a CRC32 of their pixels for ``--verify`` and the SHA-256 of their
source file for provenance.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .imageio import ImageInfo
from .samples import UNLABELLED, DatasetError, Sample, Source

FORMAT = "dinocxr_fast.prepared"
VERSION = 1
INDEX = "index.json"
ALIGN = 16  # every image starts at a multiple of this many bytes (uint16 views need 2)


def shard_name(shard: int) -> str:
    return f"pixels-{shard:05d}.bin"


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a prepared dataset (its index file)."""
    return (Path(path).expanduser() / INDEX).is_file()


@dataclass(frozen=True)
class Entry:
    """One stored image: where its pixels are and what it was."""

    shard: int
    offset: int  # bytes into the shard file
    height: int
    width: int
    dtype: str  # "uint8" or "uint16"
    crc32: int  # of the stored pixel bytes
    path: str  # the source file, as the source listed it
    label: int
    patient_id: str | None
    split: str | None  # the source's split folder (train, val, test) when it had them
    sha256: str  # of the source file's bytes
    source_height: int
    source_width: int

    @property
    def nbytes(self) -> int:
        return self.height * self.width * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pixels_to_pil(pixels: np.ndarray):
    """A stored image as the PIL image ``imageio.decode_pil`` would give for its source:
    'L' for 8-bit, 'F' on the 0..255 scale for 16-bit."""
    from PIL import Image

    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels, "L")
    return Image.fromarray(pixels.astype(np.float32) * np.float32(255.0 / 65535.0), "F")


def pixels_to_u16(pixels: np.ndarray) -> np.ndarray:
    """HxW stored pixels -> HxWx1 uint16, 8-bit values scaled by 257 (what the DALI decoder gives)."""
    if pixels.dtype == np.uint8:
        return (pixels.astype(np.uint16) * np.uint16(257))[..., None]
    return np.ascontiguousarray(pixels)[..., None]


class PreparedDataset:
    """A prepared dataset folder opened for reading; the pixel files are mapped lazily per process
    (the object pickles without them, so DataLoader workers map their own)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise DatasetError(f"{self.root} is not a prepared dataset (no {INDEX}; run python -m dinocxr_fast.prepare)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{index_path} is unreadable: {e}") from None
        if index.get("format") != FORMAT:
            raise DatasetError(f"{index_path} is not a {FORMAT} index (format: {index.get('format')!r})")
        if index.get("version") != VERSION:
            raise DatasetError(f"{index_path} has format version {index.get('version')}, this code reads {VERSION}: prepare it again")
        self.index = index
        self.classes: tuple[str, ...] = tuple(index["classes"])
        self.entries: list[Entry] = [Entry(**e) for e in index["entries"]]
        self.skipped: list[dict[str, str]] = list(index.get("skipped", []))
        self.shards: list[dict[str, Any]] = list(index["shards"])
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def splits(self) -> list[str]:
        return sorted({e.split for e in self.entries if e.split is not None})

    def _map(self, shard: int) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            path = self.root / shard_name(shard)
            if not path.is_file():
                raise DatasetError(f"{path} is missing from the prepared dataset")
            m = self._maps[shard] = np.memmap(path, np.uint8, mode="r")
        return m

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only HxW array backed by the memory map (no copy)."""
        e = self.entries[i]
        raw = self._map(e.shard)[e.offset : e.offset + e.nbytes]
        return raw.view(e.dtype).reshape(e.height, e.width)

    def source(self, split: str | None = None, *, classes: Sequence[str] | None = None,
               labelled: bool | None = None) -> "PreparedSource":
        """The images (of one split) as a Source for the loaders. ``classes`` re-indexes the labels
        by name (a classifier's class order); ``labelled=False`` drops them."""
        ids = [i for i, e in enumerate(self.entries) if split is None or e.split == split]
        if not ids:
            have = ", ".join(self.splits) or "none"
            raise DatasetError(f"{self.root}: no images in split {split!r} (splits: {have})")
        names, remap = tuple(self.classes), None
        if classes is not None and labelled is not False:
            used = {self.classes[self.entries[i].label] for i in ids if self.entries[i].label != UNLABELLED}
            unknown = sorted(used - set(classes))
            if unknown:
                raise DatasetError(f"{self.root}: labels {unknown} are not among classes {list(classes)}")
            names, remap = tuple(classes), {c: k for k, c in enumerate(classes)}
        samples = []
        for i in ids:
            e = self.entries[i]
            label = e.label
            if labelled is False:
                label = UNLABELLED
            elif remap is not None and label != UNLABELLED:
                label = remap[self.classes[label]]
            samples.append(Sample(e.path, label, e.patient_id))
        root = str(self.root / split) if split else str(self.root)
        source = PreparedSource(self, samples, () if labelled is False else names, root, ids)
        if labelled and not source.labelled:
            raise DatasetError(f"{root}: the prepared images have no labels (prepare a labelled source)")
        return source

    def node_subset(self, node: int, num_nodes: int) -> list[int]:
        """Entry ids stored in the shard files of one node (files node, node + N, ...): what a node
        needs locally when a multi-node job shards by node (``PreparedSource.for_node``)."""
        if not 0 <= node < num_nodes:
            raise ValueError(f"node must be in [0, {num_nodes}), got {node}")
        return [i for i, e in enumerate(self.entries) if e.shard % num_nodes == node]


class PreparedSource(Source):
    """A Source whose images come from a prepared dataset: ``read_pixels`` instead of a file.

    Sample paths are the original source paths (reports and skip logs name them); subsets keep
    the link to the stored pixels.
    """

    def __init__(self, dataset: PreparedDataset, samples: Iterable[Sample], classes: Sequence[str], root: str,
                 entry_ids: Sequence[int]) -> None:
        super().__init__(samples, classes, root)
        self.dataset = dataset
        self.entry_ids = list(entry_ids)
        if len(self.entry_ids) != len(self.samples):
            raise ValueError("one entry id per sample is needed")
        self._by_path = {s.path: k for s, k in zip(self.samples, self.entry_ids)}

    @property
    def pixel_dtype(self) -> str:
        """"uint8" when every image of this source is stored with 8 bits, else "uint16"."""
        if all(self.dataset.entries[k].dtype == "uint8" for k in self.entry_ids):
            return "uint8"
        return "uint16"

    def read_pixels(self, index: int) -> tuple[np.ndarray, ImageInfo]:
        e = self.dataset.entries[self.entry_ids[index]]
        bits = 16 if e.dtype == "uint16" else 8
        return self.dataset.pixels(self.entry_ids[index]), ImageInfo("prepared", e.height, e.width, bits)

    def with_samples(self, samples: Iterable[Sample]) -> "PreparedSource":
        samples = list(samples)
        try:
            ids = [self._by_path[s.path] for s in samples]
        except KeyError as e:
            raise DatasetError(f"{e.args[0]} is not in the prepared dataset {self.dataset.root}") from None
        return PreparedSource(self.dataset, samples, self.classes, self.root, ids)

    def unlabelled(self) -> "PreparedSource":
        samples = [Sample(s.path, UNLABELLED, s.patient_id) for s in self.samples]
        return PreparedSource(self.dataset, samples, (), self.root, self.entry_ids)

    def for_node(self, node: int, num_nodes: int) -> "PreparedSource":
        """The samples stored in this node's shard files: with one node per file group, a node
        reads (and needs a local copy of) only its files. Ranks of the node then shard this
        subset among themselves (loader shard_id = local rank)."""
        mine = set(self.dataset.node_subset(node, num_nodes))
        keep = [(s, k) for s, k in zip(self.samples, self.entry_ids) if k in mine]
        if not keep:
            raise DatasetError(f"{self.dataset.root}: node {node} of {num_nodes} has no shard file "
                               f"({len(self.dataset.shards)} files; prepare with a smaller --shard-images)")
        return PreparedSource(self.dataset, [s for s, _ in keep], self.classes, self.root, [k for _, k in keep])


def verify(root: str | os.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems found in a prepared dataset (empty: it is sound): index format, every shard file
    present with its recorded size, every entry inside its file, non-overlapping, of a known dtype,
    and (``checksums``) with the CRC32 of its pixels."""
    try:
        ds = PreparedDataset(root)
    except DatasetError as e:
        return [str(e)]
    problems = []
    sizes = {}
    for s in ds.shards:
        path = ds.root / shard_name(int(s["shard"]))
        if not path.is_file():
            problems.append(f"{path.name}: missing")
            continue
        sizes[int(s["shard"])] = path.stat().st_size
        if path.stat().st_size != int(s["bytes"]):
            problems.append(f"{path.name}: {path.stat().st_size} bytes, the index says {s['bytes']}")
    listed = {int(s["shard"]) for s in ds.shards}
    ends: dict[int, int] = {}
    for i, e in enumerate(ds.entries):
        where = f"entry {i} ({e.path})"
        if e.dtype not in ("uint8", "uint16") or e.height < 1 or e.width < 1:
            problems.append(f"{where}: bad shape/dtype {e.height}x{e.width} {e.dtype}")
            continue
        if e.shard not in sizes:  # a missing file is reported above; an unknown one here
            if e.shard not in listed:
                problems.append(f"{where}: shard {e.shard} is not in the index's shard list")
            continue
        if e.offset % ALIGN or e.offset < ends.get(e.shard, 0) or e.offset + e.nbytes > sizes[e.shard]:
            problems.append(f"{where}: pixels at {e.offset}+{e.nbytes} overlap or fall outside {shard_name(e.shard)}")
            continue
        ends[e.shard] = e.offset + e.nbytes
        if checksums and zlib.crc32(ds.pixels(i).tobytes()) != e.crc32:
            problems.append(f"{where}: pixel checksum mismatch (the shard file was modified or damaged)")
    return problems
