"""Procedural chest phantoms: the embedded default dataset (no download needed).

A frontal chest radiograph in caricature, bright = dense: a body outline of soft tissue, two dark
lung fields, a spine with vertebrae, a heart shadow, clavicles and curved ribs over the lungs, with
per-image random anatomy, exposure and noise. The 'pneumonia' class adds one to three soft
opacities (Gaussian densities) inside the lung fields; they are large and bright enough that a
linear probe on the pixels separates the classes.

The ``subtle`` variant (the default run's kNN monitor, see ``VARIANTS``) draws the same anatomy with
two smaller, fainter opacities and a wide exposure range: a randomly initialised network no longer
separates its classes from the image's overall brightness (kNN on its features: 0.52-0.64 where the
standard phantoms give 0.91), so a rise of the kNN accuracy on it is something pretraining learned.

Images are rendered deterministically from (seed, index) and either written once as PNGs to a
cache folder (the default, so every loader and tool sees ordinary files) or rendered on the fly
from ``phantom://`` URIs (``in_memory=True``).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np

from .samples import Sample, Source

log = logging.getLogger("dinocxr_fast.data")
CLASSES = ("normal", "pneumonia")
VERSION = "v1"  # bump when the renderer changes, so stale caches are not reused

# What differs between the variants: the opacities of label 1 (how many, Gaussian sigma and density,
# all as fractions of the image) and the exposure (gain and offset). Both variants draw the same
# random numbers in the same order, so the standard phantoms are those of VERSION v1 bit for bit.
VARIANTS = {
    "standard": {"opacities": (2, 5), "sigma": (0.07, 0.13), "density": (0.25, 0.38),
                 "gain": (0.9, 1.1), "offset": (-0.03, 0.03)},
    "subtle": {"opacities": (2, 3), "sigma": (0.06, 0.10), "density": (0.10, 0.25),
               "gain": (0.6, 1.3), "offset": (-0.15, 0.15)},
}


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """0 outside, 1 inside, for a signed 'inside-ness' d (positive inside), soft over ``edge``."""
    return 0.5 * (1.0 + np.tanh(d / edge))


def _ellipse(yy, xx, cy, cx, ry, rx, edge=0.02):
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return _soft(1.0 - r, edge / min(ry, rx))


def _lung(yy, xx, top, bottom, cx, half_width, side):
    """A lung field: narrow apex, wide base, rounded diaphragm dome; soft edges."""
    t = np.clip((yy - top) / (bottom - top), 0.0, 1.0)  # 0 at the apex, 1 at the base
    width = half_width * (0.45 + 0.55 * np.sqrt(t))
    inside_x = 1.0 - np.abs(xx - cx) / np.maximum(width, 1e-3)
    dome = bottom - 0.06 * (1.0 - ((xx - cx) / half_width) ** 2)  # the diaphragm bulges up medially
    inside_y = np.minimum(yy - top, dome - yy) / 0.02
    return _soft(np.minimum(inside_x / 0.12, inside_y), 1.0)


def render_phantom(seed: int, index: int, label: int, size: int = 256, variant: str = "standard") -> np.ndarray:
    """One phantom as a 2-D uint8 array (size x size); label 1 = pneumonia. A pure function of its
    arguments; ``variant`` is a key of VARIANTS."""
    try:
        v = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown phantom variant {variant!r} (known: {', '.join(VARIANTS)})") from None
    rng = np.random.default_rng([seed, index, 0xC4E57])
    j = lambda s: rng.normal(0.0, s)  # noqa: E731  small anatomical jitter
    yy, xx = np.meshgrid(np.linspace(0, 1, size, dtype=np.float32), np.linspace(0, 1, size, dtype=np.float32), indexing="ij")
    cx = 0.5 + j(0.015)

    body = _ellipse(yy, xx, 0.64 + j(0.02), cx, 0.66 + j(0.02), 0.45 + j(0.02), 0.03)
    img = 0.45 * body

    top, bottom = 0.16 + j(0.015), 0.76 + j(0.02)
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        lung_cx = cx + side * (0.18 + j(0.01))
        lungs = np.maximum(lungs, _lung(yy, xx, top + j(0.01), bottom + j(0.015), lung_cx, 0.15 + j(0.01), side))
    heart = _ellipse(yy, xx, 0.64 + j(0.02), cx + 0.07 + j(0.015), 0.14 + j(0.01), 0.16 + j(0.01), 0.04)
    lungs *= body * (1.0 - 0.85 * heart)  # the heart hides the medial base of the left lung
    img -= 0.30 * lungs

    # Ribs: arcs over each hemithorax sagging laterally; nearest-rib distance in one pass a side.
    spacing = 0.06 + j(0.003)
    for side in (-1.0, 1.0):
        lateral = np.clip((xx - cx) * side, 0.0, None)
        t = (yy - 0.17 - 0.6 * lateral**2 - 0.1 * lateral) / spacing
        k = np.clip(np.rint(t), 0, 9)
        dist = np.abs(t - k) * spacing
        rib = _soft(0.011 - dist, 0.004) * _soft(lateral - 0.035, 0.01) * _soft(0.4 - lateral, 0.02)
        img += 0.085 * rib * body

    # Clavicles, spine with vertebrae, heart shadow (image right = the patient's left).
    for side in (-1.0, 1.0):
        lateral = (xx - cx) * side
        clav = _soft(0.012 - np.abs(yy - (0.15 + 0.05 * lateral - 0.25 * lateral**2)), 0.004)
        img += 0.12 * clav * _soft(lateral - 0.02, 0.01) * _soft(0.26 - lateral, 0.02)
    spine = _soft(0.034 - np.abs(xx - cx), 0.006) * _soft(yy - 0.06, 0.01)
    img += spine * (0.19 + 0.025 * np.cos(2 * np.pi * yy * (13 + j(0.5))))
    img += 0.12 * heart

    # Pneumonia: soft opacities confined to the lung fields. They are drawn for every image and
    # only painted for label 1, so both labels of one (seed, index) share all other randomness.
    for _ in range(int(rng.integers(*v["opacities"]))):
        side = rng.choice([-1.0, 1.0])
        oy, ox = rng.uniform(0.35, 0.68), cx + side * rng.uniform(0.1, 0.25)
        sig, density = rng.uniform(*v["sigma"]), rng.uniform(*v["density"])
        if label == 1:
            img += density * np.exp(-((yy - oy) ** 2 + (xx - ox) ** 2) / (2 * sig * sig)) * lungs

    img = img * rng.uniform(*v["gain"]) + rng.uniform(*v["offset"])  # exposure
    img += rng.normal(0.0, 0.012, img.shape).astype(np.float32)  # quantum noise
    img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1) + np.roll(img, (1, 1), (0, 1))) * 0.25  # detector blur
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def phantom_uri(seed: int, index: int, label: int, size: int, variant: str = "standard") -> str:
    q = {"seed": seed, "index": index, "label": label, "size": size}
    if variant != "standard":
        q["variant"] = variant
    return "phantom://" + VERSION + "?" + urlencode(q)


def render_uri(uri: str) -> np.ndarray:
    q = {k: v[0] for k, v in parse_qs(urlparse(uri).query).items()}
    return render_phantom(int(q["seed"]), int(q["index"]), int(q["label"]), int(q["size"]), q.get("variant", "standard"))


def default_cache_dir() -> Path:
    root = os.environ.get("DINOCXR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dinocxr_fast")
    return Path(root) / "phantoms"


def _labels(n: int) -> list[int]:
    return [i % 2 for i in range(n)]  # balanced, interleaved


def write_phantoms(folder: Path, n: int, size: int, seed: int, variant: str = "standard") -> Path:
    """Render the PNG tree ``folder/<class>/<index>.png`` once; concurrent callers are safe.

    Rendering goes to a temporary sibling folder that is renamed into place, so a reader never
    sees a half-written tree and two processes racing both end with the same complete folder.
    """
    from PIL import Image

    if (folder / ".complete").exists():
        return folder
    log.info("rendering %d %s chest phantoms (%d px) into %s, once", n, variant, size, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        for c in CLASSES:
            (tmp / c).mkdir()
        for i, label in enumerate(_labels(n)):
            Image.fromarray(render_phantom(seed, i, label, size, variant)).save(tmp / CLASSES[label] / f"{i:06d}.png")
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class SyntheticSource(Source):
    """``n`` phantoms (half normal, half pneumonia) of ``size`` px, deterministic in ``seed``;
    ``variant``: a key of VARIANTS."""

    def __init__(
        self,
        n: int = 512,
        size: int = 256,
        seed: int = 0,
        *,
        in_memory: bool = False,
        cache_dir: str | os.PathLike | None = None,
        variant: str = "standard",
    ) -> None:
        if n < 1 or size < 16:
            raise ValueError(f"need n >= 1 and size >= 16, got n={n} size={size}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown phantom variant {variant!r} (known: {', '.join(VARIANTS)})")
        labels = _labels(n)
        tag = "" if variant == "standard" else f"-{variant}"
        if in_memory:
            samples = [Sample(phantom_uri(seed, i, lab, size, variant), lab, f"phantom-{i}") for i, lab in enumerate(labels)]
            root = f"phantom://{VERSION}?n={n}&size={size}&seed={seed}" + (f"&variant={variant}" if tag else "")
        else:
            base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            folder = write_phantoms(base / f"{VERSION}{tag}-n{n}-s{size}-seed{seed}", n, size, seed, variant)
            samples = [
                Sample(str(folder / CLASSES[lab] / f"{i:06d}.png"), lab, f"phantom-{i}") for i, lab in enumerate(labels)
            ]
            root = str(folder)
        super().__init__(samples, CLASSES, root)
