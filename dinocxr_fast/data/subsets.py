"""Label-fraction subsets and patient-grouped splits (``--label-fraction 0.01/0.1/1.0``).

Selection is by whole patients: every image of a patient goes to the same side, so a patient never
appears both in the labelled subset and in the rest. Groups are ordered by a seeded hash of their
key, not by a shuffle of the list, so the choice of one patient does not depend on which other
files happen to be present or on the order the source listed them in.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Sequence

from .samples import Sample, Source


def patient_key(sample: Sample) -> str:
    """The grouping key: the patient id when the source has one, else the file itself."""
    return f"patient:{sample.patient_id}" if sample.patient_id else f"file:{sample.path}"


def _hash_order(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}|{key}".encode()).digest()


def split_by_patient(samples: Sequence[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split into (selected, rest): about ``fraction`` of each class, whole patients only.

    Per class, at least one patient is selected (fraction > 0) and, where patient sizes allow it,
    no more than round(fraction * class size) images. Both lists keep the input order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(samples), []
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[patient_key(s)].append(i)
    # A patient belongs to the stratum of its most common label (ties: lowest label).
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, idx in groups.items():
        counts = Counter(samples[i].label for i in idx)
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        by_class[label].append(key)

    chosen: set[str] = set()
    for label, keys in by_class.items():
        keys.sort(key=lambda k: _hash_order(seed, k))
        size = sum(len(groups[k]) for k in keys)
        target = max(1, round(fraction * size))
        taken = 0
        for k in keys:
            n = len(groups[k])
            if taken + n <= target:
                chosen.add(k)
                taken += n
                if taken == target:
                    break
        if taken == 0:  # every patient is larger than the target: take the first one anyway
            chosen.add(keys[0])
    selected = [s for s in samples if patient_key(s) in chosen]
    rest = [s for s in samples if patient_key(s) not in chosen]
    return selected, rest


def label_fraction_subset(samples: Sequence[Sample], fraction: float, seed: int = 0) -> list[Sample]:
    """The labelled subset for a label-fraction experiment (stratified, seeded, by patient)."""
    return split_by_patient(samples, fraction, seed)[0]


def label_fraction(source: Source, fraction: float, seed: int = 0) -> Source:
    """``source`` cut to a stratified, patient-grouped, seeded share (``label_fraction_subset``)."""
    return source.with_samples(label_fraction_subset(source.samples, fraction, seed))
