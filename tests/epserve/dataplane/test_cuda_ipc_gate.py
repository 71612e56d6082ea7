"""``StepGate`` with real threads against a model of the device: a group's steps stay in flight until
every member of the group has started (the attention rank interleaves the slots layer by layer, so one
slot's kernels spin until the other slot's step runs). Checked: a capture never overlaps a step in
flight or starting, every capture that is asked for happens (nothing waits out its deadline), and the
waits that cannot be met end at their deadline."""

from __future__ import annotations

import random
import threading
import time

import pytest

from epserve.dataplane.cuda_ipc_gate import StepGate

DEADLINE_S = 10.0
CAPTURE_S = 3e-3          # host time of a capture
LATENCY_S = 2e-3          # device time of a step once its whole group runs


class Device:
    """Steps in flight: a group's steps end LATENCY_S after its last member started (or never, if one
    does not start: until ``budget_s``, as a spin budget running out)."""

    def __init__(self, budget_s: float = 60.0) -> None:
        self.lock = threading.Lock()
        self.budget_s = budget_s
        self.starts: dict[tuple, dict] = {}       # (attention rank, group) → {member: start time}
        self.sizes: dict[tuple, int] = {}
        self.steps: list[tuple] = []              # (member, group key, start)
        self.captures: list[tuple] = []           # (member, start, end)

    def start(self, member, group: tuple, size: int) -> None:
        with self.lock:
            self.starts.setdefault(group, {})[member] = time.monotonic()
            self.sizes[group] = size
            self.steps.append((member, group, self.starts[group][member]))

    def end_of(self, group: tuple) -> float:
        """When the group's device work ends (inf while a member has not started)."""
        with self.lock:
            starts = self.starts.get(group, {})
            if len(starts) < self.sizes.get(group, 1):
                return min(starts.values(), default=float("inf")) + self.budget_s
            return max(starts.values()) + LATENCY_S

    def done(self, group: tuple):
        return lambda: time.monotonic() >= self.end_of(group)

    def capture(self, member) -> None:
        start = time.monotonic()
        time.sleep(CAPTURE_S)
        self.captures.append((member, start, time.monotonic()))

    def overlaps(self) -> list[tuple]:
        """(capture, step) pairs where the step was in flight during the capture, or started in it."""
        found = []
        for capturer, c0, c1 in self.captures:
            for member, group, s0 in self.steps:
                if s0 < c1 and self.end_of(group) > c0:
                    found.append(((capturer, c0, c1), (member, group, s0, self.end_of(group))))
        return found


def run_slot(gate: StepGate, device: Device, member, plan: list[tuple[int, int, bool]], announced, finished,
             log: list) -> None:
    """``plan``: (group, size, capture) per step; waits for the attention rank's announcement of each."""
    rank = member[0]
    for group, size, capture in plan:
        announced[rank][group].wait(DEADLINE_S)
        time.sleep(random.uniform(0, 1e-3))            # the threads wake in any order
        deadline = time.monotonic() + DEADLINE_S
        captures = gate.arrive(member, group, size, capture, deadline)
        if captures:
            device.capture(member)
        gate.start(member, deadline)
        device.start(member, (rank, group), size)
        time.sleep(random.uniform(0, 2e-3))            # enqueueing the step
        gate.finish(member, device.done((rank, group)))
        log.append((member, group, captures, capture))
        finished[(member, group)].set()


def attention_rank(rank: int, plans: dict, announced, finished) -> None:
    """Announce group g + 1 once every member of group g has finished enqueueing it (finish_step)."""
    groups = sorted({g for slot_plan in plans.values() for g, _, _ in slot_plan})
    for g in groups:
        announced[rank][g].set()
        members = [m for m, slot_plan in plans.items() if any(step[0] == g for step in slot_plan)]
        assert all(finished[(m, g)].wait(DEADLINE_S) for m in members), f"group {g} of rank {rank} stuck"


def serve(plans: dict[tuple, list[tuple[int, int, bool]]], gate: StepGate | None = None) -> tuple[Device, list]:
    """Each member's thread runs its plan; each attention rank announces its groups in order."""
    gate = gate if gate is not None else StepGate()
    device, log = Device(), []
    ranks = {m[0] for m in plans}
    announced = {r: {g: threading.Event() for m, p in plans.items() if m[0] == r for g, _, _ in p} for r in ranks}
    finished = {(m, g): threading.Event() for m, p in plans.items() for g, _, _ in p}

    threads = [threading.Thread(target=run_slot, args=(gate, device, m, plans[m], announced, finished, log),
                                daemon=True) for m in plans]
    threads += [threading.Thread(target=attention_rank, args=(r, {m: p for m, p in plans.items() if m[0] == r},
                                                              announced, finished), daemon=True) for r in ranks]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert time.monotonic() - started < DEADLINE_S, "something waited out a deadline"
    return device, log


def two_slot_plan(captures: dict[int, set[int]], num_groups: int = 8) -> dict:
    return {(0, slot): [(g, 2, g in captures[slot]) for g in range(1, num_groups + 1)] for slot in (0, 1)}


@pytest.mark.parametrize("captures", [{0: {2}, 1: set()}, {0: set(), 1: {2}}, {0: {2, 5}, 1: {2, 3, 6}}],
                         ids=["slot0", "slot1", "both"])
def test_a_capture_never_overlaps_a_step_in_flight(captures):
    """One attention rank, two slots, steps announced as groups of two; captures as asked."""
    gate = StepGate()
    device, log = serve(two_slot_plan(captures), gate)
    assert device.overlaps() == []
    asked = sorted((m, g) for m, g, _, capture in log if capture)
    assert sorted((m, g) for m, g, captured, _ in log if captured) == asked
    assert gate.num_deferred == 0


def test_without_the_gate_the_model_catches_the_overlap():
    """The same plan with each slot going ahead on its own (what the expert server did before): the
    model sees a capture while the other slot's step is in flight — the check above can fail."""
    class NoGate(StepGate):
        def arrive(self, member, group, size, capture, deadline) -> bool:
            return capture

        def start(self, member, deadline) -> None:
            pass

        def finish(self, member, done) -> None:
            pass

    random.seed(1)
    device, _ = serve(two_slot_plan({0: set(range(2, 9)), 1: set(range(2, 9))}), NoGate())
    assert device.overlaps() != []


def test_two_attention_ranks_and_steps_of_one_micro_batch():
    """Two attention ranks whose steps are groups of two or of one (slot 0 alone: a prefill), captures
    everywhere at random: no overlap, none deferred, nothing waits out a deadline."""
    rng = random.Random(7)
    plans: dict[tuple, list] = {(r, s): [] for r in (0, 1) for s in (0, 1)}
    for r in (0, 1):
        for g in range(1, 25):
            size = rng.choice([1, 2, 2])
            for s in range(size):
                plans[(r, s)].append((g, size, rng.random() < 0.3))
    gate = StepGate()
    device, log = serve(plans, gate)
    assert device.overlaps() == []
    assert gate.num_deferred == 0
    assert sum(captured for _, _, captured, _ in log) == sum(capture for _, _, _, capture in log) > 5


def test_a_missing_member_and_its_late_arrival():
    """A group of two whose slot 1 does not come: slot 0 starts at the deadline. When slot 1 comes late,
    it starts at once and may not capture (its partner's kernels wait on it); a capture asked meanwhile
    by another rank waits for the short group's device work, here until the spin budget runs out."""
    gate = StepGate()
    device = Device(budget_s=0.3)
    start = time.monotonic()
    assert gate.arrive((0, 0), 1, 2, False, start + 0.2) is False
    gate.start((0, 0), start + 0.2)
    assert 0.2 <= time.monotonic() - start < 1.0
    device.start((0, 0), (0, 1), 2)
    gate.finish((0, 0), device.done((0, 1)))

    assert gate.arrive((1, 0), 1, 1, True, time.monotonic() + DEADLINE_S) is True
    assert time.monotonic() - start >= 0.3                                # slot 0's kernels ran out first
    gate.start((1, 0), time.monotonic() + DEADLINE_S)
    gate.finish((1, 0), None)

    late = time.monotonic()
    assert gate.arrive((0, 1), 1, 2, True, late + DEADLINE_S) is False    # refused at once
    gate.start((0, 1), late + DEADLINE_S)
    assert time.monotonic() - late < 0.1
    gate.finish((0, 1), None)
    assert gate.num_deferred == 1


def test_a_capture_waits_for_a_step_still_being_enqueued():
    """Admitted (``start`` returned) but not finished: in flight, whatever the device says yet."""
    gate = StepGate()
    gate.arrive((0, 0), 0, 1, False, time.monotonic() + 1)
    gate.start((0, 0), time.monotonic() + 1)
    threading.Timer(0.2, gate.finish, args=((0, 0), None)).start()
    start = time.monotonic()
    assert gate.arrive((1, 0), 0, 1, True, start + DEADLINE_S) is True
    assert time.monotonic() - start >= 0.2


def test_a_capture_that_cannot_find_a_quiet_device_gives_up_at_its_deadline():
    gate = StepGate()
    gate.arrive((0, 0), 0, 1, False, time.monotonic() + 1)
    gate.start((0, 0), time.monotonic() + 1)
    gate.finish((0, 0), lambda: False)                 # its device work never ends
    start = time.monotonic()
    assert gate.arrive((0, 1), 0, 1, True, start + 0.2) is False
    assert 0.2 <= time.monotonic() - start < 1.0
    gate.start((0, 1), time.monotonic() + 1)           # no capture waits: it starts at once
    assert gate.num_deferred == 1


def test_stopping_ends_the_waits():
    stopping = threading.Event()
    gate = StepGate(stopping)
    gate.arrive((0, 0), 3, 2, False, time.monotonic() + DEADLINE_S)
    threading.Timer(0.1, stopping.set).start()
    start = time.monotonic()
    gate.start((0, 0), start + DEADLINE_S)             # its partner never comes
    assert time.monotonic() - start < 1.0
