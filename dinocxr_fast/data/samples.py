"""The common currency of every data source: a list of samples plus the class names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

UNLABELLED = -1


class DatasetError(ValueError):
    """A dataset that cannot be used at all: empty, missing, or inconsistent. Names the path."""


@dataclass(frozen=True)
class Sample:
    """One image: where it is, its class index (UNLABELLED if none) and its patient, if known.

    ``path`` is a file path, or a ``phantom://`` URI for an in-memory synthetic image
    (see ``dinocxr_fast.data.synthetic``). The patient id keeps one patient's images on one side
    of every split.
    """

    path: str
    label: int = UNLABELLED
    patient_id: str | None = None


class Source:
    """An ordered, immutable list of samples with the class names their labels index.

    Subclasses (ImageFolderSource, CsvSource, DicomSource, SyntheticSource) only differ in how
    they find the samples; everything downstream (subsets, loaders) takes a plain Source.
    """

    def __init__(self, samples: Iterable[Sample], classes: Sequence[str] = (), root: str = "") -> None:
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.classes: tuple[str, ...] = tuple(classes)
        self.root = str(root)
        if not self.samples:
            raise DatasetError(f"dataset at {self.root or '<in memory>'} has no samples")
        for s in self.samples:
            if s.label != UNLABELLED and not 0 <= s.label < len(self.classes):
                raise DatasetError(
                    f"sample {s.path} has label {s.label} but {self.root} defines {len(self.classes)} classes"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, n={len(self)}, classes={list(self.classes)})"

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(s.label != UNLABELLED for s in self.samples)

    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def paths(self) -> list[str]:
        return [s.path for s in self.samples]

    def with_samples(self, samples: Iterable[Sample]) -> "Source":
        """A plain Source over other samples with the same classes and root (for subsets)."""
        return Source(samples, self.classes, self.root)

    def unlabelled(self) -> "Source":
        """The same images with labels dropped: pretraining input."""
        return Source((Sample(s.path, UNLABELLED, s.patient_id) for s in self.samples), (), self.root)

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for s in self.samples:
            if s.label != UNLABELLED:
                counts[self.classes[s.label]] += 1
        return counts
