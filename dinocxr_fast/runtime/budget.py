"""``train.max_minutes``: the wall time of the whole command, from its start (before the heavy
imports) to the process's exit: set-up, backend planning, steps, evaluations at epoch ends,
checkpoints, the final evaluation and report, and the interpreter's exit.

The training loop asks, before every step, whether that step and everything after the loop
still fit in the time left: the step (the median of the recent steps), the work at the end of
the epoch when the step ends one (a kNN pass, a validation pass: as measured last time), the
job's final work (``TrainingJob.end_reserve``: a last kNN pass, the test scoring and the report),
the final checkpoint (the longest write measured) and the exit (``EXIT_S``). Every duration is
measured in this run; nothing is assumed about the machine but the exit allowance.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

EXIT_S = 2.0  # the loader's threads, TensorBoard's writer and the interpreter shutting down (1.4 s measured on 2 CPU cores)
RECENT = 8  # steps the step-time estimate looks back over


class Budget:
    def __init__(self, start: float, minutes: float | None, clock: Callable[[], float] | None = None):
        self.clock = clock or time.monotonic
        self.start = start
        self.deadline = start + float(minutes) * 60 if minutes else None
        self._steps: list[float] = []
        self._first_step: float | None = None
        self.checkpoint_s = 0.0

    @property
    def enabled(self) -> bool:
        return self.deadline is not None

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    # ---- measurements ---------------------------------------------------------------------------
    def step_took(self, seconds: float) -> None:
        """One optimiser step with its logging (and periodic checkpoint), not the epoch-end work."""
        if self._first_step is None:  # one-off costs (lazy init, warm-up): only used until others exist
            self._first_step = seconds
            return
        self._steps = (self._steps + [seconds])[-RECENT:]

    def checkpoint_took(self, seconds: float) -> None:
        self.checkpoint_s = max(self.checkpoint_s, seconds)

    def step_s(self) -> float:
        """The expected duration of the next step (0 before any was measured)."""
        if self._steps:
            return statistics.median(self._steps)
        return self._first_step or 0.0

    def end_s(self, end_reserve: float) -> float:
        """Seconds everything after the loop takes: the job's final work, the final checkpoint, the exit."""
        return end_reserve + self.checkpoint_s + EXIT_S

    # ---- decisions ------------------------------------------------------------------------------
    def fits(self, *, steps: int = 1, extra: float = 0.0, end_reserve: float = 0.0) -> bool:
        """Do ``steps`` more steps, ``extra`` seconds of other work and the end still fit?"""
        if self.deadline is None:
            return True
        return self.clock() + steps * self.step_s() + extra + self.end_s(end_reserve) <= self.deadline

    def steps_that_fit(self, end_reserve: float, per_step: float | None = None) -> int:
        """How many more steps fit before the end's reserve (at least 1)."""
        per_step = per_step or self.step_s()
        if self.deadline is None or per_step <= 0:
            return 1 << 62
        return max(int((self.left() - self.end_s(end_reserve)) / per_step), 1)
