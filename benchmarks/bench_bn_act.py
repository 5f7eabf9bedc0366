"""CPU: conv3x3 -> BatchNorm -> SiLU through ``ops.conv_bn_act``, the ``cpp`` backend against eager PyTorch.

    python -m benchmarks.bench_bn_act [--quick] [--json PATH] [--repeats N]

ViTAEv2 PCM convolutions at batch 64, float32, channels-last tokens (B x H x W x C, as the model
runs them), conv output shapes (NCHW) [64, 64, 32, 32] (dense 64 -> 64), [64, 16, 32, 32],
[64, 128, 16, 16], [64, 32, 16, 16] (grouped, 4 input channels per group, as ViTAEv2's stages 2-4).
Modes:
  train_fwd      BatchNorm in training mode, forward with autograd recording (a training step's forward);
  train_fwd_bwd  the same plus backward of a fixed upstream gradient (input, weight, bias, BN weight/bias);
  infer          eval BatchNorm under no_grad;
  bn_act_*       the BatchNorm + SiLU part alone on a fixed conv output (what the cpp backend fuses).
Ours: ``conv_bn_act(backend="cpp")`` (aten convolution, then the fused csrc/cpu/bn_act kernels).
Peer: ``conv_bn_act(backend="torch")``, the reference (F.conv2d -> F.batch_norm -> F.silu), in the
same process on the same inputs; bn_act rows compare ``ops.bn_act_cpu.bn_act_cpu`` with
F.batch_norm + F.silu. Timing: each contender run round-robin (``_harness.time_interleaved``),
median in ms; ratio = peer / ours (above 1: ours is faster).
Limit: ``bytes`` is the minimum traffic of the mode (``MIN_TRAFFIC``: each activation-sized tensor
read or written once; weights are negligible), reported in GB/s and as a fraction of this
machine's STREAM-style bandwidth for ours and the peer (``frac_stream_bw``, ``torch_frac_stream_bw``).
The activations here (1-16 MB) fit in the 32 MB L3, so a fraction above 1 is possible; the
convolution's arithmetic is not counted, so conv rows are a lower bound of how close they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import _harness as H
from dinocxr_fast import _ext
from dinocxr_fast.ops.bn_act_cpu import bn_act_cpu
from dinocxr_fast.ops.conv_bn_act import conv_bn_act

BATCH = 64
# name: (channels, output grid, groups); each conv is C -> C, 3x3, stride 1, padding 1.
SHAPES = {
    "c64_32x32_dense": (64, 32, 1),
    "c16_32x32_g4": (16, 32, 4),
    "c128_16x16_g32": (128, 16, 32),
    "c32_16x16_g8": (32, 16, 8),
}
QUICK_SHAPES = ("c16_32x32_g4", "c128_16x16_g32")
# Activation-sized tensors [B*H*W, C] each mode must at least read or write once:
# train_fwd: x in, conv output saved for backward, out; + backward: grad_out, saved conv output and x
# read, grad_x written; infer: x in, out; bn_act_fwd: y in, out; + backward: grad_out and y read, grad_y.
MIN_TRAFFIC = {"train_fwd": 3, "train_fwd_bwd": 7, "infer": 2, "bn_act_fwd": 2, "bn_act_fwd_bwd": 5}
MODES = ("train_fwd", "train_fwd_bwd", "infer", "bn_act_fwd", "bn_act_fwd_bwd")
QUICK_MODES = ("train_fwd", "train_fwd_bwd", "bn_act_fwd_bwd")


def make_case(c, hw, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, hw, hw, c, generator=gen).requires_grad_()
    weight = (torch.randn(c, c // groups, 3, 3, generator=gen) * 0.2).requires_grad_()
    bias = torch.zeros(c).requires_grad_()
    gamma = (torch.rand(c, generator=gen) + 0.5).requires_grad_()
    beta = (torch.randn(c, generator=gen) * 0.1).requires_grad_()
    running = (torch.zeros(c), torch.ones(c))
    return x, weight, bias, gamma, beta, running


def contenders(mode, case, groups):
    x, weight, bias, gamma, beta, (rm, rv) = case
    params = (x, weight, bias, gamma, beta)
    training = mode != "infer"
    # The upstream gradient of the backward: fixed, contiguous, as a following layer would hand it over.
    c, hw = weight.shape[0], x.shape[1]
    grad_out = torch.randn(BATCH, hw, hw, c)

    def conv_step(backend):
        def go():
            for p in params:
                p.grad = None
            with torch.set_grad_enabled(mode != "infer"):
                out = conv_bn_act(x, weight, bias, groups=groups, bn_weight=gamma, bn_bias=beta, running_mean=rm,
                                  running_var=rv, training=training, activation="silu", backend=backend)
                if mode == "train_fwd_bwd":
                    out.backward(grad_out)
        return go

    if mode.startswith("bn_act"):
        with torch.no_grad():
            y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, 1, 1, groups)
        y_nchw = y.detach().requires_grad_()  # channels-last strides, as the conv returns it
        y_mc = y.detach().permute(0, 2, 3, 1).reshape(-1, c).requires_grad_()
        grad_mc = grad_out.reshape(-1, c)
        backward = mode == "bn_act_fwd_bwd"

        def ours():
            for p in (y_mc, gamma, beta):
                p.grad = None
            out = bn_act_cpu(y_mc, gamma, beta, rm, rv, 1e-5, 0.1, True, "silu")
            if backward:
                out.backward(grad_mc)

        def peer():
            for p in (y_nchw, gamma, beta):
                p.grad = None
            out = F.silu(F.batch_norm(y_nchw, rm, rv, gamma, beta, True, 0.1, 1e-5)).permute(0, 2, 3, 1)
            if backward:
                out.backward(grad_out)

        return {"cpp": ours, "torch": peer}
    return {"cpp": conv_step("cpp"), "torch": conv_step("torch")}


def run(args) -> list[H.Record]:
    device = torch.device("cpu")
    if not _ext.has_cpp():
        print(f"bench_bn_act: the extension is not built ({_ext.load_error()}); nothing measured.")
        return []
    repeats = args.repeats or (7 if args.quick else 15)
    H.print_bandwidth()
    records = []
    for name, (c, hw, groups) in SHAPES.items():
        if args.quick and name not in QUICK_SHAPES:
            continue
        case = make_case(c, hw, groups)
        for mode in (QUICK_MODES if args.quick else MODES):
            ms = H.time_interleaved(contenders(mode, case, groups), device, repeats)
            nbytes = MIN_TRAFFIC[mode] * BATCH * hw * hw * c * 4
            limit = H.bandwidth_extra(nbytes, ms["cpp"])
            records.append(H.make_record(
                f"conv_bn_silu_{mode}" if not mode.startswith("bn_act") else f"bn_silu_{mode[7:]}",
                f"{name}:out=[{BATCH},{c},{hw},{hw}],g={groups}", "cpp", "torch", ms["cpp"], ms["torch"], device,
                repeats=repeats, **limit,
                torch_frac_stream_bw=H.bandwidth_extra(nbytes, ms["torch"])["frac_stream_bw"],
            ))
            r = records[-1]
            print(f"{r.name:32s} {r.shape:42s} cpp {r.median_ms:9.3f} ms  torch {r.peer_median_ms:9.3f} ms  "
                  f"{r.ratio:.2f}x  cpp {r.extra['frac_stream_bw']:.2f} / torch {r.extra['torch_frac_stream_bw']:.2f} "
                  f"of STREAM bw", flush=True)
    return records


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 15, quick 7)")
    args = parser.parse_args()
    records = run(args)
    if records:
        print()
        H.print_table(records, extra_cols=("GB/s", "frac_stream_bw", "torch_frac_stream_bw"))
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
