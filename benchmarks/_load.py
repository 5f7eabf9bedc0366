"""How busy the machine was while a benchmark ran, from /proc (Linux).

A benchmark's own threads are not "load": what spoils a timing is the CPU time *other* processes
took. So the run's figure is ``other_cores``: all CPUs' busy time over the run (/proc/stat: user,
nice, system, irq, softirq and steal; idle and iowait are idle) less this process's own CPU time
and that of its reaped children (/proc/self/stat utime, stime, cutime, cstime), divided by the
wall time, i.e. how many cores other work kept busy on average. Live child processes (data loader
workers, compile workers) count as the benchmark's own: their time is only in cutime once reaped,
so the live descendants' utime+stime+cutime+cstime are added. The load average is recorded
beside it but is not the criterion: it counts the benchmark's own threads too. A run is ``busy``
when ``other_cores`` is above ``BUSY_LIMIT_CORES``; benchmarks/_harness.py refuses to write such
results unless asked.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

BUSY_LIMIT_CORES = 0.5  # other processes' CPU, in cores averaged over the run
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_ticks(proc_stat: str) -> int:
    """Non-idle clock ticks of all CPUs from the aggregate ``cpu`` line of /proc/stat."""
    fields = proc_stat.splitlines()[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"/proc/stat does not start with the aggregate cpu line: {proc_stat[:60]!r}")
    values = [int(x) for x in fields[1:9]] + [0] * (8 - len(fields[1:9]))
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal  # guest time is already inside user


def own_ticks(self_stat: str) -> int:
    """utime + stime + cutime + cstime (fields 14-17) from /proc/self/stat. The command name in
    field 2 may hold spaces and parentheses, so the fields are counted from its last ')'."""
    rest = self_stat.rsplit(")", 1)[1].split()  # rest[0] is field 3
    return sum(int(x) for x in rest[11:15])


def parent_pid(stat: str) -> int:
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4


def descendant_ticks(stats: dict[int, str], root: int) -> int:
    """own_ticks summed over the live descendants of ``root`` (``stats``: pid -> /proc/pid/stat)."""
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        try:
            children.setdefault(parent_pid(stat), []).append(pid)
        except (IndexError, ValueError):
            continue  # a process that vanished mid-read
    total, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += own_ticks(stats[pid])
        todo.extend(children.get(pid, []))
    return total


def _process_stats() -> dict[int, str]:
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text()
            except OSError:
                pass  # exited meanwhile
    return stats


@dataclasses.dataclass(frozen=True)
class Snapshot:
    wall: float
    busy: int  # clock ticks, all CPUs
    own: int  # clock ticks, this process and its reaped children
    loadavg: tuple[float, float, float]


def _read_proc(name: str) -> str:
    return Path("/proc", name).read_text()


def snapshot(read: Callable[[str], str] = _read_proc, clock: Callable[[], float] = time.monotonic,
             processes: Callable[[], dict[int, str]] = _process_stats, pid: int | None = None) -> Snapshot | None:
    """The counters now, or None where /proc cannot be read (not Linux)."""
    try:
        busy = busy_ticks(read("stat"))
        own = own_ticks(read("self/stat")) + descendant_ticks(processes(), os.getpid() if pid is None else pid)
        loadavg = tuple(float(x) for x in read("loadavg").split()[:3])
    except (OSError, ValueError, IndexError):
        return None
    return Snapshot(clock(), busy, own, loadavg)


def summarize(start: Snapshot | None, end: Snapshot | None, ticks_per_s: float = CLOCK_TICKS,
              limit: float = BUSY_LIMIT_CORES) -> dict:
    """The run's load record: load averages at start and end, other processes' CPU seconds and
    cores, and ``busy``. Without /proc the load is unknown and the run counts as busy."""
    if start is None or end is None:
        return {"other_cores": None, "busy": True, "why": "the load could not be read (/proc missing)"}
    wall = max(end.wall - start.wall, 1e-9)
    other_s = max(0, (end.busy - start.busy) - (end.own - start.own)) / ticks_per_s
    other_cores = other_s / wall
    return {
        "loadavg_start": list(start.loadavg),
        "loadavg_end": list(end.loadavg),
        "wall_s": round(wall, 1),
        "other_cpu_s": round(other_s, 2),
        "other_cores": round(other_cores, 3),
        "busy_limit_cores": limit,
        "busy": other_cores > limit,
    }


class LoadMonitor:
    """Snapshots at ``start()`` and at each ``summary()`` call."""

    def __init__(self, **sources):
        self._sources = sources  # snapshot()'s keyword arguments, for tests
        self.start()

    def start(self) -> None:
        self._start = snapshot(**self._sources)

    def summary(self) -> dict:
        return summarize(self._start, snapshot(**self._sources))


def describe(load: dict) -> str:
    """One line for the console."""
    if load.get("other_cores") is None:
        return f"machine load: unknown ({load.get('why', '')})"
    state = "BUSY" if load["busy"] else "quiet"
    return (f"machine load: {state}: other processes used {load['other_cores']:.2f} cores on average over "
            f"{load['wall_s']:.0f} s (limit {load['busy_limit_cores']}); load average "
            f"{load['loadavg_start'][0]:.2f} at the start, {load['loadavg_end'][0]:.2f} at the end")
