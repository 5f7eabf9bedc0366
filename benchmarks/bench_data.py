"""Data loading: DALI pipeline vs the PIL + torch DataLoader, images/s for DINO-CXR views.

    python -m benchmarks.bench_data [--quick] [--json PATH] [--data DIR] [--threads N] [--batch B]

Both loaders read the real-X-ray sample (../shared/data/cxr-sample, 200 PNGs, read in place),
produce the same views (two 224 px views per image by default: random-resized crop, flip,
brightness/contrast jitter, blur, solarisation, normalisation; identical parameters, drawn in
Python) on the CPU, with the same parallelism: DALI with ``--threads`` threads, the DataLoader
with as many persistent worker processes, in the same process. Reported: the median wall time of
an epoch (drop_last batches) in the steady state (see ``compare``), images/s, and the CPU time
spent per image by the whole process tree. ratio = PIL DataLoader time / DALI time (above 1:
DALI is faster).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from benchmarks import _harness as H
from dinocxr_fast.data import ImageFolderSource, ViewsConfig, build_pretrain_loader

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cxr-sample"


def tree_cpu_seconds() -> float:
    """User + system CPU time of this process and all its descendants (DataLoader workers and
    their fork server included), from /proc; 0.0 where /proc is not available."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier and pid not in tree}
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def timed_epochs(loader, epochs: int) -> tuple[list[float], float, int]:
    """Run ``epochs`` epochs back to back; return the wall ms of each, and the CPU seconds and
    images of all but the first (which may carry work queued before the block began)."""
    times, cpu0, images = [], 0.0, 0
    for e in range(epochs):
        if e == 1:
            cpu0 = tree_cpu_seconds()
        start = time.perf_counter()
        n = sum(views[0].shape[0] for views in loader)
        times.append((time.perf_counter() - start) * 1e3)
        images += n if e else 0
    return times, tree_cpu_seconds() - cpu0, images


def compare(loaders: dict, epochs: int) -> dict:
    """Blocks of back-to-back epochs in the order A B B A, so that load from other processes on
    a shared machine falls on both alike. Each loader runs in its steady state, as in training:
    DALI prefetches across the epoch boundary, the DataLoader restarts its workers' queue at each
    epoch. The first epoch of every block is left out of the medians: it may benefit from work
    queued during the other loader's block."""
    names = list(loaders)
    for loader in loaders.values():  # warm-up: workers started, pipeline built
        sum(1 for _ in loader)
    wall = {n: [] for n in names}
    cpu = {n: [0.0, 0] for n in names}
    for name in names + names[::-1]:
        times, seconds, images = timed_epochs(loaders[name], epochs)
        wall[name] += times[1:]
        cpu[name][0] += seconds
        cpu[name][1] += images
    return {n: (statistics.median(wall[n]), 1e3 * cpu[n][0] / max(cpu[n][1], 1)) for n in names}


def run(args) -> list[H.Record]:
    root = Path(args.data)
    if not (root / "train").is_dir():
        raise SystemExit(f"bench_data: the X-ray sample is not at {root} (pass --data DIR)")
    source = ImageFolderSource(root, labelled=False)
    configs = {"dino_cxr 2x224": ViewsConfig.dino_cxr()}
    if not args.quick:
        configs["dino multicrop 2x224+8x96"] = ViewsConfig.dino_multicrop()
    records = []
    for name, views in configs.items():
        loaders = {
            backend: build_pretrain_loader(source, views, args.batch, device="cpu", backend=backend,
                                           num_threads=args.threads, seed=0)
            for backend in ("dali", "torch")
        }
        images = len(loaders["dali"]) * args.batch
        result = compare(loaders, epochs=2 if args.quick else 4)
        for loader in loaders.values():
            loader.close()
        (dali_ms, dali_cpu), (pil_ms, pil_cpu) = result["dali"], result["torch"]
        records.append(H.make_record(
            name=f"views {name}", shape=f"epoch of {images} images, batch {args.batch}", backend=f"dali cpu x{args.threads}",
            peer=f"PIL DataLoader x{args.threads}", median_ms=dali_ms, peer_median_ms=pil_ms, device="cpu",
            dali_img_s=round(images / dali_ms * 1e3, 1), pil_img_s=round(images / pil_ms * 1e3, 1),
            dali_cpu_ms_img=round(dali_cpu, 2), pil_cpu_ms_img=round(pil_cpu, 2),
        ))
    return records


def main() -> None:
    parser = H.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cpu")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="ImageFolder of X-rays (default: the shared cxr-sample)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from dinocxr_fast.data import dali_available  # noqa: PLC0415

    if not dali_available():  # e.g. the GPU machine, where DALI is not installed
        print("nvidia-dali is not installed: the DALI vs PIL DataLoader comparison was NOT measured")
        H.write_json([], args.json)
        return
    if not Path(args.data).is_dir():
        print(f"{args.data} not found: the DALI vs PIL DataLoader comparison was NOT measured")
        H.write_json([], args.json)
        return
    records = run(args)
    H.print_table(records, extra_cols=("dali_img_s", "pil_img_s", "dali_cpu_ms_img", "pil_cpu_ms_img"))
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
