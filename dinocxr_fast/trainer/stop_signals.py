"""SIGTERM and SIGINT as a request to stop at the next step boundary, with a checkpoint.

Under torchrun every rank must stop at the same step, or one leaves while the others wait for it
in the next all-reduce: ``requested()`` all-reduces the flag, so a signal to one rank is news to
every rank at the same step.
"""
from __future__ import annotations

import signal

from dinocxr_fast.runtime import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self, dist: distributed.DistInfo) -> None:
        self.dist = dist
        self.name: str | None = None  # of the first signal; what the run's stop line reports
        self._previous: dict = {}

    def install(self) -> None:
        def handler(signum, _frame):
            self.name = self.name or signal.Signals(signum).name  # a second one changes nothing

        self._previous = {s: signal.signal(s, handler) for s in SIGNALS}

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def requested(self) -> bool:
        """A signal reached this process, or (under torchrun) any rank. A collective: every rank
        calls it at the same point."""
        if self.dist.enabled:
            stopping = distributed.any_rank(self.name is not None)
            if stopping and not self.name:
                self.name = "a signal to another rank"
        return self.name is not None
