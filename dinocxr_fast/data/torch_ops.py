"""The view and eval transforms with PIL + torch: the same semantics as the DALI graph.

Resampling is PIL's (antialiased bicubic over a source box, what torchvision does for PIL images);
the pointwise operations and the blur run on float tensors in [0, 1]. Used by the torch DataLoader
backend and as the reference the DALI outputs are tested against.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .views import EvalConfig, ViewSpec, ViewsConfig
from .planning import BRIGHTNESS, CONTRAST, FLIP, SIGMA, SOLARIZE, WINDOW, X0, X1, Y0, Y1

_FILTERS = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling.BICUBIC / BILINEAR

try:
    from scipy.ndimage import correlate1d as _correlate1d
except ImportError:  # the conv2d form below does the same
    _correlate1d = None


def resample(img, box: tuple[float, float, float, float], size: int, interpolation: str) -> torch.Tensor:
    """Resample the source box (x0, y0, x1, y1) of a PIL 'L'/'F' image to size x size, in [0, 1]."""
    out = img.resize((size, size), _FILTERS[interpolation], box=box)
    x = torch.from_numpy(np.array(out, dtype=np.float32)).mul_(1.0 / 255.0)
    return x.clamp_(0.0, 1.0)  # 'F' images keep the cubic overshoot; 'L' ones are clipped already


def gaussian_blur(x: torch.Tensor, sigma: float, window: int) -> torch.Tensor:
    """Separable Gaussian over an [H, W] image, reflect-101 borders (DALI's default).

    With SciPy (there wherever scikit-learn is) the two passes are ``ndimage.correlate1d``
    ("mirror" is reflect-101), about twice as fast as torch's conv2d on one small channel, which is
    what a DataLoader worker blurs; the conv2d form (``_blur_conv``) is the same up to float rounding.
    """
    radius = window // 2
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    k = k / k.sum()
    if _correlate1d is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return _blur_conv(x, k, radius)
    y = _correlate1d(x.numpy(), k.numpy(), axis=1, mode="mirror")
    return torch.from_numpy(_correlate1d(y, k.numpy(), axis=0, mode="mirror"))


def _blur_conv(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    y = F.pad(x[None, None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0, 0]


def render_view(img, row: np.ndarray, spec: ViewSpec, cfg: ViewsConfig) -> torch.Tensor:
    """One augmented view [1, S, S], normalised; ``row`` is a planning parameter row."""
    box = (float(row[X0]), float(row[Y0]), float(row[X1]), float(row[Y1]))
    x = resample(img, box, spec.size, cfg.interpolation)
    x = (x * float(row[BRIGHTNESS])).clamp_(0.0, 1.0)
    c = float(row[CONTRAST])
    x = (x * c + x.mean() * (1.0 - c)).clamp_(0.0, 1.0)
    x = gaussian_blur(x, float(row[SIGMA]), int(row[WINDOW]))
    if row[SOLARIZE]:
        x = torch.where(x >= cfg.solarize_threshold, 1.0 - x, x)
    if row[FLIP]:
        x = x.flip(-1)
    return ((x - cfg.mean) / cfg.std)[None]


def render_eval(img, roi: np.ndarray, cfg: EvalConfig) -> torch.Tensor:
    """The eval image [1, crop, crop]: the centre-crop box resampled, normalised."""
    box = (float(roi[1]), float(roi[0]), float(roi[3]), float(roi[2]))
    x = resample(img, box, cfg.crop, cfg.interpolation)
    # Match DALI's uint16 intermediate: round to 1/65535 steps (a no-op for 8-bit sources).
    x = torch.round(x * 65535.0) * (1.0 / 65535.0)
    return ((x - cfg.mean) / cfg.std)[None]
