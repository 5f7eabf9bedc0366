"""DINO-CXR's fixed-size views against DINO's multi-crop, on the same model.

    python -m benchmarks.bench_views [--quick] [--json PATH] [--minutes M] [--size S] [--batch B]
                                     [--data ROOT] [--knn-data ROOT] [--out DIR]

The paper's claim is that two fixed-size views cut the compute of multi-crop (2 global + 8
local crops). Per view mode, the same vitaev2_tiny, batch and global size:

1. step time (median, the two modes' steps interleaved in one process) and FLOPs per step;
2. a pretraining run of ``--minutes`` wall time each, in its own process (so its peak memory is
   its own: the child's max RSS on the CPU, torch's peak allocation on a GPU, as the trainer logs
   it), with the kNN monitor every epoch: the kNN accuracy reached, and its gain per wall-minute.

Defaults: real X-rays when the shared data is beside the repository (pretraining on
``cxr-pool/images``, kNN on ``cxr-sample``), else the synthetic phantoms with their held-out
labelled phantoms. Local crops are 3/7 of the global size (DINO: 96 of 224), at least 32 px.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _harness as H
from dinocxr_fast.config import load_config
from dinocxr_fast.trainer.pretrain import PretrainJob

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = ("dino_cxr", "dino_multicrop")


def mode_sets(mode: str, args) -> list[str]:
    sets = [f"data.view_size={args.size}", f"optim.batch_size={args.batch}", f"data.views={mode}", *args.set]
    if mode == "dino_multicrop":
        sets += ["data.n_local=8", f"data.local_size={max(32, round(args.size * 3 / 7 / 16) * 16)}"]
    return sets


def time_steps(args, device: torch.device) -> dict[str, dict]:
    """ms/step of both modes, interleaved, on cached batches; FLOPs per step."""
    from benchmarks.bench_train import step_flops, step_fn  # noqa: PLC0415

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        for mode in MODES:
            cfg = load_config("tiny_cpu", sets=mode_sets(mode, args) + [
                "train.epochs=1000", "train.loss_check_every=1000000", "data.synthetic_count=128",
                "data.synthetic_size=256", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
                f"train.device={device.type}"] + (["data.loader=torch"] if device.type == "cuda" else []))
            job = PretrainJob(cfg, Path(tmp) / mode, show_progress=False)
            job.loader.set_epoch(0)
            it = iter(job.loader)
            cached = [next(it) for _ in range(2)]
            job.train_step(cached[0])
            jobs[mode] = (job, cached)
        try:
            times = H.time_interleaved({m: step_fn(job, cached, device) for m, (job, cached) in jobs.items()},
                                       device, repeats=args.steps)
            for mode, (job, cached) in jobs.items():
                views = cached[0]
                out[mode] = {"step_ms": round(times[mode], 2), "views": [list(v.shape[1:]) for v in views],
                             "gflops_per_step": round(step_flops(job, views) / 1e9, 2)}
        finally:
            for job, _ in jobs.values():
                job.close()
    return out


def pretrain_for(mode: str, args, run: Path) -> dict:
    """One budgeted pretraining run in a child process: its kNN trace over wall time and peak memory."""
    argv = [sys.executable, "-m", "dinocxr_fast.train", "pretrain", "--out", str(run), "--quiet",
            "--set", f"train.max_minutes={args.minutes}", "--set", "train.epochs=1000", "--set", "optim.warmup_epochs=100",
            "--set", f"train.knn_size={args.size}", "--set", "train.knn_every=1"]
    if args.data:
        argv += ["--data", args.data]
    argv += ["--knn-data", args.knn_data] if args.knn_data else ["--set", "train.knn_data=auto"]
    for s in mode_sets(mode, args):
        argv += ["--set", s]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode}: pretraining failed: {' '.join(argv)}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [(r["wall_s"], r["step"], r["knn_acc"]) for r in records if "knn_acc" in r]
    steps = [r for r in records if "loss" in r]
    start, end = knn[0], knn[-1]
    minutes = max((end[0] - start[0]) / 60, 1e-9)
    peak = max((r["peak_mem_mb"] for r in steps), default=usage.ru_maxrss / 1024)
    return {"command": " ".join(argv[1:]), "seconds": round(seconds, 1), "steps": steps[-1]["step"] if steps else 0,
            "knn_start": round(start[2], 4), "knn_end": round(end[2], 4), "knn_best": round(max(k[2] for k in knn), 4),
            "knn_gain_per_minute": round((end[2] - start[2]) / minutes, 4),
            "knn_trace": [(round(w), s, round(a, 4)) for w, s, a in knn],
            "peak_mem_mb": round(peak), "child_max_rss_mb": round(usage.ru_maxrss / 1024),
            "final_loss": round(steps[-1]["loss"], 4) if steps else None, "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = H.base_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining wall time per view mode")
    parser.add_argument("--size", type=int, default=64, help="view size (the global size for multi-crop)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per mode")
    parser.add_argument("--data", help="pretraining images (default: cxr-pool/images when present, else phantoms)")
    parser.add_argument("--knn-data", help="kNN ImageFolder (default: cxr-sample when present, else held-out phantoms)")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both modes")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.steps = min(args.minutes, 1.5), 5
    if args.data is None and (SHARED / "cxr-pool" / "images").is_dir():
        args.data = str(SHARED / "cxr-pool" / "images")
    if args.knn_data is None and (SHARED / "cxr-sample" / "val").is_dir() and args.data:
        args.knn_data = str(SHARED / "cxr-sample")
    device = torch.device(args.device)
    steps = time_steps(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs = {mode: pretrain_for(mode, args, out / mode) for mode in MODES}
    fixed, multi = (steps["dino_cxr"], runs["dino_cxr"]), (steps["dino_multicrop"], runs["dino_multicrop"])
    print(f"\n{'views':<15} {'ms/step':>8} {'GFLOP/step':>10} {'peak MB':>8} {'steps':>6} {'kNN start':>9} "
          f"{'kNN end':>8} {'kNN/min':>8}")
    for mode in MODES:
        s, r = steps[mode], runs[mode]
        print(f"{mode:<15} {s['step_ms']:>8.1f} {s['gflops_per_step']:>10.2f} {r['peak_mem_mb']:>8} {r['steps']:>6} "
              f"{r['knn_start']:>9.3f} {r['knn_end']:>8.3f} {r['knn_gain_per_minute']:>+8.4f}")
    print(f"multi-crop / fixed-size: {multi[0]['step_ms'] / fixed[0]['step_ms']:.2f}x time per step, "
          f"{multi[0]['gflops_per_step'] / fixed[0]['gflops_per_step']:.2f}x FLOPs, "
          f"{multi[1]['peak_mem_mb'] / fixed[1]['peak_mem_mb']:.2f}x peak memory ({device.type}, "
          f"{args.minutes} min per mode, load {os.getloadavg()[0]:.2f})")
    records = [H.make_record("view_mode_step", f"vitaev2_tiny,B={args.batch},{args.size}px", "dino_cxr",
                             "dino_multicrop", fixed[0]["step_ms"], multi[0]["step_ms"], device,
                             step={m: steps[m] for m in MODES}, pretrain={m: runs[m] for m in MODES},
                             minutes=args.minutes, data=args.data or "phantoms", knn_data=args.knn_data or "held-out phantoms")]
    H.write_json(records, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
