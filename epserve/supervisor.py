"""``epserve up`` keeps its deployment alive: a child that dies is started again, the rest keep serving.

``ChildLog`` reads a child's stderr on its own thread, passes every line on (to the log file, or
to our stderr) and keeps the last lines, so a failure can be reported with the child's own
error line (``error_line``) rather than "see its log".

``RestartPolicy`` decides when: a death is followed by a restart after a backoff (1 s, doubling
up to ``backoff_max_s``, reset when the child then stays up ``window_s``); a child that died
more than ``max_restarts`` times within ``window_s`` is given up on (its role decides what that
means for the deployment: ``deployment.LocalDeployment.wait``).

``RestartMetrics``: ``epserve_up_child_restarts_total{child}`` and ``epserve_up_child_up{child}``,
served on ``/metrics`` when ``epserve up --metrics`` is on.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Gauge

from epserve.process import start_daemon_thread

# a logging ERROR/CRITICAL record, an exception's last line, argparse's "prog: error: ...", or a process's
# own "attention_worker: --flag must be ..." line
ERROR_LINE = re.compile(r" (ERROR|CRITICAL) |^[\w.]*(Error|Exception)(:|$)|: error: |^(epserve|attention_worker|"
                        r"expert_worker|placement|gateway)[\w. -]*: ")
NUM_KEPT_LINES = 40


class ChildLog:
    """Tees one child's stderr (text lines) to ``sink`` and remembers its last lines."""

    def __init__(self, name: str, stream: IO[str], sink: IO[str] | None) -> None:
        self.name = name
        self._lines: deque[str] = deque(maxlen=NUM_KEPT_LINES)
        self._lock = threading.Lock()
        self._sink = sink
        self._thread = start_daemon_thread(lambda: self._pump(stream), f"log-{name}")

    def _pump(self, stream: IO[str]) -> None:
        sink = self._sink if self._sink is not None else sys.stderr
        for line in stream:
            with self._lock:
                self._lines.append(line.rstrip("\n"))
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):     # our stderr closed: keep remembering
                pass
        if self._sink is not None:
            self._sink.close()

    def wait_closed(self, timeout_s: float) -> None:
        """Wait until the child's stderr is read to its end (it exited), at most ``timeout_s``."""
        self._thread.join(timeout_s)

    def last_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def error_line(self, strict: bool = False) -> str:
        """The child's last line that reads like an error (else, unless ``strict``, its last line)."""
        return error_line(self.last_lines(), strict)


def error_line(lines: Iterable[str], strict: bool = False) -> str:
    kept = [line.strip() for line in lines if line.strip()]
    for line in reversed(kept):
        if ERROR_LINE.search(line) and not line.startswith("File "):
            return line
    return kept[-1] if kept and not strict else ""


@dataclass
class RestartPolicy:
    max_restarts: int = 5           # deaths within window_s before the child is given up on; 0 = never restart
    window_s: float = 600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.window_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("restart window and backoff must be positive, the maximum backoff at least the first")


@dataclass
class RestartState:
    """One child's deaths, as the supervisor sees them."""
    deaths: list[float] = field(default_factory=list)     # time.monotonic() of each death within the window
    next_start: float = 0.0                                # when the pending restart may run
    backoff_s: float = 0.0
    gave_up: bool = False

    def died(self, policy: RestartPolicy, now: float) -> bool:
        """Records a death; False when the child is given up on (too many deaths within the window)."""
        self.deaths = [t for t in self.deaths if now - t < policy.window_s] + [now]
        if len(self.deaths) > policy.max_restarts:
            self.gave_up = True
            return False
        self.backoff_s = (policy.backoff_initial_s if len(self.deaths) == 1
                          else min(max(self.backoff_s, policy.backoff_initial_s) * 2, policy.backoff_max_s))
        self.next_start = now + self.backoff_s
        return True


class RestartMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter("epserve_up_child_restarts", "Children of epserve up started again after they died",
                                ["child"], registry=self.registry)
        self.up = Gauge("epserve_up_child_up", "1 while the child process runs, 0 while it is down",
                        ["child"], registry=self.registry)
