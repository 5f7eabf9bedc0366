"""Turn a batch spec (epoch, step, sample indices) into decoder-ready bytes + augmentation plans.

This is where unreadable files are caught. A file that cannot be read, or fails the integrity
probe, is recorded in the SkipLog (counted, named in the log once) and never read again. Its slot is
then either filled with another readable image of the same batch ("substitute", pretraining: the
batch keeps its shape, so DDP ranks stay in step and compiled graphs see one shape) or removed
("drop", evaluation: labels must stay true). Either way the epoch goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .views import EvalConfig, ViewsConfig
from .imageio import CorruptImageError, ImageInfo, load_encoded, policy
from .planning import N_PARAMS, BatchSpec, eval_roi, plan_views
from .samples import DatasetError, Source

log = logging.getLogger("dinocxr_fast.data")


class SkipLog:
    """Unreadable files seen so far: path -> reason. Each file is logged once."""

    def __init__(self, verbose: bool = True) -> None:
        self.reasons: dict[str, str] = {}
        self.verbose = verbose

    def __contains__(self, path: str) -> bool:
        return path in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, path: str, reason: str) -> bool:
        """Record a bad file; log it the first time. Returns True if the file is new."""
        if path in self.reasons:
            return False
        self.reasons[path] = reason
        if self.verbose:
            log.warning("skipping unreadable image %s: %s (%d skipped so far)", path, reason, len(self.reasons))
        return True

    def merge(self, skipped: Iterable[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.add(path, reason)


@dataclass
class PreparedBatch:
    """Everything a backend needs for one batch, in batch order."""

    spec: BatchSpec
    indices: np.ndarray  # source index of the image in each slot (after substitution / drop)
    labels: np.ndarray  # int64
    data: list  # decoder-ready encoded images (bytes), or HxW pixel arrays from a prepared dataset
    infos: list[ImageInfo]
    params: list[np.ndarray]  # views: one float32 [B, N_PARAMS] per view; eval: one float32 [B, 4]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # found while preparing this batch

    def __len__(self) -> int:
        return len(self.indices)


class BatchAssembler:
    """Reads and plans batches for one source. ``views`` xor ``eval_cfg`` selects the mode."""

    def __init__(
        self,
        source: Source,
        *,
        views: ViewsConfig | None = None,
        eval_cfg: EvalConfig | None = None,
        seed: int = 0,
        on_bad: str = "substitute",
        skip_log: SkipLog | None = None,
    ) -> None:
        if (views is None) == (eval_cfg is None):
            raise ValueError("give exactly one of views= or eval_cfg=")
        if on_bad not in ("substitute", "drop"):
            raise ValueError(f"on_bad must be 'substitute' or 'drop', got {on_bad!r}")
        self.source = source
        self.views = views
        self.eval_cfg = eval_cfg
        self.seed = seed
        self.on_bad = on_bad
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.policy = policy()  # the decode limits as built; it travels with the assembler to workers
        self._infos: dict[int, ImageInfo] = {}  # probe results, so later epochs skip the CRC walk
        # A prepared dataset hands out decoded pixels (see ``prepared``): nothing to read or probe.
        self.read_pixels = getattr(source, "read_pixels", None)

    @property
    def raw(self) -> bool:
        """True when ``PreparedBatch.data`` holds pixel arrays rather than encoded bytes."""
        return self.read_pixels is not None

    def mark_bad(self, index: int, reason: str) -> None:
        """Record a file found bad downstream (e.g. the decoder failed on it)."""
        self._infos.pop(index, None)
        self.skip_log.add(self.source[index].path, reason)

    def _load(self, index: int, found: list[tuple[str, str]]) -> tuple[bytes, ImageInfo] | None:
        if self.read_pixels is not None:
            return self.read_pixels(index)
        path = self.source[index].path
        if path in self.skip_log:
            return None
        try:
            data, info = load_encoded(path, self._infos.get(index), self.policy)
        except CorruptImageError as e:
            self.skip_log.add(path, str(e))
            found.append((path, str(e)))
            return None
        self._infos[index] = info
        return data, info

    def _first_readable_after(self, index: int, found: list[tuple[str, str]]) -> tuple[int, tuple[bytes, ImageInfo]]:
        """The next readable sample in source order (cyclic): a fill-in when a whole batch is bad."""
        n = len(self.source)
        for k in range(1, n + 1):
            j = (index + k) % n
            item = self._load(j, found)
            if item is not None:
                return j, item
        raise DatasetError(f"no readable image left in {self.source.root}: all {n} files failed")

    def prepare(self, spec: BatchSpec) -> PreparedBatch:
        found: list[tuple[str, str]] = []
        keys = [int(i) for i in spec.indices]  # planning key of each slot
        items = [self._load(i, found) for i in keys]
        good = [j for j, it in enumerate(items) if it is not None]
        slots: list[tuple[int, int, tuple[bytes, ImageInfo]]] = []  # (key, used index, item)
        for j, key in enumerate(keys):
            if items[j] is not None:
                slots.append((key, key, items[j]))
            elif self.on_bad == "substitute":
                if good:  # the next readable slot of this batch, cyclically
                    k = min(good, key=lambda g: (g - j) % len(keys))
                    slots.append((key, keys[k], items[k]))
                else:
                    used, item = self._first_readable_after(key, found)
                    slots.append((key, used, item))
        return self._plan(spec, slots, found)

    def _plan(self, spec: BatchSpec, slots: Sequence[tuple[int, int, tuple[bytes, ImageInfo]]], found) -> PreparedBatch:
        used = np.array([u for _, u, _ in slots], np.int64)
        labels = np.array([self.source[u].label for u in used], np.int64)
        data = [item[0] for _, _, item in slots]
        infos = [item[1] for _, _, item in slots]
        if self.views is not None:
            rows = [plan_views(self.seed, spec.epoch, key, info.height, info.width, self.views.views)
                    for (key, _, _), info in zip(slots, infos)]
            stacked = np.stack(rows) if rows else np.zeros((0, self.views.n_views, N_PARAMS), np.float32)
            params = [np.ascontiguousarray(stacked[:, v]) for v in range(self.views.n_views)]
        else:
            rois = [eval_roi(info.height, info.width, self.eval_cfg) for info in infos]
            params = [np.stack(rois) if rois else np.zeros((0, 4), np.float32)]
        return PreparedBatch(spec, used, labels, data, infos, params, found)
