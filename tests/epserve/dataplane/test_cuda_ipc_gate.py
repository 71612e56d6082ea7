"""``StepGate`` with real threads against a model of the device: members are attention ranks' step
threads; a step's device work ends a little after it started. Checked: a capture never overlaps a step
in flight or starting, every capture that is asked for happens (nothing waits out its deadline), and the
waits that cannot be met end at their deadline."""

from __future__ import annotations

import random
import threading
import time

from epserve.dataplane.cuda_ipc_gate import StepGate

DEADLINE_S = 10.0
CAPTURE_S = 3e-3          # host time of a capture
LATENCY_S = 2e-3          # device time of a step after it started


class Device:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: list[tuple[int, float]] = []       # (member, start)
        self.captures: list[tuple[int, float, float]] = []     # (member, start, end)

    def start(self, member: int) -> float:
        with self.lock:
            started = time.monotonic()
            self.steps.append((member, started))
            return started

    def capture(self, member: int) -> None:
        start = time.monotonic()
        time.sleep(CAPTURE_S)
        with self.lock:
            self.captures.append((member, start, time.monotonic()))

    def overlaps(self) -> list[tuple]:
        """(capture, step) pairs where the step was in flight during the capture, or started in it."""
        return [(c, s) for c in self.captures for s in self.steps if s[1] < c[2] and s[1] + LATENCY_S > c[1]]


def run_member(gate: StepGate, device: Device, member: int, plan: list[bool], log: list) -> None:
    """``plan``: whether each step asks to capture first."""
    for capture in plan:
        time.sleep(random.uniform(0, 1e-3))            # the next announcement
        deadline = time.monotonic() + DEADLINE_S
        captures = gate.arrive(member, capture, deadline)
        if captures:
            device.capture(member)
        gate.start(member, deadline)
        started = device.start(member)
        time.sleep(random.uniform(0, 2e-3))            # enqueueing the step
        gate.finish(member, lambda: time.monotonic() >= started + LATENCY_S)
        log.append((member, captures, capture))


def serve(plans: dict[int, list[bool]], gate: StepGate) -> tuple[Device, list]:
    device, log = Device(), []
    threads = [threading.Thread(target=run_member, args=(gate, device, m, plan, log), daemon=True)
               for m, plan in plans.items()]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert time.monotonic() - started < DEADLINE_S, "something waited out a deadline"
    return device, log


def test_a_capture_never_overlaps_a_step_in_flight():
    """Three attention ranks, 30 steps each, captures at random: no overlap, none deferred."""
    rng = random.Random(7)
    plans = {rank: [rng.random() < 0.3 for _ in range(30)] for rank in range(3)}
    gate = StepGate()
    device, log = serve(plans, gate)
    assert device.overlaps() == []
    assert gate.num_deferred == 0
    assert sum(captured for _, captured, _ in log) == sum(capture for _, _, capture in log) > 5


def test_without_the_gate_the_model_catches_the_overlap():
    """The same plans with every member going ahead on its own: the model sees a capture while another
    rank's step is in flight — the check above can fail."""
    class NoGate(StepGate):
        def arrive(self, member, capture, deadline) -> bool:
            return capture

        def start(self, member, deadline) -> None:
            pass

        def finish(self, member, done) -> None:
            pass

    random.seed(1)
    device, _ = serve({rank: [True] * 20 for rank in range(3)}, NoGate())
    assert device.overlaps() != []


def test_a_capture_waits_for_a_step_still_being_enqueued():
    """Started (``start`` returned) but not finished: in flight, whatever the device says yet."""
    gate = StepGate()
    gate.arrive(0, False, time.monotonic() + 1)
    gate.start(0, time.monotonic() + 1)
    threading.Timer(0.2, gate.finish, args=(0, None)).start()
    start = time.monotonic()
    assert gate.arrive(1, True, start + DEADLINE_S) is True
    assert time.monotonic() - start >= 0.2


def test_a_step_waits_for_a_capture_that_runs_or_waits():
    """Rank 1 waits to capture until rank 0's device work ends; rank 0's next step starts after the capture."""
    gate = StepGate()
    gate.arrive(0, False, time.monotonic() + 1)
    gate.start(0, time.monotonic() + 1)
    ends = time.monotonic() + 0.2
    gate.finish(0, lambda: time.monotonic() >= ends)
    captured = []

    def capture() -> None:
        assert gate.arrive(1, True, time.monotonic() + DEADLINE_S) is True
        time.sleep(0.1)
        captured.append(time.monotonic())
        gate.start(1, time.monotonic() + DEADLINE_S)

    thread = threading.Thread(target=capture)
    thread.start()
    time.sleep(0.05)                                   # rank 1 waits to capture now
    gate.arrive(0, False, time.monotonic() + DEADLINE_S)
    gate.start(0, time.monotonic() + DEADLINE_S)       # held back until the capture is over
    started = time.monotonic()
    thread.join(DEADLINE_S)
    assert captured and started >= captured[0] >= ends


def test_a_capture_that_cannot_find_a_quiet_device_gives_up_at_its_deadline():
    gate = StepGate()
    gate.arrive(0, False, time.monotonic() + 1)
    gate.start(0, time.monotonic() + 1)
    gate.finish(0, lambda: False)                      # its device work never ends
    start = time.monotonic()
    assert gate.arrive(0, True, start + 0.2) is False
    assert 0.2 <= time.monotonic() - start < 1.0
    gate.start(0, time.monotonic() + 1)                # no capture waits: it starts at once
    assert gate.num_deferred == 1


def test_stopping_ends_the_waits():
    stopping = threading.Event()
    gate = StepGate(stopping)
    gate.arrive(0, False, time.monotonic() + 1)
    gate.start(0, time.monotonic() + 1)
    gate.finish(0, lambda: False)
    threading.Timer(0.1, stopping.set).start()
    start = time.monotonic()
    assert gate.arrive(1, True, start + DEADLINE_S) is False
    assert time.monotonic() - start < 1.0
