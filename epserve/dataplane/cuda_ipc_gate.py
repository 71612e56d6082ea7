"""When the step threads of one ``cuda_ipc`` expert server may capture a CUDA graph, and start a step.

Legend: M micro-batch slots of an attention rank (the members of one of its groups: 1 or 2).

Why: with two micro-batches an attention rank interleaves its slots layer by layer (it sends slot 1's
layer l only after it has received slot 0's layer l - 1, and so on), so once a slot's step is enqueued
on the expert's GPU its kernels spin until the *other* slot's step makes progress. A 48-layer deployment
hung at start-up on an H100 when slot 0's thread ended a graph capture (``capture_end``: instantiation,
module loading) while slot 1's replayed kernels spun waiting on the attention rank, which waited on
slot 0 (bench/results/two_micro_batches_hang_h100.txt). This gate keeps captures apart from device work
in flight. It is not yet proven on a GPU (``EPSERVE_GPU_TWO_MICRO_BATCHES=1`` lets the attention worker
try it there).

Words: a *member* is one step thread, (attention rank, slot). A *group* is one attention step of one
rank: the micro-batch steps it announced together (``STEP_GROUP``, ``STEP_GROUP_SIZE``; group 0 or one
slot: a group of its own). A member is *in flight* from its group's admission until its step's device
work has finished (``finish``'s ``done``; on host memory, when the step's host work returns).

Per step, a member calls (``cuda_ipc_step.StepServer``):
  ``arrive(member, group, size, capture, deadline)`` → True: capture now (it holds the capture section);
  ``start(member, deadline)``: ends its capture section, returns once its group is admitted;
  enqueues the step (replay or eagerly), then ``finish(member, done)``.

Invariants (``tests/epserve/dataplane/test_cuda_ipc_gate.py`` checks the first three with threads):
1. A capture runs only while no member (the capturer's previous step included) is in flight, and
   one at a time.
2. No group is admitted while a capture runs or waits to run: no step starts during a capture.
3. A group is admitted whole: once all its M members have arrived and every capture of theirs is
   over. So a capture never waits for a member of its own group — that member's kernels would wait,
   through the attention rank's interleaving, for the capturer's.
4. Every wait is bounded. A capture waits only for admitted steps; all members of an admitted group
   are admitted (a late one is let through at once), so their device work depends only on the attention
   rank and ends, at the latest, when its spin budget does. An admission waits for its group's
   arrivals (the attention rank announces them together) and for captures (which never wait for an
   admission). Each wait also ends at its deadline or when the server stops: a capture then does not
   happen (the step runs eagerly; the shape is captured the next time it comes), an admission goes
   ahead with a warning. ``StepServer`` gives a capture a second (``CAPTURE_WAIT_S``: a step's device
   work drains in milliseconds) and an admission the data-plane timeout.

Cost: a member of a group of two starts only once its partner's thread has arrived (tens of µs).
Not covered: the first eager run of a shape loads kernels too (Triton, lazily loaded CUDA modules);
if loading one waits for the other slot's spinning kernels, that run could hang the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Member = tuple[int, int]            # (attention rank, slot)
Done = Callable[[], bool]           # whether a finished step's device work has ended (a CUDA event's query)
DEVICE_POLL_S = 1e-3                # a waiting capture checks the device this often (events do not notify)
STOP_POLL_S = 0.05                  # other waits: how often they check that the server is stopping
MAX_SHORT_GROUPS = 64               # groups admitted without a member, kept for its late arrival


@dataclass
class _Group:
    key: tuple[int, int] | None     # (attention rank, group number); None: a group of its own
    size: int
    arrived: set[Member] = field(default_factory=set)
    admitted: bool = False


class StepGate:
    """Shared by the step threads of one expert server; every method is thread safe."""

    def __init__(self, stopping: threading.Event | None = None) -> None:
        self._cond = threading.Condition()
        self._stopping = stopping if stopping is not None else threading.Event()
        self._groups: dict[tuple[int, int], _Group] = {}    # groups not yet admitted, or admitted short
        self._current: dict[Member, _Group] = {}             # member → the group of the step it arrived with
        self._admitted: set[Member] = set()                   # admitted, step not finished on the host yet
        self._running: dict[Member, Done] = {}                # finished on the host, maybe not on the device
        self._pending: set[Member] = set()                    # members waiting to capture
        self._capturer: Member | None = None
        self.num_deferred = 0                                 # captures given up (the step ran eagerly)

    def arrive(self, member: Member, group: int, size: int, capture: bool, deadline: float) -> bool:
        """``member`` has a step of ``group`` (of ``size`` members); ``capture``: it wants to capture
        first. → True once it may (it holds the capture section until ``start``), False: run eagerly."""
        with self._cond:
            entry = self._group(member[0], group, size)
            entry.arrived.add(member)
            self._current[member] = entry
            self._cond.notify_all()             # its group may be complete now
            if not capture:
                return False
            if entry.admitted:      # late: the group went ahead, its other members' kernels wait on this one
                self.num_deferred += 1
                return False
            self._pending.add(member)
            try:
                if self._wait(lambda: self._capturer is None and self._idle(), deadline, DEVICE_POLL_S):
                    self._capturer = member
                    return True
            finally:
                self._pending.discard(member)
                self._cond.notify_all()
            self.num_deferred += 1
            logger.warning("micro-batch slot %d of attention rank %d: no quiet device to capture on within the "
                           "deadline; the step runs eagerly", member[1], member[0])
            return False

    def start(self, member: Member, deadline: float) -> None:
        """End ``member``'s capture, if any; return once its group is admitted (it is in flight then)."""
        with self._cond:
            entry = self._current.pop(member)
            if self._capturer == member:
                self._capturer = None
                self._cond.notify_all()
            if entry.admitted:      # by a group-mate (or it is late): only a running capture holds it back
                self._wait(lambda: self._capturer is None, deadline, STOP_POLL_S)
                self._admitted.add(member)
                self._forget(entry)
                return
            ready = self._wait(lambda: entry.admitted or self._admissible(entry), deadline, STOP_POLL_S)
            if not entry.admitted:
                if not ready:
                    logger.warning("attention rank %d: a step's micro-batch slots (%d of %d arrived) started at "
                                   "the deadline, not held back any longer", member[0], len(entry.arrived),
                                   entry.size)
                entry.admitted = True
                self._admitted |= entry.arrived
                self._cond.notify_all()
            self._admitted.add(member)
            self._forget(entry)

    def finish(self, member: Member, done: Done | None) -> None:
        """``member``'s step is enqueued (or abandoned); ``done``: whether its device work has ended
        (None: it has)."""
        with self._cond:
            self._admitted.discard(member)
            if done is None:
                self._running.pop(member, None)
            else:
                self._running[member] = done
            self._cond.notify_all()

    # -- under the lock ----------------------------------------------------------------------
    def _group(self, attention_rank: int, number: int, size: int) -> _Group:
        if number <= 0 or size <= 1:
            return _Group(None, 1)
        key = (attention_rank, number)
        if key not in self._groups:
            self._groups[key] = _Group(key, size)
        return self._groups[key]

    def _admissible(self, entry: _Group) -> bool:
        """All members arrived, no capture running or waiting (its own members' included)."""
        return len(entry.arrived) >= entry.size and self._capturer is None and not self._pending

    def _idle(self) -> bool:
        """No member in flight: none admitted and unfinished, every finished step's device work ended."""
        if self._admitted:
            return False
        self._running = {m: done for m, done in self._running.items() if not done()}
        return not self._running

    def _forget(self, entry: _Group) -> None:
        """Drop an admitted group once all its members are through; keep a few that went ahead short."""
        if entry.key is None or entry.key not in self._groups:
            return
        if len(entry.arrived) >= entry.size:
            del self._groups[entry.key]
            return
        short = [key for key, g in self._groups.items() if g.admitted]
        for key in short[:max(len(short) - MAX_SHORT_GROUPS, 0)]:
            del self._groups[key]

    def _wait(self, ready: Callable[[], bool], deadline: float, poll_s: float) -> bool:
        """Until ``ready()`` (True), the deadline or the server stopping (False)."""
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return False
            self._cond.wait(min(left, poll_s))
        return True
