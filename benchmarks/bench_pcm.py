"""ViTAEv2-S parallel convolution modules (PCM): the CUDA kernels against cuDNN and torch.compile.

    python -m benchmarks.bench_pcm [--quick] [--json PATH]

Every PCM of ViTAEv2-S at 224 px, batch 64, bf16 autocast (fp32 parameters, as the trainer runs):
conv3x3 -> BN -> SiLU -> conv3x3 -> BN -> SiLU -> conv3x3, in three modes:
  train_fwd     BatchNorm in training mode, forward only;
  train_fwd_bwd forward + backward (every parameter and the input, except the image of stage 1);
  infer         eval BatchNorm under no_grad.
Ours: ``ops.pcm(backend="cuda")`` (the chain as one op) and, as ``per_conv_ms``, three
``conv_bn_act(backend="cuda")`` calls (what ViTAEv2 runs today, one op per conv). Peers, same
process, same inputs: the eager PyTorch chain (cuDNN conv + BN + SiLU) in channels-last (the
model's layout, no permute copies) and in NCHW, and ``torch.compile`` of the channels-last chain.
Timing: CUDA events, L2 flushed before every run (benchmarks/_harness.py). Columns: TFLOP/s of
the convolutions (forward 2 MACs per multiply-add; backward twice that), the fraction of the
GPU's dense bf16 peak, GB/s of the minimum traffic (input and output once per pass), and the
goals of issue 8 on an H100: >= 1.5x the best of eager and compile on the grouped stages, >= 1x
on the dense stage 1, inference >= 2x eager.

``--wgmma`` also times the dense shapes on the sm_90a wgmma kernel (``cuda_wgmma_ms``; off by
default in the library until it has been verified on a Hopper GPU: run the GPU tests first).

``--quick`` (scripts/gpu_check.sh gives it 60 s) measures three shapes (dense stage 1, grouped
stages 2 and 4), training forward+backward and inference, without torch.compile unless
``--compile`` is given (compiling the chain takes tens of seconds per mode); the goal verdicts
against compile come from the full run. On a machine without a GPU it says so and exits.
"""
from __future__ import annotations

import importlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import _harness as H
from dinocxr_fast.models.vitaev2 import VITAEV2_S_PCM_SHAPES

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")

BATCH = 64
SHAPES = VITAEV2_S_PCM_SHAPES  # name: (c0, c1, c2, c3, groups, strides, input grid)
QUICK_SHAPES = ("s1_normal", "s2_normal", "s4_normal")
MODES = ("train_fwd", "train_fwd_bwd", "infer")
QUICK_MODES = ("train_fwd_bwd", "infer")


class EagerPCM(nn.Module):
    """The chain as PyTorch modules on NCHW tensors (channels-last strides or contiguous)."""

    def __init__(self, c0, c1, c2, c3, groups, strides):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, s, 1, groups=groups) for (a, b), s in zip(((c0, c1), (c1, c2), (c2, c3)), strides)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in (c1, c2))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.silu(bn(conv(x)))
        return self.convs[2](x)


def conv_flops(shape) -> float:
    """Forward multiply-adds x 2 of the three convolutions."""
    c0, c1, c2, c3, groups, strides, hw = shape
    flops, h = 0.0, hw
    for (a, b), s in zip(((c0, c1), (c1, c2), (c2, c3)), strides):
        h = (h - 1) // s + 1
        flops += 2.0 * BATCH * h * h * b * (a // groups) * 9
    return flops


def mode_flops(shape, mode, image_input) -> float:
    fwd = conv_flops(shape)
    if mode != "train_fwd_bwd":
        return fwd
    c0, c1, *_ , groups, strides, hw = shape
    first = 2.0 * BATCH * ((hw - 1) // strides[0] + 1) ** 2 * c1 * (c0 // groups) * 9
    return 3 * fwd - (first if image_input else 0.0)  # no data gradient of the image


def mode_bytes(shape, mode, elem=2) -> float:
    c0, c1, c2, c3, groups, strides, hw = shape
    h = hw
    for s in strides:
        h = (h - 1) // s + 1
    x, out = BATCH * hw * hw * c0 * elem, BATCH * h * h * c3 * elem
    return 2 * (x + out) if mode == "train_fwd_bwd" else x + out


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    if device.type != "cuda":
        print("bench_pcm compares the CUDA PCM kernels with cuDNN and torch.compile on a GPU: its TFLOP/s, "
              "GB/s and fraction of peak were NOT measured on this machine (no GPU).")
        return []
    from dinocxr_fast import _ext  # noqa: PLC0415

    if not _ext.has_cuda():
        print("bench_pcm: the extension was built without CUDA (rebuild with DINOCXR_CUDA=1); nothing measured.")
        return []
    torch.backends.cudnn.benchmark = True
    wgmma = _ext.require().wgmma_available(device.index or 0)
    if args.wgmma and not wgmma:
        print("--wgmma: this GPU / build has no sm_90a wgmma kernel; not measured.")
    peaks = H.gpu_peaks(device)
    repeats = 8 if args.quick else 30
    use_compile = args.compile or not args.quick
    if not use_compile:
        print("torch.compile is not measured with --quick (pass --compile, or run without --quick): the goal "
              "verdicts below compare against eager only.")
    compile_budget_s = 900.0
    compile_spent = 0.0
    records = []
    for name, shape in SHAPES.items():
        if args.quick and name not in QUICK_SHAPES:
            continue
        c0, c1, c2, c3, groups, strides, hw = shape
        torch.manual_seed(0)
        model_cl = EagerPCM(c0, c1, c2, c3, groups, strides).to(device).to(memory_format=torch.channels_last)
        model_nchw = EagerPCM(c0, c1, c2, c3, groups, strides).to(device)
        model_nchw.load_state_dict(model_cl.state_dict())
        image_input = c0 == 1  # stage 1's reduction cell reads the image: no input gradient
        tokens = torch.randn(BATCH, hw, hw, c0, device=device)
        x_tok = tokens.clone().requires_grad_(not image_input)
        x_cl = tokens.clone().permute(0, 3, 1, 2).requires_grad_(not image_input)  # channels-last view, like the model
        x_nchw = tokens.permute(0, 3, 1, 2).contiguous().requires_grad_(not image_input)

        convs, bns = model_cl.convs, model_cl.bns

        def ours_chain():
            bn = [(b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.momentum) for b in bns]
            return pcm_mod.pcm(x_tok, [c.weight for c in convs], [c.bias for c in convs], bn[0], bn[1],
                                strides=strides, groups=groups, training=bns[0].training, backend="cuda")

        def ours_per_conv():
            y = x_tok
            for i in range(3):
                kw = {}
                if i < 2:
                    b = bns[i]
                    kw = dict(bn_weight=b.weight, bn_bias=b.bias, running_mean=b.running_mean,
                              running_var=b.running_var, eps=b.eps, momentum=b.momentum, training=b.training,
                              activation="silu")
                y = conv_mod.conv_bn_act(y, convs[i].weight, convs[i].bias, stride=strides[i], groups=groups,
                                         backend="cuda", **kw)
            return y

        compiled = None
        want_compile = use_compile
        for mode in (QUICK_MODES if args.quick else MODES):
            train = mode != "infer"
            for m in (model_cl, model_nchw):
                m.train(train)

            def step(fn, x, mode=mode):
                def go():
                    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode != "infer"):
                        out = fn(x)
                        if mode == "train_fwd_bwd":
                            out.float().sum().backward()
                return go

            def ours_wgmma(x):
                _ext.require().conv_use_wgmma(True)
                try:
                    return ours_chain()
                finally:
                    _ext.require().conv_use_wgmma(False)

            fns = {
                "cuda": step(lambda x: ours_chain(), x_tok),
                "cuda_per_conv": step(lambda x: ours_per_conv(), x_tok),
                "eager_channels_last": step(model_cl, x_cl),
                "eager_nchw": step(model_nchw, x_nchw),
            }
            if args.wgmma and groups == 1 and wgmma:
                fns["cuda_wgmma"] = step(ours_wgmma, x_tok)
            if want_compile and compile_spent < compile_budget_s:
                if compiled is None:
                    compiled = torch.compile(model_cl)
                t0 = time.perf_counter()
                try:
                    step(compiled, x_cl)()  # compile outside the timing
                    torch.cuda.synchronize()
                    fns["torch.compile"] = step(compiled, x_cl)
                except Exception as exc:  # a compiler failure is a result, not a crash of the benchmark
                    print(f"{name} {mode}: torch.compile failed: {type(exc).__name__}: {exc}")
                compile_spent += time.perf_counter() - t0
            elif want_compile:
                print(f"{name} {mode}: torch.compile skipped (compile budget of {compile_budget_s:.0f} s spent)")
            ms = {}
            for key, fn in fns.items():
                try:
                    ms[key] = H.time_fn(fn, device, repeats)
                except Exception as exc:
                    print(f"{name} {mode} {key}: failed: {type(exc).__name__}: {exc}")
            peers = {k: v for k, v in ms.items() if not k.startswith("cuda")}
            if "cuda" not in ms or not peers:
                print(f"{name} {mode}: nothing to compare (see the failures above)")
                continue
            best_peer = min(peers, key=peers.get)
            flops = mode_flops(shape, mode, image_input)
            extra = {k + "_ms": round(v, 4) for k, v in ms.items() if k != "cuda"}
            extra["TFLOP/s"] = round(flops / ms["cuda"] / 1e9, 1)
            extra["GB/s"] = round(mode_bytes(shape, mode) / ms["cuda"] / 1e6, 1)
            if peaks:
                extra["frac_peak_bf16"] = round(flops / (ms["cuda"] * 1e-3) / peaks["bf16_flops"], 3)
            if mode == "infer":
                goal, vs = 2.0, ms.get("eager_channels_last", float("nan"))
            else:
                goal, vs = (1.5 if groups > 1 else 1.0), peers[best_peer]
            extra["goal"] = f">={goal}x"
            extra["goal_met"] = bool(vs / ms["cuda"] >= goal)
            records.append(H.make_record(
                f"pcm_{mode}", f"{name}:B={BATCH},{hw}x{hw},{c0}-{c1}-{c2}-{c3},g={groups},s={''.join(map(str, strides))}",
                "cuda", best_peer, ms["cuda"], peers[best_peer], device, **extra,
            ))
        del model_cl, model_nchw, compiled
        torch.cuda.empty_cache()
    return records


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--compile", action="store_true", help="measure torch.compile even with --quick")
    parser.add_argument("--wgmma", action="store_true", help="also time the dense shapes on the wgmma kernel")
    args = parser.parse_args()
    records = run(args)
    if records:
        H.print_table(records, extra_cols=("TFLOP/s", "frac_peak_bf16", "GB/s", "cuda_per_conv_ms", "cuda_wgmma_ms",
                                           "eager_channels_last_ms", "eager_nchw_ms", "torch.compile_ms", "goal",
                                           "goal_met"))
        met = sum(r.extra["goal_met"] for r in records)
        print(f"goals met: {met}/{len(records)} (grouped >= 1.5x best peer, dense stage 1 >= 1x, inference >= 2x eager)")
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
