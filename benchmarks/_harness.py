"""Shared timing and reporting for the benchmarks (issue 2's convention).

Each benchmark is ``python -m benchmarks.<name> [--quick] [--json PATH]``; it prints a table and
writes records {name, shape, backend, peer, median_ms, peer_median_ms, ratio, device,
torch_version} where ratio = peer_median_ms / median_ms (above 1: ours is faster).

CPU: median of at least 7 timed runs after warm-up. CUDA: CUDA events after warm-up, the L2
flushed (a 256 MB buffer overwritten) before every timed run.

Every record also carries the machine's load over the run (benchmarks/_load.py: the CPU time
other processes took, from when the arguments were parsed to when the results are written) and
``busy``; ``--json`` refuses to write a busy run unless ``--allow-busy`` is given. CPU kernel
benchmarks put their bytes moved beside a STREAM-style probe of the machine
(benchmarks/_bandwidth.py, ``bandwidth_extra``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from benchmarks import _bandwidth, _load

# HBM bandwidth (bytes/s) and dense bf16 tensor throughput (FLOP/s) by device name, for the
# fraction-of-roofline columns. H100 SXM: 3.35 TB/s, 989 TFLOP/s bf16 dense.
GPU_PEAKS = {
    "H100": {"bandwidth": 3.35e12, "bf16_flops": 989e12},
    "H200": {"bandwidth": 4.8e12, "bf16_flops": 989e12},
    "A100": {"bandwidth": 2.0e12, "bf16_flops": 312e12},
}


@dataclasses.dataclass
class Record:
    name: str
    shape: str
    backend: str
    peer: str
    median_ms: float
    peer_median_ms: float
    ratio: float
    device: str
    torch_version: str
    extra: dict = dataclasses.field(default_factory=dict)


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def gpu_peaks(device: torch.device | str) -> dict | None:
    name = device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks
    return None


def time_cpu(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 7)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def time_cuda(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of fn() in milliseconds, L2 flushed before each run."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _L2_FLUSH.setdefault(device, torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_fn(fn: Callable[[], object], device: torch.device | str, repeats: int | None = None) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, repeats or 20)
    return time_cpu(fn, repeats or 7)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int = 9) -> dict[str, float]:
    """Median time of each fn in ms, the fns run round-robin (a, b, c, a, b, c, ...) so that a
    change of machine load during the measurement hits every contender alike. On CUDA each run is
    timed with events after an L2 flush, as in time_cuda."""
    device = torch.device(device)
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 7)):
        for name, fn in fns.items():
            times[name].append(time_cuda(fn, repeats=1, warmup=0) if device.type == "cuda" else time_cpu_once(fn))
    return {name: statistics.median(v) for name, v in times.items()}


def time_cpu_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def make_record(name, shape, backend, peer, median_ms, peer_median_ms, device, **extra) -> Record:
    return Record(
        name=name,
        shape=str(shape),
        backend=backend,
        peer=peer,
        median_ms=round(median_ms, 4),
        peer_median_ms=round(peer_median_ms, 4),
        ratio=round(peer_median_ms / median_ms, 3) if median_ms > 0 else float("nan"),
        device=device_name(device),
        torch_version=torch.__version__,
        extra=extra,
    )


def print_table(records: Iterable[Record], extra_cols: tuple[str, ...] = ()) -> None:
    records = list(records)
    header = ["name", "shape", "backend", "median_ms", "peer", "peer_median_ms", "ratio", *extra_cols]
    rows = [
        [r.name, r.shape, r.backend, f"{r.median_ms:.3f}", r.peer, f"{r.peer_median_ms:.3f}", f"{r.ratio:.2f}x",
         *(str(r.extra.get(c, "")) for c in extra_cols)]
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if records:
        print(f"device: {records[0].device}; torch {records[0].torch_version}")


def run_metadata() -> dict:
    """Where a result came from: commit (with "-dirty" for uncommitted changes), UTC date, command.

    ``DINOCXR_COMMIT`` names the commit where the tree has no .git (a copy on the GPU machine)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = os.environ.get("DINOCXR_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    code = ("dinocxr_fast", "csrc", "kernels", "benchmarks", ":(exclude)benchmarks/results")  # results are not code
    if "DINOCXR_COMMIT" not in os.environ and commit != "unknown" and git("status", "--porcelain",
                                                                          "--untracked-files=no", "--", *code):
        commit += "-dirty"
    module = Path(sys.argv[0]).stem
    command = " ".join(["python -m benchmarks." + module if module.startswith("bench") else sys.argv[0],
                        *map(shlex.quote, sys.argv[1:])])
    return {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "benchmark": module, "command": command}


# The run's load is measured from here (import: the benchmark's start) or from when
# base_parser()'s arguments are parsed, to write_json.
_RUN_LOAD = _load.LoadMonitor()
_ALLOW_BUSY = False


class BusyMachine(SystemExit):
    """Raised (exit status 1, the message on stderr) instead of writing results measured on a busy machine."""


def write_json(records: Iterable[Record], path: str | Path | None, allow_busy: bool | None = None,
               load: dict | None = None) -> None:
    """The records as JSON, each stamped with run_metadata() and the run's load (benchmarks/report.py
    reads these). Prints the load; refuses (BusyMachine) when other processes kept more than half a
    core busy unless ``allow_busy`` (default: the ``--allow-busy`` flag), which marks them busy."""
    load = load if load is not None else _RUN_LOAD.summary()
    print(_load.describe(load))
    if not path:
        return
    allow_busy = _ALLOW_BUSY if allow_busy is None else allow_busy
    if load["busy"] and not allow_busy:
        raise BusyMachine(f"not writing {path}: the machine was busy ({_load.describe(load)}); rerun on a quiet "
                          f"machine, or pass --allow-busy to write the records marked busy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**run_metadata(), "busy": bool(load["busy"]), "load": load}
    path.write_text(json.dumps([{**dataclasses.asdict(r), **meta} for r in records], indent=2) + "\n")
    print(f"wrote {path}" + (" (marked busy)" if load["busy"] else ""))


def bandwidth_extra(nbytes: int, ms: float) -> dict:
    """Extra columns for a CPU case moving ``nbytes`` in ``ms``: GB/s, its fraction of this
    machine's STREAM-style bandwidth (probed once per process, same threads) and the probe."""
    probe = _bandwidth.stream()
    return {"bytes": int(nbytes), **_bandwidth.fraction(nbytes, ms, probe),
            "stream_copy_GB/s": probe["copy_GB/s"], "stream_triad_GB/s": probe["triad_GB/s"]}


def print_bandwidth() -> None:
    """Runs the probe (if not yet run) and prints it: call it before the timings, so that a probe of
    a few seconds does not sit between the contenders."""
    print(_bandwidth.describe(_bandwidth.stream()), flush=True)


class _BenchParser(argparse.ArgumentParser):
    """Parsing the arguments starts the run's load measurement and sets --allow-busy for write_json."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        global _ALLOW_BUSY
        parsed = super().parse_args(args, namespace)
        _ALLOW_BUSY = bool(getattr(parsed, "allow_busy", False))
        _RUN_LOAD.start()
        return parsed


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = _BenchParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (under a minute on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="write the records as JSON to PATH")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-busy", action="store_true",
                        help="write --json results even when other processes kept more than half a core busy "
                             "during the run (the records are marked busy)")
    return parser
