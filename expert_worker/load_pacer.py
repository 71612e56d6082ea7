"""Pacing of live expert loading (``--expert-load-duty-cycle``).

A map change loads experts while this worker (and, on a shared host, the attention workers)
keep serving. On a GPU the copies run on the copy engine, but on a CPU deployment they take
the same cores as serving: loading 20 MB in one burst slowed every decode step in flight by
~35% (bench/results/rebalance_live_cpu.md). ``LoadPacer`` spreads the work instead: after
each unit of loading (one expert's tensors) it sleeps so that loading takes at most
``duty_cycle`` of the wall time. The change takes longer; no step is slowed by much.
"""

from __future__ import annotations

import time


class LoadPacer:
    def __init__(self, duty_cycle: float, clock=time.perf_counter, sleep=time.sleep) -> None:
        if not 0 < duty_cycle <= 1:
            raise ValueError(f"--expert-load-duty-cycle must be in (0, 1], got {duty_cycle}")
        self.duty_cycle = duty_cycle
        self._clock, self._sleep = clock, sleep
        self._since = clock()
        self.slept_s = 0.0

    def start(self) -> None:
        """Begin a paced load (time before it is not counted as loading)."""
        self._since = self._clock()

    def tick(self) -> None:
        """One unit of loading is done: sleep long enough to keep the duty cycle."""
        if self.duty_cycle >= 1:
            return
        busy = self._clock() - self._since
        pause = busy * (1 / self.duty_cycle - 1)
        if pause > 0:
            self._sleep(pause)
            self.slept_s += pause
        self._since = self._clock()
