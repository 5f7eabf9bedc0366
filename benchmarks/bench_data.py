"""Data loading: prepared dataset (DALI, torch) and source files (DALI) vs the PIL DataLoader.

    python -m benchmarks.bench_data [--quick] [--json PATH] [--threads N] [--batch B]
                                    [--sample DIR] [--pool DIR] [--prepared-dir DIR]

On each dataset (cxr-sample: 200 PNGs; cxr-pool: 582 PNGs, both read in place) the dataset is
first prepared (``python -m dinocxr_fast.prepare``, default stored size, ``--threads`` workers;
timed: images/s, stored bytes per image), then four loaders produce DINO-CXR's two 224 px views
per image on the CPU, in this one process, with the same parallelism (DALI: ``--threads``
threads; torch: as many DataLoader worker processes):

    PIL DataLoader   source PNGs, PIL decode + resample, torch ops (the reference)
    DALI source      source PNGs, DALI decode + operators
    DALI prepared    prepared pixels through external_source, DALI operators
    torch prepared   prepared pixels, PIL resample + torch ops in DataLoader workers

Loaders run in blocks of back-to-back epochs in the order A B C D D C B A, so that load from
other processes falls on all alike (see ``compare``). Reported per loader: the median epoch wall
time, images/s, ratio = PIL DataLoader time / this loader's time, the CPU time per image of the
whole process tree (workers included) and from it images/s per core (1000 / CPU ms per image,
less sensitive to a busy machine than the wall time), and the cores that rate implies for the
modeled H200 step (2,300-3,700 images/s, issue 18). Goals on the CPU: prepared >= 5x the PIL
DataLoader and >= 250 images/s per core; DALI from source >= 1.0x.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as H
from dinocxr_fast.data import ImageFolderSource, ViewsConfig, build_pretrain_loader

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
H200_IMAGES_S = (2300, 3700)  # the modeled vitaev2_s DINO-CXR step on an H200 (issue 18)
GOAL_PREPARED_RATIO, GOAL_PER_CORE, GOAL_SOURCE_DALI = 5.0, 250.0, 1.0


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
    """Blocks of back-to-back epochs in the order A B C C B A, so that load from other processes
    on a shared machine falls on all alike. Each loader runs in its steady state, as in training:
    DALI prefetches across the epoch boundary, the DataLoader restarts its workers' queue at each
    epoch. The first epoch of every block is left out of the medians: it may benefit from work
    queued during another loader's block. Returns name -> (median epoch ms, CPU ms per image)."""
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


def prepared_copy(source: Path, root: Path, threads: int):
    """Prepare ``source`` under ``root`` (timed); returns (dataset folder, result)."""
    from dinocxr_fast.data.prepared_write import Settings, prepare  # noqa: PLC0415

    out = root / source.name
    shutil.rmtree(out, ignore_errors=True)  # time a full prepare, not a no-op resume
    return out, prepare(source, out, Settings(), workers=threads, progress=False)


def bench_dataset(name: str, root: Path, work: Path, args) -> list[H.Record]:
    from dinocxr_fast.data.prepared import PreparedDataset  # noqa: PLC0415

    out, prep = prepared_copy(root, work, args.threads)
    views = ViewsConfig.dino_cxr()
    sources = {"source": ImageFolderSource(root, labelled=False),
               "prepared": PreparedDataset(out).source(labelled=False)}
    plan = {"PIL DataLoader": ("source", "torch"), "DALI source": ("source", "dali"),
            "DALI prepared": ("prepared", "dali"), "torch prepared": ("prepared", "torch")}
    loaders = {label: build_pretrain_loader(sources[src], views, args.batch, device="cpu", backend=backend,
                                            num_threads=args.threads, seed=0)
               for label, (src, backend) in plan.items()}
    images = len(loaders["PIL DataLoader"]) * args.batch
    try:
        result = compare(loaders, epochs=2 if args.quick else 4)
    finally:
        for loader in loaders.values():
            loader.close()
    pil_ms, _ = result["PIL DataLoader"]
    records = []
    for label, (ms, cpu_ms) in result.items():
        per_core = 1e3 / cpu_ms if cpu_ms > 0 else float("nan")
        records.append(H.make_record(
            name=f"{name} 2x224 {label}", shape=f"epoch of {images} images, batch {args.batch}",
            backend=f"{label} x{args.threads}", peer=f"PIL DataLoader x{args.threads}", median_ms=ms,
            peer_median_ms=pil_ms, device="cpu",
            img_s=round(images / ms * 1e3, 1), cpu_ms_img=round(cpu_ms, 2), img_s_per_core=round(per_core, 1),
            h200_cores=f"{math.ceil(H200_IMAGES_S[0] / per_core)}-{math.ceil(H200_IMAGES_S[1] / per_core)}",
            prepare_img_s=round(prep.images_per_s, 1), prepared_kib_img=round(prep.bytes / max(prep.images, 1) / 1024, 1),
        ))
    return records


def goals(records: list[H.Record]) -> list[str]:
    """One line per goal of issue 18 and loader, met or missed, from the records."""
    lines = []

    def check(r: H.Record, what: str, value: float, goal: float, unit: str) -> None:
        lines.append(f"{'met   ' if value >= goal else 'MISSED'} {r.name}: {what} {value:g}{unit} (goal >= {goal:g}{unit})")

    for r in records:
        label = r.backend.rsplit(" x", 1)[0]
        if "prepared" in label:
            check(r, "speed-up over the PIL DataLoader", r.ratio, GOAL_PREPARED_RATIO, "x")
            check(r, "images/s per core", r.extra["img_s_per_core"], GOAL_PER_CORE, "")
        elif label == "DALI source":
            check(r, "speed-up over the PIL DataLoader", r.ratio, GOAL_SOURCE_DALI, "x")
    return lines


def run(args) -> list[H.Record]:
    datasets = {"cxr-sample": Path(args.sample)}
    if not args.quick:
        datasets["cxr-pool"] = Path(args.pool)
    missing = [f"{n} ({p})" for n, p in datasets.items() if not p.is_dir()]
    if missing:
        raise SystemExit(f"bench_data: dataset(s) not found: {', '.join(missing)} (pass --sample / --pool)")
    work = Path(args.prepared_dir) if args.prepared_dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    records = []
    try:
        for name, root in datasets.items():
            records += bench_dataset(name, root, work, args)
    finally:
        if not args.prepared_dir:
            shutil.rmtree(work, ignore_errors=True)
    return records


def main() -> None:
    parser = H.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cpu")
    parser.add_argument("--sample", default=str(SHARED / "cxr-sample"), help="ImageFolder of X-rays (cxr-sample)")
    parser.add_argument("--pool", default=str(SHARED / "cxr-pool" / "images"), help="folder of X-rays (cxr-pool)")
    parser.add_argument("--prepared-dir", help="where the prepared copies go (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="DALI threads = DataLoader workers = prepare workers")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from dinocxr_fast.data import dali_available  # noqa: PLC0415

    if not dali_available():  # e.g. the GPU machine, where DALI is not installed
        print("nvidia-dali is not installed: the loader comparison was NOT measured")
        H.write_json([], args.json)
        return
    records = run(args)
    H.print_table(records, extra_cols=("img_s", "cpu_ms_img", "img_s_per_core", "h200_cores", "prepare_img_s",
                                       "prepared_kib_img"))
    print("\n".join(goals(records)))
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    H.write_json(records, args.json)


if __name__ == "__main__":
    main()
