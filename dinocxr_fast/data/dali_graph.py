"""The DALI graphs: one definition, the device chosen when it is built.

``device="gpu"``: images are decoded with ``device="mixed"`` (nvJPEG for JPEG, host codecs for
PNG/PGM, then copied) and every augmentation runs on the GPU. ``device="cpu"``: the same graph
with the decoder and every operator on the CPU, run with ``device_id=None``. The only differences
are the decoder's device string and ``_dev``, which moves the per-sample scalars (drawn in Python,
always on the CPU) next to the image before they meet it in arithmetic; operator *arguments*
(ROI, sigma, mirror) stay on the CPU on both, as DALI requires.

Inputs per batch, from one external_source callback: the encoded images (uint8 bytes) and one
float32 parameter row per sample and view (columns in ``planning``). Nothing in the graph draws
random numbers, so outputs depend only on those inputs.
"""
from __future__ import annotations

from typing import Callable

from .views import EvalConfig, ViewSpec, ViewsConfig
from .planning import BRIGHTNESS, CONTRAST, FLIP, SIGMA, SOLARIZE, WINDOW

U16_MAX = 65535.0
U8_MAX = 255.0


def _types():
    from nvidia.dali import types

    return types


def _interp(name: str):
    types = _types()
    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[name]


def _out_dtype(name: str):
    types = _types()
    return types.FLOAT16 if name == "float16" else types.FLOAT  # bfloat16: cast in torch


def _decode(encoded, device: str):
    """Any supported format -> HWC uint16 gray, 8-bit inputs scaled by 257 (exact)."""
    from nvidia.dali import fn

    types = _types()
    return fn.decoders.image(
        encoded,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.GRAY,
        dtype=types.UINT16,
        adjust_orientation=False,  # the PIL path ignores EXIF orientation too
    )


def _pixel_type(full: float):
    """The resampler's output type: the input's own integer type (8-bit prepared pixels stay
    8-bit, rounded like PIL's 8-bit resampler; everything else uint16)."""
    types = _types()
    return types.UINT8 if full == U8_MAX else types.UINT16


def _view(img, p, spec: ViewSpec, cfg: ViewsConfig, dev: Callable, full: float = U16_MAX):
    """RRC -> brightness -> contrast -> blur -> solarise -> flip + normalise.

    An operation whose probability is 0 for this view is left out of the graph (on the CPU each
    costs a pass over the view). ``scale`` tracks the value range: ``full`` (65535, or 255 for 8-bit
    prepared pixels) while the view is still the resampler's integers, 1 once the jitter has made it
    a float in [0, 1].
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    types = _types()
    v = fn.resize(
        img,
        roi_start=p[0:2],  # (y0, x0) in source pixels
        roi_end=p[2:4],  # (y1, x1)
        size=[spec.size, spec.size],
        interp_type=_interp(cfg.interpolation),
        antialias=True,
        dtype=_pixel_type(full),  # rounds and clips the cubic overshoot; twice as fast as float on CPU
    )
    scale = full
    if spec.jitter_p > 0:
        v = dmath.clamp(v * dev(p[BRIGHTNESS] * (1.0 / full)), 0.0, 1.0)
        c = dev(p[CONTRAST])
        v = dmath.clamp(v * c + fn.reductions.mean(v) * (1.0 - c), 0.0, 1.0)
        scale = 1.0
    if spec.blur_p > 0:
        v = fn.gaussian_blur(v, sigma=p[SIGMA], window_size=fn.cast(p[WINDOW], dtype=types.INT32))
    if spec.solarize_p > 0:
        v = v * (1.0 / scale) if scale != 1.0 else v
        # |v - 1| = 1 - v where v >= threshold, |v - 0| = v below; samples not drawn for
        # solarisation get a threshold above 1. Three passes where the plain formula takes six.
        threshold = dev(cfg.solarize_threshold + (1.0 - p[SOLARIZE]) * 2.0)
        v = dmath.abs(v - (v >= threshold))
        scale = 1.0
    return fn.crop_mirror_normalize(
        v,
        mirror=fn.cast(p[FLIP], dtype=types.INT32),
        mean=[cfg.mean * scale],
        std=[cfg.std * scale],
        dtype=_out_dtype(cfg.dtype),
        output_layout="CHW",
    )


def _eval_view(img, roi, cfg: EvalConfig, full: float = U16_MAX):
    """Resize the centre-crop box to crop x crop, normalise (the 1/65535 folded into mean/std)."""
    from nvidia.dali import fn

    v = fn.resize(
        img,
        roi_start=roi[0:2],
        roi_end=roi[2:4],
        size=[cfg.crop, cfg.crop],
        interp_type=_interp(cfg.interpolation),
        antialias=True,
        dtype=_pixel_type(full),  # rounds and clamps the cubic overshoot
    )
    return fn.crop_mirror_normalize(
        v,
        mean=[cfg.mean * full],
        std=[cfg.std * full],
        dtype=_out_dtype(cfg.dtype),
        output_layout="CHW",
    )


def define_graph(cfg: ViewsConfig | EvalConfig, source: Callable, device: str, raw: str | None = None) -> tuple:
    """Create the operators inside an open ``with pipeline:`` block; returns the output nodes.

    ``source()`` returns ``(encoded_list, params_0, ..., params_{k-1})``: one params array per view,
    or one ROI array for evaluation. ``raw`` ("uint8" or "uint16"): the first output holds decoded
    HxWx1 images of that type (a prepared dataset's pixels) instead of encoded files; the graph
    then starts at the views, without a decoder.
    """
    from nvidia.dali import fn

    types = _types()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if raw not in (None, "uint8", "uint16"):
        raise ValueError(f"raw must be None, 'uint8' or 'uint16', got {raw!r}")
    n_params = cfg.n_views if isinstance(cfg, ViewsConfig) else 1
    full = U8_MAX if raw == "uint8" else U16_MAX
    pixels = types.UINT8 if raw == "uint8" else types.UINT16

    def dev(node):
        return node.gpu() if device == "gpu" else node

    inputs = fn.external_source(
        source=source,
        num_outputs=1 + n_params,
        batch=True,
        dtype=[pixels if raw else types.UINT8] + [types.FLOAT] * n_params,
        ndim=[3 if raw else 1] + [1] * n_params,
        layout=["HWC" if raw else ""] + [""] * n_params,
    )
    img = dev(inputs[0]) if raw else _decode(inputs[0], device)
    if isinstance(cfg, ViewsConfig):
        return tuple(_view(img, p, spec, cfg, dev, full) for p, spec in zip(inputs[1:], cfg.views))
    return (_eval_view(img, inputs[1], cfg, full),)


def build_pipeline(
    cfg: ViewsConfig | EvalConfig,
    source: Callable,
    *,
    batch_size: int,
    num_threads: int,
    device: str,
    device_id: int | None,
    prefetch_queue_depth: int = 2,
    seed: int = 0,
    raw: str | None = None,
):
    """A built pipeline whose outputs are the views (ViewsConfig) or the eval image (EvalConfig)."""
    from nvidia.dali import Pipeline

    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
        seed=seed,
    )
    with pipe:
        pipe.set_outputs(*define_graph(cfg, source, device, raw))
    pipe.build()
    return pipe


def build_decode_check(device: str, device_id: int | None, source: Callable):
    """A one-image pipeline that only decodes: tells which file broke a pipeline run."""
    from nvidia.dali import fn, pipeline_def

    types = _types()

    @pipeline_def
    def graph():
        enc = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
        return _decode(enc, device)

    pipe = graph(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    pipe.build()
    return pipe
