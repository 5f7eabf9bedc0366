"""Attention: the Triton window / full kernels against torch SDPA and eager, ViTAEv2-S shapes.

    python -m benchmarks.bench_attention [--quick] [--json PATH] [--device cpu|cuda] [--batch N]

ViTAEv2-S at 224 px, batch 64, bf16: stage 1 (56 x 56 tokens, 7 x 7 windows, 1 head of 64),
stage 2 (28 x 28, windows, 2 heads), stage 3 (196 tokens, full, 4 heads), stage 4 (49 tokens,
full, 8 heads); without --quick also the reduction cells' head dim 128 and a padded grid (96-px
views: 24 x 24). Each op runs as the model calls it (packed B x H x W x 3C qkv in, B x H x W x C
out), forward and forward+backward (torch.autograd.grad into qkv, and the pad value of the
window op):

- ``triton``: ``backend="triton"`` (the window partition, padding and reverse are index math);
- peers: ``sdpa-flash`` / ``sdpa-efficient``: the op's torch backend (SDPA with one partition copy
  each way, padding copy included) pinned to that SDPA kernel; ``eager``: the reference (matmul,
  softmax, matmul).

TFLOP/s counts the useful work only: 4 N^2 d per head and window forward (N = 49 for a window, not
the 64 rows the kernel pads to), 2.5 times that backward; frac_peak is that over the H100's dense
bf16 peak. ratio = best peer / triton (above 1: Triton is faster). On a CPU there is no Triton
(the interpreter is for tests): the script says so and times the torch peers at a small batch only
to check the harness.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from benchmarks import _harness as H
from dinocxr_fast.ops import _backend
from dinocxr_fast.ops.attention import attention, attention_reference, window_attention, window_attention_reference

WINDOW = 7


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int]
    heads: int
    head_dim: int
    window: bool

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def flops_fwd(self, batch: int) -> float:
        h, w = self.grid
        if self.window:
            n_windows = batch * -(-h // WINDOW) * -(-w // WINDOW)
            return 4.0 * n_windows * self.heads * (WINDOW * WINDOW) ** 2 * self.head_dim
        return 4.0 * batch * self.heads * (h * w) ** 2 * self.head_dim


QUICK_SHAPES = [
    Shape("stage1-window", (56, 56), 1, 64, True),
    Shape("stage2-window", (28, 28), 2, 64, True),
    Shape("stage3-full", (14, 14), 4, 64, False),
    Shape("stage4-full", (7, 7), 8, 64, False),
]
MORE_SHAPES = [
    Shape("stage2-reduction", (28, 28), 1, 128, True),
    Shape("stage3-reduction", (14, 14), 2, 128, False),
    Shape("stage1-96px-padded", (24, 24), 1, 64, True),
]


def _sdpa_pinned(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    kernel = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    return lambda: sdpa_kernel(kernel)


def make_call(shape: Shape, impl: str, qkv, pad, grad_out, backward: bool):
    """A closure running one forward (and backward) of ``impl`` on the given inputs."""
    context = _sdpa_pinned(impl) if impl.startswith("sdpa-") else contextlib.nullcontext

    def forward():
        if shape.window:
            if impl == "eager":
                return window_attention_reference(qkv, shape.heads, WINDOW, pad_value=pad)
            return window_attention(qkv, shape.heads, WINDOW, pad_value=pad,
                                    backend="triton" if impl == "triton" else "torch")
        if impl == "eager":
            return attention_reference(qkv, shape.heads)
        return attention(qkv, shape.heads, backend="triton" if impl == "triton" else "torch")

    inputs = [qkv] + ([pad] if shape.window else [])

    def call():
        with context():
            out = forward()
            if backward:
                # the pad value is unused by the torch paths when the grid needs no padding
                torch.autograd.grad(out, inputs, grad_out, allow_unused=True)

    return call


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    triton_ok = cuda and _backend.why_unavailable("triton", device) is None
    if not triton_ok:
        print("Triton attention needs a CUDA GPU: the Triton figures (ms, TFLOP/s, fraction of the bf16 peak, "
              "ratio to SDPA) were NOT measured on this machine. Timing the torch peers only, as a harness check.")
    batch = args.batch or (64 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = QUICK_SHAPES if args.quick else QUICK_SHAPES + MORE_SHAPES
    impls = (["triton"] if triton_ok else []) + (["sdpa-flash", "sdpa-efficient"] if cuda else ["sdpa"]) + ["eager"]
    peaks = H.gpu_peaks(device) if cuda else None
    records = []
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, *shape.grid, 3 * shape.channels, generator=gen).to(device, dtype)
        pad = (torch.randn(3 * shape.channels, generator=gen) * 0.1).to(device, torch.float32)
        grad_out = torch.randn(batch, *shape.grid, shape.channels, generator=gen).to(device, dtype)
        if not shape.window:
            pad = None
        for backward in (False, True):
            qkv.requires_grad_(backward)
            if pad is not None:
                pad.requires_grad_(backward)
            times = {}
            for impl in impls:
                try:
                    times[impl] = H.time_fn(make_call(shape, impl, qkv, pad, grad_out, backward), device,
                                            repeats=10 if args.quick else None)
                except RuntimeError as exc:  # an SDPA kernel that refuses these inputs
                    print(f"  {shape.name} {impl}: skipped ({str(exc).splitlines()[0][:120]})")
            peers = {k: v for k, v in times.items() if k != "triton"}
            if not peers:
                continue
            best = min(peers, key=peers.get)
            flops = shape.flops_fwd(batch) * (3.5 if backward else 1.0)
            label = f"{shape.name} B={batch} {shape.grid[0]}x{shape.grid[1]} h={shape.heads} d={shape.head_dim}"
            subjects = ["triton"] if "triton" in times else list(peers)
            for impl in subjects:
                ms = times[impl]
                extra = {f"{k}_ms": round(v, 4) for k, v in peers.items()}
                extra["TFLOP/s"] = round(flops / (ms * 1e-3) / 1e12, 2)
                if peaks:
                    extra["frac_peak"] = round(flops / (ms * 1e-3) / peaks["bf16_flops"], 4)
                records.append(H.make_record(
                    "attention_fwd_bwd" if backward else "attention_fwd",
                    f"{label},{str(dtype).removeprefix('torch.')}", impl, best, ms, peers[best], device, **extra,
                ))
    return records


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--batch", type=int, help="images per step (default 64 on CUDA, 2 on the CPU)")
    args = parser.parse_args()
    records = run(args)
    extra_cols = ("TFLOP/s", "frac_peak", "sdpa-flash_ms", "sdpa-efficient_ms", "sdpa_ms", "eager_ms")
    H.print_table(records, extra_cols=extra_cols)
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
