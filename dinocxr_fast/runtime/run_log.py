"""What a run writes as it goes: one JSON line per logging step in metrics.jsonl, TensorBoard
scalars beside it, the start-up block, and a progress display (a bar with ETA on a terminal, plain
lines otherwise). The classification metrics (AUC, F1, ...) are ``dinocxr_fast/metrics.py``."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends to metrics.jsonl (resume keeps appending) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self.tensorboard_error: str | None = None
        self._start = time.monotonic()
        if enabled:
            self._open_tensorboard()

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
        except Exception as exc:  # noqa: BLE001 - TensorBoard is optional
            self.tensorboard_error = f"TensorBoard events not written ({exc}); pip install tensorboard"

    def truncate_after(self, step: int) -> None:
        """Drop the records past ``step``: a resumed run logs those steps again (a fresh run
        passes -1), so no step appears twice."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.path)
            if self._tb is not None:  # TensorBoard hides the events past the resumed step
                self._tb.close()
                self._open_tensorboard(purge_step=step + 1)

    def write(self, record: Mapping, step: int) -> None:
        if not self.enabled:
            return
        # wall_s: seconds since this command started, so quality can be read per wall-minute
        line = {**{k: _clean(v) for k, v in record.items()}, "wall_s": round(time.monotonic() - self._start, 2)}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",) and math.isfinite(float(value)):
                    self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def print_startup(what: str, fields: list[tuple[str, object]], stream=None) -> None:
    """The block every command prints before its work: what runs where, on what, for how long."""
    width = max(len(k) for k, _ in fields)
    lines = [f"== {what} =="] + [f"  {k:<{width}}  {v}" for k, v in fields]
    print("\n".join(lines), file=stream or sys.stderr, flush=True)
def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a line cut short by a kill: dropped


class Progress:
    """tqdm bar on a terminal; one plain line per update otherwise (logs, CI)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream=None, unit: str = "step",
                 desc: str | None = None):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        self.enabled = enabled
        self.unit, self.desc = unit, desc  # what is counted (step, epoch, batch) and of what work
        self._start, self._start_n = time.monotonic(), initial
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm  # noqa: PLC0415

                self._bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit=unit,
                                 desc=desc)
            except ImportError:
                self._bar = None

    def update(self, n: int, postfix: Mapping[str, str]) -> None:
        """Advance to step ``n`` and show ``postfix``; plain mode prints one line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
            self._bar.set_postfix(postfix, refresh=True)
        else:
            elapsed = time.monotonic() - self._start
            done = n - self._start_n
            eta = elapsed / done * (self.total - n) if done > 0 else float("nan")
            fields = " ".join(f"{k}={v}" for k, v in postfix.items())
            prefix = f"{self.desc}: " if self.desc else ""
            print(f"{prefix}{self.unit} {n}/{self.total} {fields} eta={_fmt_time(eta)}", file=self.stream, flush=True)
        self.n = n

    def set_total(self, total: int) -> None:
        """The run's length changed (schedules fitted to a time budget)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
