"""ViTAEv2 throughput, eager against torch.compile, and where the time goes.

    python -m benchmarks.bench_model [--quick] [--json PATH] [--device cpu|cuda] [--model NAME]
                                     [--batch N] [--size PX] [--no-compile] [--threads N]

Defaults: vitaev2_tiny in fp32 on the CPU, vitaev2_s under bf16 autocast on CUDA, 224 px, one
gray channel. Forward = eval mode under inference_mode; forward+backward = train mode, loss
``out.float().square().mean()``, gradients to every parameter. Records: backend ``eager`` (the
model with its ops on ``backend="auto"``) and ``torch.compile`` of the same model, both against
peer ``eager``, so ratio = eager_ms / ms; extra holds images/s.

Then a torch.profiler breakdown of one eager forward by module: PCM (parallel conv chain),
PRM (dilated reduction convs), attention (qkv + core + proj; the core alone beside it), MLP, and
the rest (LayerNorms, residual adds, pooling), as shares of the forward time (device time on
CUDA, CPU time on the CPU). Also the parameter count and GFLOPs of one forward (FLOPs = 2 MACs).

--quick: smaller batch, fewer repeats and no torch.compile on the CPU (a cold inductor compile of
even vitaev2_tiny takes a minute or more on a 2-core machine).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import _harness as H
from dinocxr_fast.models import create_model
from dinocxr_fast.models import layers as model_layers

# Modules whose forward is labelled for the profile, and the label.
COMPONENTS = {
    model_layers.ParallelConv: "pcm",
    model_layers.PyramidReduction: "prm",
    model_layers.Attention: "attention",
    model_layers.Mlp: "mlp",
}
# Free functions the model calls for the attention core (window and full).
CORE_FUNCTIONS = ("window_attention", "attention")


@contextlib.contextmanager
def labelled_forwards():
    """Wrap each component's forward (and the attention core) in a profiler range."""
    saved: list[tuple[object, str, Callable]] = []

    def wrap(owner, attr, label):
        original = getattr(owner, attr)

        def labelled(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        saved.append((owner, attr, original))
        setattr(owner, attr, labelled)

    try:
        for cls, label in COMPONENTS.items():
            wrap(cls, "forward", label)
        for name in CORE_FUNCTIONS:
            wrap(model_layers, name, "attention_core")
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def forward_shares(model: nn.Module, images: torch.Tensor, autocast) -> dict[str, float]:
    """Share of one eager forward spent in each component (0..1)."""
    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model.eval()
    with labelled_forwards(), torch.inference_mode(), autocast():
        for _ in range(2):  # warm-up outside the profile
            model(images)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            with record_function("model_forward"):
                model(images)
            if cuda:
                torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        if event.key in set(COMPONENTS.values()) | {"attention_core", "model_forward"}:
            totals[event.key] = event.device_time_total if cuda else event.cpu_time_total
    whole = totals.get("model_forward", 0.0) or 1.0
    shares = {label: totals.get(label, 0.0) / whole for label in ("pcm", "prm", "attention", "attention_core", "mlp")}
    shares["rest"] = max(0.0, 1.0 - shares["pcm"] - shares["prm"] - shares["attention"] - shares["mlp"])
    return shares


def forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


def run(args) -> tuple[list[H.Record], dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = args.model or ("vitaev2_s" if cuda else "vitaev2_tiny")
    batch = args.batch or (64 if cuda else (4 if args.quick else 16))
    use_compile = not args.no_compile and (cuda or not args.quick)
    repeats = 10 if args.quick else (30 if cuda else 7)
    dtype_name = "bf16-autocast" if cuda else "fp32"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    torch.manual_seed(0)
    model = create_model(name).to(device)
    images = torch.randn(batch, 1, args.size, args.size, device=device)
    params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, images[:1].float())
    shape = f"B={batch},1x{args.size}x{args.size},{dtype_name}"

    def step_fn(net: nn.Module, backward: bool) -> Callable[[], None]:
        if not backward:
            def forward():
                with torch.inference_mode(), autocast():
                    net(images)
            return forward

        def forward_backward():
            with autocast():
                loss = net(images).float().square().mean()
            loss.backward()
            for p in model.parameters():
                p.grad = None
        return forward_backward

    records, eager_ms = [], {}
    variants = [("eager", model)] + ([("torch.compile", torch.compile(model))] if use_compile else [])
    for backward in (False, True):
        model.train(backward)
        kind = "fwd_bwd" if backward else "fwd"
        for label, net in variants:
            ms = H.time_fn(step_fn(net, backward), device, repeats)
            if label == "eager":
                eager_ms[kind] = ms
            records.append(H.make_record(
                f"{name}_{kind}", shape, label, "eager", ms, eager_ms[kind], device,
                images_per_s=round(batch / ms * 1e3, 1),
            ))
            print(f"  {name} {kind:7s} {label:13s} {ms:9.2f} ms  {batch / ms * 1e3:9.1f} img/s", flush=True)

    shares = forward_shares(model, images, autocast)
    records[0].extra.update({f"share_{k}": round(v, 3) for k, v in shares.items()})
    summary = {"model": name, "params": params, "gflops_per_image": flops / 1e9, "shares": shares}
    return records, summary


def main() -> None:
    parser = H.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="vitaev2_tiny (CPU default), vitaev2_s (CUDA default), vitaev2_48m, vitaev2_b")
    parser.add_argument("--batch", type=int, help="images per step (default 16 CPU / 4 --quick / 64 CUDA)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels, a multiple of 32")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 avoids "
                        "OpenMP threads waiting on a busy core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records, summary = run(args)
    print()
    H.print_table(records, extra_cols=("images_per_s",))
    print(f"\n{summary['model']}: {summary['params']:,} parameters, "
          f"{summary['gflops_per_image']:.3f} GFLOPs per {args.size}px image (forward, 2 FLOPs per MAC)")
    print("share of one eager forward (profiler):")
    for label, share in summary["shares"].items():
        note = "  (inside attention)" if label == "attention_core" else ""
        print(f"  {label:15s} {100 * share:5.1f} %{note}")
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
