"""The trainer-facing loaders: epochs, shards, resume state, output format; backends behind them.

    loader = build_pretrain_loader(source, ViewsConfig.dino_cxr(), 64, device="cuda",
                                   shard_id=rank, num_shards=world, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for views in loader:            # list of n_views tensors [B, C, S, S] on the device
            ...
        ckpt["data"] = loader.state_dict()   # at any step: {"epoch", "step", ...}

The batches of an epoch are a function of (seed, epoch, shard): ``load_state_dict`` then iterating
continues with exactly the batch that came next, mid-epoch included.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch

from .assemble import BatchAssembler, PreparedBatch, SkipLog
from .views import EvalConfig, ViewsConfig
from .planning import BatchSpec, epoch_order, shard_batches
from .samples import DatasetError, Source

log = logging.getLogger("dinocxr_fast.data")
BACKENDS = ("dali", "torch", "auto")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _EpochLoader:
    """Shared machinery: epoch plans, position, skip accounting; subclasses format outputs."""

    def __init__(
        self,
        source: Source,
        cfg: ViewsConfig | EvalConfig,
        batch_size: int,
        *,
        device: str | torch.device,
        shard_id: int,
        num_shards: int,
        seed: int,
        backend: str,
        num_threads: int,
        shuffle: bool,
        drop_last: bool,
        on_bad: str,
    ) -> None:
        if not isinstance(source, Source):
            raise TypeError(f"source must be a dinocxr_fast.data Source, got {type(source).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "dali" if dali_available() else "torch"
        self.source = source
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self.seed = int(seed)
        self.backend = backend
        self.shuffle, self.drop_last = shuffle, drop_last
        self.skip_log = SkipLog()
        self.epoch, self.step = 0, 0
        self.batch_indices: np.ndarray | None = None  # source indices of the last batch yielded
        self._plans: dict[int, list[np.ndarray]] = {}
        if len(self) == 0:
            raise DatasetError(
                f"{source.root}: {len(source)} samples make no batch of {self.batch_size} on each of "
                f"{self.num_shards} shard(s){' with drop_last' if drop_last else ''}"
            )
        views = cfg if isinstance(cfg, ViewsConfig) else None
        eval_cfg = cfg if isinstance(cfg, EvalConfig) else None
        assembler = BatchAssembler(source, views=views, eval_cfg=eval_cfg, seed=self.seed, on_bad=on_bad, skip_log=self.skip_log)
        if backend == "dali":
            from .dali_runner import DaliRunner

            self._runner = DaliRunner(assembler, cfg, batch_size=self.batch_size, num_threads=num_threads, device=self.device)
        else:
            from .torch_runner import TorchRunner

            self._runner = TorchRunner(assembler, cfg, num_workers=num_threads, device=self.device)

    # -- the plan -----------------------------------------------------------------------------

    def batches_of(self, epoch: int) -> list[np.ndarray]:
        """This shard's batches of ``epoch`` as arrays of source indices (before any skipping)."""
        if epoch not in self._plans:
            order = epoch_order(len(self.source), self.seed, epoch, self.shuffle)
            self._plans[epoch] = shard_batches(order, self.shard_id, self.num_shards, self.batch_size, self.drop_last)
            while len(self._plans) > 2:  # the current epoch and the one being prefetched
                del self._plans[next(iter(self._plans))]  # the oldest entry
        return self._plans[epoch]

    def _stream(self, epoch: int, step: int) -> Iterator[BatchSpec]:
        """Specs from (epoch, step) on, running into the following epochs (the DALI prefetch)."""
        while True:
            for s, idx in enumerate(self.batches_of(epoch)[step:], start=step):
                yield BatchSpec(epoch, s, idx)
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:
        """Batches per epoch on this shard (the same every epoch)."""
        n, s, b = len(self.source), self.num_shards, self.batch_size
        if self.drop_last:
            return (n // s) // b
        return -(-len(range(self.shard_id, n, s)) // b)

    # -- position -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int, step: int | None = None) -> None:
        """Select the epoch to iterate next. Same epoch and no step: keep the position (so a
        trainer that calls set_epoch after load_state_dict resumes mid-epoch); else start at
        ``step`` (default 0)."""
        if step is None:
            step = self.step if epoch == self.epoch else 0
        if not 0 <= step <= len(self):
            raise ValueError(f"step must be in [0, {len(self)}], got {step}")
        self.epoch, self.step = int(epoch), int(step)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from, plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_samples": len(self.source),
            "batch_size": self.batch_size,
            "num_shards": self.num_shards,
            "skipped": dict(self.skip_log.reasons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "batch_size", "num_shards"):
            mine = {"seed": self.seed, "num_samples": len(self.source), "batch_size": self.batch_size, "num_shards": self.num_shards}[key]
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this loader {mine}")
        for path, reason in state.get("skipped", {}).items():
            self.skip_log.reasons.setdefault(path, reason)
        self.set_epoch(int(state["epoch"]), int(state["step"]))

    @property
    def skipped(self) -> dict[str, str]:
        """Every unreadable file met so far: path -> reason."""
        return dict(self.skip_log.reasons)

    @property
    def num_skipped(self) -> int:
        return len(self.skip_log)

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self):
        if self.step >= len(self):  # the previous epoch was finished: go on with the next
            self.epoch, self.step = self.epoch + 1, 0
        start = (self.epoch, self.step)
        for pb, outputs in self._runner.batches(self._stream, start, len(self) - self.step):
            self.skip_log.merge(pb.skipped)  # torch workers report what they found
            self.step = pb.spec.step + 1
            if not len(pb):
                continue  # every image of this batch was unreadable (eval loaders only)
            self.batch_indices = pb.indices
            yield self._format(pb, [self._finish(t) for t in outputs])

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(_TORCH_DTYPES[self.cfg.dtype])
        if self.cfg.channels == 3:
            t = t.expand(-1, 3, -1, -1).contiguous()
        return t

    def _format(self, pb: PreparedBatch, outputs: list[torch.Tensor]):
        raise NotImplementedError

    def close(self) -> None:
        self._runner.close()


class PretrainLoader(_EpochLoader):
    """Yields a list of ``n_views`` tensors [B, C, S_v, S_v] per step."""

    def _format(self, pb: PreparedBatch, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return outputs


class LabelledLoader(_EpochLoader):
    """Yields (images [B, C, H, W], labels [B] int64) per step, labels on the device. With an
    EvalConfig the images are the eval transform; with a one-view ViewsConfig, augmented crops
    for supervised training (``build_labelled_loader``)."""

    def _format(self, pb: PreparedBatch, outputs: list[torch.Tensor]):
        return outputs[0], torch.from_numpy(pb.labels).to(self.device)


def build_pretrain_loader(
    source: Source,
    views: ViewsConfig | None = None,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    backend: str = "dali",
    num_threads: int = 2,
    drop_last: bool = True,
) -> PretrainLoader:
    """Augmented views for self-supervised pretraining (labels, if any, are ignored).

    ``backend="dali"`` decodes and augments with DALI (on the GPU when ``device`` is CUDA);
    ``"torch"`` uses PIL + torch ops in ``num_threads`` DataLoader workers; ``"auto"`` picks DALI
    when it is installed. An unreadable file is replaced by another image of the same batch.
    """
    return PretrainLoader(
        source, views or ViewsConfig.dino_cxr(), batch_size, device=device, shard_id=shard_id,
        num_shards=num_shards, seed=seed, backend=backend, num_threads=num_threads, shuffle=True,
        drop_last=drop_last, on_bad="substitute",
    )


def build_labelled_loader(
    source: Source,
    transform: EvalConfig | ViewsConfig | None = None,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    backend: str = "dali",
    num_threads: int = 2,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> LabelledLoader:
    """(images, labels), every sample once per epoch over the shards.

    ``transform`` is an EvalConfig (the evaluation transform; the default) or a ViewsConfig with
    exactly one view (augmented crops for fine-tuning and linear probes, e.g. RRC + flip only:
    ``ViewsConfig(views=(ViewSpec(224, jitter_p=0, blur_p=0),))``), with ``shuffle=True`` (per seed
    and epoch) and ``drop_last=True`` for training. An unreadable file is dropped from its batch
    (the batch gets smaller), so the labels stay true.
    """
    if not source.labelled:
        raise DatasetError(f"{source.root}: a labelled loader needs labelled samples")
    if isinstance(transform, ViewsConfig) and transform.n_views != 1:
        raise ValueError(f"a labelled loader takes a ViewsConfig with one view, got {transform.n_views}")
    return LabelledLoader(
        source, transform or EvalConfig(), batch_size, device=device, shard_id=shard_id,
        num_shards=num_shards, seed=seed, backend=backend, num_threads=num_threads, shuffle=shuffle,
        drop_last=drop_last, on_bad="drop",
    )
