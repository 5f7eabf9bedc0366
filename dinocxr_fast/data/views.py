"""Augmentation and evaluation-transform settings: every parameter of the data pipeline lives here.

Defaults follow DINO's ``DataAugmentationDINO`` (facebookresearch/dino) minus the colour operations
that mean nothing on a grayscale X-ray (saturation, hue, random grayscale):

  view 1:  RandomResizedCrop(scale) bicubic, flip p=0.5, brightness/contrast jitter 0.4/0.4 with
           p=0.8, Gaussian blur sigma~U(0.1, 2.0) with p=1.0
  view 2:  same, blur p=0.1, solarisation (pixels >= 128/255 inverted) p=0.2
  local:   same at 96 px, scale (0.05, 0.4), blur p=0.5

DINO-CXR's fixed-size strategy (the default) is two such views at one size, 224 px, RRC scale
(0.4, 1.0). Extra fixed-size views (n_views > 2) take the local-crop probabilities at full size.
Two simplifications against torchvision, identical in both backends: the jitter applies brightness
then contrast (torchvision draws the order at random), and contrast blends towards the mean of the
view (torchvision: the mean of the grayscale view, the same thing here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

# ImageNet's RGB statistics averaged to one channel, the usual choice for grayscale inputs.
GRAY_MEAN = 0.449
GRAY_STD = 0.226
DTYPES = ("float32", "float16", "bfloat16")
INTERPOLATIONS = ("bicubic", "bilinear")


def _pair(x: Any, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in x)
    if not lo <= hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {x}")
    return lo, hi


def _prob(p: float, name: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: its output size and the probability/range of every operation."""

    size: int = 224
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise ValueError(f"view size must be positive, got {self.size}")
        object.__setattr__(self, "size", int(self.size))
        scale = _pair(self.scale, "scale")
        if not (0.0 < scale[0] and scale[1] <= 1.0):
            raise ValueError(f"scale must lie in (0, 1], got {self.scale}")
        object.__setattr__(self, "scale", scale)
        ratio = _pair(self.ratio, "ratio")
        if ratio[0] <= 0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        object.__setattr__(self, "ratio", ratio)
        sigma = _pair(self.blur_sigma, "blur_sigma")
        if sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        object.__setattr__(self, "blur_sigma", sigma)
        for name in ("flip_p", "jitter_p", "blur_p", "solarize_p"):
            object.__setattr__(self, name, _prob(getattr(self, name), name))
        for name in ("brightness", "contrast"):
            v = float(getattr(self, name))
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} jitter must be in [0, 1), got {v}")
            object.__setattr__(self, name, v)


def _check_common(mean: float, std: float, channels: int, dtype: str, interpolation: str) -> None:
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


# DINO's photometric augmentation at its 224 px views (solarisation: the second view only). The blur sigma is in pixels of a 224 px
# view and scales with the view size: at 64 px DINO's sigma of up to 2 px would blur away what a
# 224 px view keeps (the fine lung texture), about a 7 px blur at 224.
PHOTOMETRIC_224 = {"jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4, "solarize_p": 0.2, "blur_sigma": (0.1, 2.0)}


def photometric(size: int, augment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ViewSpec fields of the photometric augmentation for a ``size`` px view: DINO's strengths
    (PHOTOMETRIC_224) with ``augment``'s overrides; the blur sigma scaled by size / 224."""
    unknown = set(augment or {}) - set(PHOTOMETRIC_224)
    if unknown:
        raise ValueError(f"unknown augmentation keys {sorted(unknown)} (known: {sorted(PHOTOMETRIC_224)})")
    out = {**PHOTOMETRIC_224, **{k: v for k, v in (augment or {}).items() if v is not None}}
    lo, hi = _pair(out["blur_sigma"], "blur_sigma")
    out["blur_sigma"] = (lo * size / 224.0, hi * size / 224.0)
    return out


@dataclass(frozen=True)
class ViewsConfig:
    """The pretraining views: one ViewSpec per view plus the shared output format."""

    views: tuple[ViewSpec, ...] = field(default_factory=lambda: ViewsConfig.dino_cxr().views)
    mean: float = GRAY_MEAN
    std: float = GRAY_STD
    channels: int = 1  # 3 repeats the gray channel for RGB-shaped models
    dtype: str = "float32"
    interpolation: str = "bicubic"
    solarize_threshold: float = 128.0 / 255.0

    def __post_init__(self) -> None:
        views = tuple(v if isinstance(v, ViewSpec) else ViewSpec(**v) for v in self.views)
        if not views:
            raise ValueError("ViewsConfig needs at least one view")
        object.__setattr__(self, "views", views)
        _check_common(self.mean, self.std, self.channels, self.dtype, self.interpolation)

    @property
    def n_views(self) -> int:
        return len(self.views)

    @classmethod
    def dino_cxr(cls, size: int = 224, n_views: int = 2, scale: tuple[float, float] = (0.4, 1.0), *,
                 augment: Mapping[str, Any] | None = None, **kw: Any) -> "ViewsConfig":
        """DINO-CXR's fixed-size views: ``n_views`` views of ``size`` px (default 2 x 224).

        ``augment`` overrides the photometric strengths (see ``photometric``)."""
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        common = photometric(size, augment)
        solarize_p = common.pop("solarize_p")
        first = ViewSpec(size=size, scale=scale, blur_p=1.0, **common)
        second = ViewSpec(size=size, scale=scale, blur_p=0.1, solarize_p=solarize_p, **common)
        extra = ViewSpec(size=size, scale=scale, blur_p=0.5, **common)
        views = (first, second, *([extra] * (n_views - 2)))[:n_views]
        return cls(views=views, **kw)

    @classmethod
    def dino_multicrop(
        cls,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        *,
        augment: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> "ViewsConfig":
        """Classic DINO multi-crop: 2 global views + ``n_local`` local views, for comparison."""
        g = cls.dino_cxr(global_size, 2, global_scale, augment=augment).views
        # a local crop shows a small region magnified: its blur is relative to the global view's size
        common = photometric(global_size, augment)
        common.pop("solarize_p")
        local = ViewSpec(size=local_size, scale=local_scale, blur_p=0.5, **common)
        return cls(views=(*g, *([local] * n_local)), **kw)

    def with_size(self, size: int) -> "ViewsConfig":
        """Every view resized to ``size`` (tests use small views)."""
        return replace(self, views=tuple(replace(v, size=size) for v in self.views))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViewsConfig":
        """Build from YAML: ``{preset: dino_cxr|dino_multicrop, <preset args>, <common fields>}``
        or ``{views: [ {size:..., ...}, ...], <common fields>}``."""
        d = dict(d)
        preset = d.pop("preset", None)
        if preset is None:
            return cls(**d)
        if preset not in ("dino_cxr", "dino_multicrop"):
            raise ValueError(f"unknown views preset {preset!r} (dino_cxr, dino_multicrop)")
        for k in ("scale", "global_scale", "local_scale"):
            if k in d:
                d[k] = tuple(d[k])
        return getattr(cls, preset)(**d)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation transform: resize the shorter side to ``resize``, centre-crop ``crop``."""

    resize: int = 256
    crop: int = 224
    mean: float = GRAY_MEAN
    std: float = GRAY_STD
    channels: int = 1
    dtype: str = "float32"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={self.crop} resize={self.resize}")
        _check_common(self.mean, self.std, self.channels, self.dtype, self.interpolation)

    @classmethod
    def for_size(cls, crop: int, **kw: Any) -> "EvalConfig":
        """DINO's ratio: resize to crop / 0.875 (256 for 224)."""
        return cls(resize=int(round(crop / 0.875)), crop=crop, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalConfig":
        return cls(**dict(d))
