"""The memory bandwidth this CPU gives a process, STREAM-style, for the limit beside each CPU figure.

Two of STREAM's kernels on torch tensors, with torch's thread count (the benchmark's own), arrays
of 128 MiB each (four times this machine's 32 MiB L3, so the traffic goes to DRAM):
copy ``b = a`` (2 arrays moved) and triad ``a = b + s * c`` (3 arrays moved), best of a few runs
as STREAM reports. Bytes are counted as STREAM counts them (no write-allocate read), so a kernel
with streaming stores may reach a fraction above 1.
"""
from __future__ import annotations

import time

import torch

ARRAY_BYTES = 128 * 1024 * 1024
_CACHE: dict[tuple[int, int], dict] = {}


def stream(array_bytes: int = ARRAY_BYTES, repeats: int = 5) -> dict:
    """{copy_GB/s, triad_GB/s, best_GB/s, threads, array_MiB}; measured once per process and size."""
    key = (array_bytes, torch.get_num_threads())
    if key in _CACHE:
        return _CACHE[key]
    n = array_bytes // 4
    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.full((n,), 0.5)  # written: pages are mapped

    def best_gbps(fn, moved: int) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return moved / best / 1e9

    copy = best_gbps(lambda: b.copy_(a), 2 * n * 4)
    triad = best_gbps(lambda: torch.add(b, c, alpha=3.0, out=a), 3 * n * 4)
    result = {"copy_GB/s": round(copy, 2), "triad_GB/s": round(triad, 2), "best_GB/s": round(max(copy, triad), 2),
              "threads": key[1], "array_MiB": array_bytes // 2**20}
    _CACHE[key] = result
    return result


def fraction(nbytes: int, ms: float, probe: dict) -> dict:
    """GB/s of ``nbytes`` moved in ``ms`` and its fraction of the probe's best bandwidth."""
    gbps = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")
    return {"GB/s": round(gbps, 2), "frac_stream_bw": round(gbps / probe["best_GB/s"], 3)}


def describe(probe: dict) -> str:
    return (f"STREAM-style bandwidth ({probe['threads']} threads, {probe['array_MiB']} MiB arrays): copy "
            f"{probe['copy_GB/s']:.1f} GB/s, triad {probe['triad_GB/s']:.1f} GB/s")
