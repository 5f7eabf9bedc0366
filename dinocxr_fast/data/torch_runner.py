"""The torch DataLoader backend: PIL decode + torch ops in worker processes, one batch per item.

Each DataLoader item is a whole BatchSpec, so the workers run the same BatchAssembler as the DALI
feed (same reads, probes, substitutions, plans) and the main process only records skips and moves
tensors to the device. Workers are persistent: they are started once and reused every epoch.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .assemble import BatchAssembler, PreparedBatch
from .views import EvalConfig, ViewsConfig
from .imageio import CorruptImageError, decode_pil
from .planning import BatchSpec
from .prepared import pixels_to_pil
from .torch_ops import render_eval, render_view


class _BatchDataset(Dataset):
    """dataset[spec] -> (prepared batch without its bytes, list of stacked output tensors)."""

    def __init__(self, assembler: BatchAssembler, cfg: ViewsConfig | EvalConfig) -> None:
        self.assembler = assembler
        self.cfg = cfg

    def __getitem__(self, spec: BatchSpec):
        found: list[tuple[str, str]] = []
        while True:
            pb = self.assembler.prepare(spec)
            found += pb.skipped
            images = self._decode(pb, found)
            if images is not None:
                break
            # A file passed the probe but PIL cannot decode it: it is now in the skip log, so
            # preparing again substitutes or drops it, as the DALI runner does after a failure.
        pb.skipped = found
        outputs = self._render(pb, images) if len(pb) else []
        pb.data = []  # the bytes need not travel back to the main process
        return pb, outputs

    def _decode(self, pb: PreparedBatch, found: list[tuple[str, str]]) -> list | None:
        """PIL images of the batch, or None after recording the files that failed to decode."""
        if self.assembler.raw:  # a prepared dataset's pixels: decoded already
            return [pixels_to_pil(d) for d in pb.data]
        images, failed = [], False
        for index, data in zip(pb.indices, pb.data):
            try:
                images.append(decode_pil(data, self.assembler.policy))
            except CorruptImageError as e:
                self.assembler.mark_bad(int(index), str(e))
                found.append((self.assembler.source[int(index)].path, str(e)))
                failed = True
        return None if failed else images

    def _render(self, pb: PreparedBatch, images: list) -> list[torch.Tensor]:
        if isinstance(self.cfg, ViewsConfig):
            return [
                torch.stack([render_view(img, params[j], spec, self.cfg) for j, img in enumerate(images)])
                for params, spec in zip(pb.params, self.cfg.views)
            ]
        roi = pb.params[0]
        return [torch.stack([render_eval(img, roi[j], self.cfg) for j, img in enumerate(images)])]


class _SpecSampler(Sampler):
    """Yields the specs of the current request; the loader swaps them in before each iteration."""

    def __init__(self) -> None:
        self.specs: Sequence[BatchSpec] = ()

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def _worker_context():
    """How workers start. A process that has run DALI pipelines holds native threads, and a
    forked child of such a process can deadlock; then the workers come from a fork server (which
    preloads this module and torch once, so starting them stays cheap). Like any spawn-style start
    this needs the ``if __name__ == "__main__":`` guard in a script. Otherwise: plain fork."""
    if "nvidia.dali" not in sys.modules:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _keep(item):
    return item


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Workers forked inside this block start with SIGINT/SIGTERM blocked (the mask is
    inherited) until ``_worker_init`` ignores them; the main process gets them as usual after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(_: int) -> None:
    # Ctrl-C, docker stop, SLURM and systemd signal the whole process group: the workers ignore
    # it, so the main process can finish its step and save a checkpoint with its loader intact.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
    # Workers report skips with each batch; the main process logs them, once.
    torch.utils.data.get_worker_info().dataset.assembler.skip_log.verbose = False


class TorchRunner:
    """Runs a BatchAssembler's batches through PIL + torch ops in DataLoader workers (DaliRunner's
    interface: ``batches(...)`` yields the rendered batches, ``close()`` stops the workers)."""

    def __init__(self, assembler: BatchAssembler, cfg: ViewsConfig | EvalConfig, *, num_workers: int,
                 device: torch.device, prefetch_factor: int = 2) -> None:
        self.cfg = cfg
        self.device = device
        self._dataset = _BatchDataset(assembler, cfg)
        self._sampler = _SpecSampler()
        kwargs = {}
        if num_workers:
            kwargs = dict(
                prefetch_factor=prefetch_factor,
                persistent_workers=True,
                worker_init_fn=_worker_init,
                multiprocessing_context=_worker_context(),
            )
        self._loader = DataLoader(
            self._dataset,
            batch_size=None,  # every item already is a batch
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_keep,
            pin_memory=device.type == "cuda",
            # DataLoader draws a worker seed at every iter(): from its own generator, not the global
            # RNG the model's dropout uses, so a resumed run draws what the uninterrupted one drew
            generator=torch.Generator(),
            **kwargs,
        )

    def batches(
        self, make_stream: Callable[[int, int], Iterator[BatchSpec]], start: tuple[int, int], count: int
    ) -> Iterator[tuple[PreparedBatch, list[torch.Tensor]]]:
        stream = make_stream(*start)
        self._sampler.specs = [next(stream) for _ in range(count)]
        with _stop_signals_blocked():  # the first iteration starts the persistent workers
            batches = iter(self._loader)
        for pb, outputs in batches:
            yield pb, [t.to(self.device, non_blocking=True) for t in outputs]

    def close(self) -> None:
        # Dropping the loader's persistent iterator stops the workers.
        self._loader = None
