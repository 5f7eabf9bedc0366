"""The DINO-CXR pretraining step end to end, in one process.

    python -m benchmarks.bench_train [--quick] [--json PATH] [--device cpu|cuda] [--arch A] [--batch B]
                                     [--size S] [--steps N] [--no-compile] [--multicrop]

Variants, each a full PretrainJob (student + EMA teacher + DINO head + fused loss + optimiser):
  fused            every op on backend "auto" (C++/CUDA/Triton where built)
  torch eager      every op on its plain-PyTorch backend
  torch.compile    the torch backend under torch.compile (skipped on the CPU with --quick)
and, for the fused variant: the data pipeline alone (images/s), the model step alone on cached
batches, and ms/step split into forward+loss / backward / optimiser+EMA (synchronised phases).
GPU rows add peak memory and model FLOP utilisation (FLOPs counted by torch's FlopCounterMode,
over the bf16 dense peak). Defaults: vitaev2_tiny, batch 32, 128 px on the CPU; vitaev2_s, batch 64,
224 px, bf16 on a GPU (the paper's setting).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _harness as H
from dinocxr_fast.config import load_config
from dinocxr_fast.trainer.pretrain import PretrainJob


def make_cfg(args, device: torch.device, backend: str, compile_: bool) -> dict:
    preset = "dino_cxr_vitaev2_s" if device.type == "cuda" else "tiny_cpu"
    sets = [f"train.device={device.type}", f"dino.backend={backend}", f"train.compile={str(compile_).lower()}",
            f"optim.batch_size={args.batch}", f"data.view_size={args.size}", "train.epochs=1000",
            "train.loss_check_every=1000000", "data.synthetic_count=256", "data.synthetic_size=256",
            "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0"]
    if args.arch:
        sets.append(f"model.arch={args.arch}")
    if args.multicrop:
        sets += ["data.views=dino_multicrop", "data.n_local=8", f"data.local_size={max(32, args.size * 3 // 7 // 32 * 32)}"]
    if device.type == "cuda":
        sets.append("data.loader=torch")  # no DALI on the GPU machine
    return load_config(preset, sets=sets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(job: PretrainJob, views) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = job.forward_loss(views)
        job.backward(loss)
    job.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def prepare(args, device: torch.device, name: str, backend: str, compile_: bool, tmp: Path):
    """A PretrainJob, a few cached batches, and two warm-up steps (compilation included)."""
    cfg = make_cfg(args, device, backend, compile_)
    job = PretrainJob(cfg, tmp / name.replace(" ", "_"), show_progress=False)
    job.loader.set_epoch(0)
    it = iter(job.loader)
    cached = [next(it) for _ in range(min(4, len(job.loader)))]
    for views in cached[:2]:
        job.train_step(views)
    sync(device)
    return job, it, cached


def step_fn(job: PretrainJob, cached: list, device: torch.device):
    state = {"i": 0}

    def step():
        job.train_step(cached[state["i"] % len(cached)])
        state["i"] += 1
        sync(device)

    return step


def fused_details(job: PretrainJob, it, cached: list, device: torch.device, n: int) -> dict:
    """ms per phase (synchronised), the data pipeline alone, and a loop fed by the loader."""
    out = {}
    phase = {"forward+loss": 0.0, "backward": 0.0, "optimizer+ema": 0.0}
    for i in range(n):
        views = cached[i % len(cached)]
        t = time.perf_counter()
        loss, _, _ = job.forward_loss(views)
        sync(device)
        phase["forward+loss"] += time.perf_counter() - t
        t = time.perf_counter()
        job.backward(loss)
        sync(device)
        phase["backward"] += time.perf_counter() - t
        t = time.perf_counter()
        job.update()
        sync(device)
        phase["optimizer+ema"] += time.perf_counter() - t
    out["phases_ms"] = {k: round(v * 1e3 / n, 2) for k, v in phase.items()}

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            job.loader.set_epoch(job.loader.epoch + 1)
            it = iter(job.loader)
            return next(it)

    t = time.perf_counter()
    produced = sum(next_batch()[0].shape[0] for _ in range(n))
    out["data_images_per_s"] = produced / (time.perf_counter() - t)
    wait, images, t_all = 0.0, 0, time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        views = next_batch()
        wait += time.perf_counter() - t
        job.train_step(views)
        images += views[0].shape[0]
    sync(device)
    total = time.perf_counter() - t_all
    out["with_data_images_per_s"] = images / total
    out["data_wait_frac"] = wait / total
    out["flops_per_step"] = step_flops(job, cached[0])
    return out


def run(args) -> list[H.Record]:
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 64 if device.type == "cuda" else 32
    if args.size is None:
        args.size = 224 if device.type == "cuda" else 128
    if args.steps is None:
        args.steps = 20 if device.type == "cuda" else 7
    variants = [("fused", "auto", False), ("torch eager", "torch", False)]
    if not args.no_compile and not (args.quick and device.type == "cpu"):
        variants.append(("torch.compile", "torch", True))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {name: prepare(args, device, name, backend, compile_, Path(tmp)) for name, backend, compile_ in variants}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # round-robin over the variants, so a change of machine load hits them alike
            times = H.time_interleaved({name: step_fn(job, cached, device) for name, (job, _, cached) in jobs.items()},
                                       device, repeats=args.steps)
            for name, (job, _, cached) in jobs.items():
                images = cached[0][0].shape[0]
                results[name] = {"step_ms": times[name], "images_per_s": images / times[name] * 1e3}
                print(f"{name}: {times[name]:.1f} ms/step, {results[name]['images_per_s']:.1f} img/s", flush=True)
            if device.type == "cuda":  # peak memory per variant: measured one at a time
                for name, (job, _, cached) in jobs.items():
                    torch.cuda.reset_peak_memory_stats(device)
                    step_fn(job, cached, device)()
                    results[name]["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            job, it, cached = jobs["fused"]
            results["fused"].update(fused_details(job, it, cached, device, args.steps))
        finally:
            for job, _, _ in jobs.values():
                job.close()
    fused = results["fused"]  # step_ms is the median over --steps synchronised steps
    arch = args.arch or ("vitaev2_s" if device.type == "cuda" else "vitaev2_tiny")
    shape = f"{arch},B={args.batch},{args.size}px,{'multicrop' if args.multicrop else 'dino_cxr'}"
    records = []
    peaks = H.gpu_peaks(device) if device.type == "cuda" else None
    for name, r in results.items():
        if name == "fused":
            continue
        extra = {"images_per_s": round(fused["images_per_s"], 1), "peer_images_per_s": round(r["images_per_s"], 1)}
        if "peak_mem_mb" in r:
            extra.update(peak_mem_mb=round(fused["peak_mem_mb"]), peer_peak_mem_mb=round(r["peak_mem_mb"]))
        records.append(H.make_record("pretrain_step", shape, "fused (auto)", name, fused["step_ms"], r["step_ms"],
                                     device, **extra))
    detail = {"phases_ms": fused["phases_ms"], "data_images_per_s": round(fused["data_images_per_s"], 1),
              "with_data_images_per_s": round(fused["with_data_images_per_s"], 1),
              "data_wait_frac": round(fused["data_wait_frac"], 3),
              "gflops_per_step": round(fused["flops_per_step"] / 1e9, 1)}
    if peaks:
        detail["mfu"] = round(fused["flops_per_step"] / (fused["step_ms"] * 1e-3) / peaks["bf16_flops"], 4)
    records.append(H.make_record("pretrain_step_detail", shape, "fused (auto)", "-", fused["step_ms"],
                                 fused["step_ms"], device, **detail))
    return records


def main() -> None:
    parser = H.base_parser(__doc__)
    parser.add_argument("--arch")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--multicrop", action="store_true", help="classic DINO multi-crop instead of DINO-CXR views")
    args = parser.parse_args()
    records = run(args)
    H.print_table(records[:-1], extra_cols=("images_per_s", "peer_images_per_s", "peak_mem_mb", "peer_peak_mem_mb"))
    print("fused step detail:", records[-1].extra)
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
