"""When the step threads of one ``cuda_ipc`` expert server may capture a CUDA graph, and start a step.

Legend: none (a member is one attention rank's step thread, ``cuda_ipc_step_server.StepServer``).

Why: an expert worker's device work for a step spins on flags that its attention rank sets as its own
step goes on. Capturing a graph (``torch.cuda.graph``: a device synchronize on entry, instantiation and
module loading on exit) waits for the device, so it must not overlap a step whose end depends on
launches that have not been made yet. Each step thread enqueues its attention rank's whole step — every
micro-batch slot, in the rank's own order (``StepServer``) — so the work it leaves in flight always
completes on the attention rank's progress alone. This gate keeps captures apart from that work anyway
(one thread per attention rank: another rank's steps may be in flight), and steps apart from captures.

History: with one step thread per micro-batch slot two micro-batches hung at start-up on an H100
twice: first (no gate) with slot 0's thread in ``capture_end`` while slot 1's replayed kernels spun
waiting on the attention rank, which waited on slot 0 (bench/results/two_micro_batches_hang_h100.txt);
then, with a gate that started the slots of a step together, in the first two-slot step, eager, before
any capture (bench/results/two_micro_batches_gate_h100.txt). The likeliest cause (reproduced on a CPU
model, not yet confirmed on a GPU): one slot's thread stopped on the host in a call that waits for the
device — a kernel loaded for the first time, among others — while the other slot's layers, enqueued
ahead, waited through the attention rank for the first slot's next launch. One thread per attention
rank replaced them (tests/epserve/dataplane/test_cuda_ipc_step_server.py).

Per step, a member calls:
  ``arrive(member, capture, deadline)`` → True: capture now (it holds the capture section until ``start``);
  ``start(member, deadline)``: ends its capture section, returns once no capture runs or waits;
  enqueues the step (replays or eagerly), then ``finish(member, done)``.

Invariants (``tests/epserve/dataplane/test_cuda_ipc_gate.py`` checks them with threads):
1. A capture runs only while no member (the capturer's previous step included) is in flight — started
   and not finished on the host, or finished with device work not yet ended — and one at a time.
2. No step starts while a capture runs or waits to run.
3. Every wait is bounded. A capture waits only for steps in flight, whose device work depends only on
   their attention ranks (see above) and ends, at the latest, when its spin budget does; a start waits
   only for captures. Each wait also ends at its deadline or when the server stops: a capture then does
   not happen (the step runs eagerly; the shape is captured the next time it comes), a start goes
   ahead with a warning. ``StepServer`` gives a capture a second (``CAPTURE_WAIT_S``: a step's device
   work drains in milliseconds) and a start the data-plane timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

Member = int                        # an attention rank (its step thread)
Done = Callable[[], bool]           # whether a finished step's device work has ended (CUDA events' queries)
DEVICE_POLL_S = 1e-3                # a waiting capture checks the device this often (events do not notify)
STOP_POLL_S = 0.05                  # other waits: how often they check that the server is stopping


class StepGate:
    """Shared by the step threads of one expert server; every method is thread safe."""

    def __init__(self, stopping: threading.Event | None = None) -> None:
        self._cond = threading.Condition()
        self._stopping = stopping if stopping is not None else threading.Event()
        self._started: set[Member] = set()                    # started, step not finished on the host yet
        self._running: dict[Member, Done] = {}                # finished on the host, maybe not on the device
        self._pending: set[Member] = set()                    # members waiting to capture
        self._capturer: Member | None = None
        self.num_deferred = 0                                 # captures given up (the step ran eagerly)

    def arrive(self, member: Member, capture: bool, deadline: float) -> bool:
        """``member`` has a step; ``capture``: it wants to capture first. → True once it may (it holds
        the capture section until ``start``), False: run eagerly."""
        if not capture:
            return False
        with self._cond:
            self._pending.add(member)
            try:
                if self._wait(lambda: self._capturer is None and self._idle(), deadline, DEVICE_POLL_S):
                    self._capturer = member
                    return True
            finally:
                self._pending.discard(member)
                self._cond.notify_all()
            self.num_deferred += 1
        logger.warning("attention rank %d: no quiet device to capture on within the deadline; the step runs "
                       "eagerly", member)
        return False

    def start(self, member: Member, deadline: float) -> None:
        """End ``member``'s capture, if any; return once no capture runs or waits (it is in flight then)."""
        with self._cond:
            if self._capturer == member:
                self._capturer = None
                self._cond.notify_all()
            if not self._wait(lambda: self._capturer is None and not self._pending, deadline, STOP_POLL_S):
                logger.warning("attention rank %d: a step started at the deadline while a capture ran or "
                               "waited", member)
            self._started.add(member)

    def finish(self, member: Member, done: Done | None) -> None:
        """``member``'s step is enqueued (or abandoned); ``done``: whether its device work has ended
        (None: it has)."""
        with self._cond:
            self._started.discard(member)
            if done is None:
                self._running.pop(member, None)
            else:
                self._running[member] = done
            self._cond.notify_all()

    # -- under the lock ----------------------------------------------------------------------
    def _idle(self) -> bool:
        """No member in flight: none started and unfinished, every finished step's device work ended."""
        if self._started:
            return False
        self._running = {m: done for m, done in self._running.items() if not done()}
        return not self._running

    def _wait(self, ready: Callable[[], bool], deadline: float, poll_s: float) -> bool:
        """Until ``ready()`` (True), the deadline or the server stopping (False)."""
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return False
            self._cond.wait(min(left, poll_s))
        return True
