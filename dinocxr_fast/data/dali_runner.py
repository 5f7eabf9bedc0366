"""Runs a DALI graph over a stream of batch specs and hands back torch tensors.

The pipeline is fed by ``_Feed``, an external_source callback that prepares batches in spec order
(read, probe, plan: ``BatchAssembler``). DALI prefetches, so the feed runs a batch or two ahead and
may already be in the next epoch when an epoch ends; the runner remembers which spec it will
deliver next and keeps the pipeline across epochs when the caller continues from there. Anything
else (a jump to another epoch or step, an abandoned iteration) rebuilds the pipeline at that spec.

A file that passes the probe but still makes the DALI decoder fail kills the pipeline run; the
runner then decodes each not-yet-delivered image alone to find the culprit(s), records them as
skipped, rebuilds the pipeline at the first undelivered batch and carries on.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterator

import numpy as np
import torch

from .assemble import BatchAssembler, PreparedBatch
from .views import EvalConfig, ViewsConfig
from .dali_graph import build_decode_check, build_pipeline
from .imageio import pgm_bytes
from .prepared import pixels_to_u16
from .planning import BRIGHTNESS, CONTRAST, N_PARAMS, SIGMA, WINDOW, X1, Y1, BatchSpec

log = logging.getLogger("dinocxr_fast.data")

# Fed in place of a batch whose every image was dropped: DALI cannot run an empty batch.
_PLACEHOLDER = np.frombuffer(pgm_bytes(np.zeros((1, 1), np.uint8)), np.uint8)


class _Peekable:
    def __init__(self, it: Iterator[BatchSpec]) -> None:
        self._it = it
        self._head: list[BatchSpec] = []

    def peek(self) -> BatchSpec:
        if not self._head:
            self._head.append(next(self._it))
        return self._head[0]

    def __next__(self) -> BatchSpec:
        return self._head.pop() if self._head else next(self._it)


class _Feed:
    """The external_source callback: prepares the next spec, remembers it until delivered."""

    def __init__(self, assembler: BatchAssembler, stream: Iterator[BatchSpec], n_params: int) -> None:
        self.assembler = assembler
        self.stream = _Peekable(stream)
        self.pending: collections.deque[PreparedBatch] = collections.deque()
        self.n_params = n_params
        self.raw = _raw_dtype(assembler)

    def next_key(self) -> tuple[int, int]:
        spec = self.pending[0].spec if self.pending else self.stream.peek()
        return spec.epoch, spec.step

    def __call__(self):
        pb = self.assembler.prepare(next(self.stream))
        self.pending.append(pb)
        if not len(pb):
            placeholder = np.zeros((1, 1, 1), self.raw) if self.raw else _PLACEHOLDER
            return ([placeholder], *(_placeholder_params(p.shape[1]) for p in pb.params))
        if self.raw == "uint8":  # DALI copies the memory-mapped pixels once, into its own buffer
            return ([d[..., None] for d in pb.data], *pb.params)
        if self.raw:
            return ([pixels_to_u16(d) for d in pb.data], *pb.params)
        return ([np.frombuffer(d, np.uint8) for d in pb.data], *pb.params)


def _placeholder_params(width: int) -> np.ndarray:
    """One row for the 1 x 1 placeholder: the whole pixel, every operation an identity."""
    row = np.zeros((1, width), np.float32)
    row[0, [Y1, X1]] = 1.0  # eval ROI rows (y0, x0, y1, x1) share the first four columns
    if width == N_PARAMS:
        row[0, [BRIGHTNESS, CONTRAST, SIGMA, WINDOW]] = 1.0
    return row


def _raw_dtype(assembler: BatchAssembler) -> str | None:
    """The pixel type a prepared dataset feeds the graph: uint8 when all its images are 8-bit,
    else uint16 (8-bit images scaled by 257, as the decoder does); None for encoded files."""
    if not assembler.raw:
        return None
    return assembler.source.pixel_dtype


def _error_summary(err: Exception) -> str:
    """The operator's own message from a DALI error (the line after 'encountered:')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1].rstrip(" :")
    return lines[0] if lines else type(err).__name__


def _dali_device(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda":
        return "gpu", device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"the DALI backend runs on cpu or cuda devices, not {device}")
    return "cpu", None


class DaliRunner:
    def __init__(
        self,
        assembler: BatchAssembler,
        cfg: ViewsConfig | EvalConfig,
        *,
        batch_size: int,
        num_threads: int,
        device: torch.device,
        prefetch_queue_depth: int = 2,
    ) -> None:
        self.assembler = assembler
        self.cfg = cfg
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = device
        self.dali_device, self.device_id = _dali_device(device)
        self.prefetch_queue_depth = prefetch_queue_depth
        self.n_params = cfg.n_views if isinstance(cfg, ViewsConfig) else 1
        self._pipe = None
        self._feed: _Feed | None = None
        self.rebuilds = 0  # how many times a pipeline was (re)built; tests and logs read it

    # -- pipeline lifecycle -------------------------------------------------------------------

    def _start(self, stream: Iterator[BatchSpec]) -> None:
        self.close()
        self._feed = _Feed(self.assembler, stream, self.n_params)
        self._pipe = build_pipeline(
            self.cfg,
            self._feed,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device=self.dali_device,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
            raw=_raw_dtype(self.assembler),
        )
        self.rebuilds += 1

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe
        self._pipe = None
        self._feed = None

    def next_key(self) -> tuple[int, int] | None:
        return None if self._feed is None else self._feed.next_key()

    # -- iteration ----------------------------------------------------------------------------

    def batches(
        self, make_stream: Callable[[int, int], Iterator[BatchSpec]], start: tuple[int, int], count: int
    ) -> Iterator[tuple[PreparedBatch, list[torch.Tensor]]]:
        """Yield ``count`` (prepared batch, output tensors) pairs starting at spec ``start``."""
        if self._pipe is None or self.next_key() != start:
            self._start(make_stream(*start))
        for _ in range(count):
            while True:
                try:
                    outputs = self._pipe.run()
                    break
                except RuntimeError as err:
                    self._recover(err, make_stream)
            pb = self._feed.pending.popleft()
            yield pb, [self._to_torch(o) for o in outputs] if len(pb) else []

    def _to_torch(self, out) -> torch.Tensor:
        dense = out.as_tensor()
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(dense))  # one copy; DALI reuses its buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
        t = torch.empty(dense.shape(), dtype=dtype, device=self.device)
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device))
        return t

    # -- recovery from a decoder failure ------------------------------------------------------

    def _recover(self, err: RuntimeError, make_stream: Callable) -> None:
        pending = list(self._feed.pending)
        if not pending or self.assembler.raw:  # prepared pixels are not decoded: not a data problem
            raise err
        bad = self._find_undecodable(pending)
        if not bad:
            raise err  # not a data problem
        for index, reason in bad:
            self.assembler.mark_bad(index, reason)
        first = pending[0].spec
        log.warning("DALI pipeline failed on %d file(s); rebuilding at epoch %d step %d", len(bad), first.epoch, first.step)
        self._start(make_stream(first.epoch, first.step))

    def _find_undecodable(self, pending: list[PreparedBatch]) -> list[tuple[int, str]]:
        """Decode every image of the undelivered batches one by one with the same decoder."""
        self.close()
        candidates = {int(i): d for pb in pending for i, d in zip(pb.indices, pb.data)}
        bad: list[tuple[int, str]] = []
        current: list[np.ndarray] = []
        pipe = None
        for index, data in candidates.items():
            if pipe is None:
                pipe = build_decode_check(self.dali_device, self.device_id, lambda: list(current))
            current[:] = [np.frombuffer(data, np.uint8)]
            try:
                pipe.run()
            except RuntimeError as e:
                bad.append((index, "DALI decoder failed: " + _error_summary(e)))
                pipe = None  # a failed pipeline cannot run again
        return bad
