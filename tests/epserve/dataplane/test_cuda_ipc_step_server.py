"""The expert side of the ``cuda_ipc`` step path against a model of a GPU: device streams that run their
launches in order, flag waits that spin on the device (the host only enqueues them), and host calls that
wait for the whole device (what CUDA does when it loads a kernel for the first time, among others).

The real ``CudaIpcExpertServer`` serves one attention rank whose two micro-batch slots are driven by the
real ``StepExchange`` in ``run_micro_batches``' order on ONE attention stream, as on a GPU. Each side has
its own model device (two processes). Checked: a two-slot step whose first compute call waits for the
expert's device to drain (a first kernel load), at any layer of either slot, completes, with no device wait
running out of budget; a step's slots are served as one group whatever order their announcements come in."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from epserve.dataplane.base import BatchHeader
from epserve.dataplane.cuda_ipc_join import AttentionSide, ExpertLink
from epserve.dataplane.cuda_ipc_layout import (CTRL_BYTES, STEP_GROUP, STEP_GROUP_SIZE, STEP_STATUS_SEQ, Channel,
                                               ChannelShape)
from epserve.dataplane.cuda_ipc_readiness import PollReadiness, step_value
from epserve.dataplane.cuda_ipc_server import CudaIpcExpertServer
from epserve.dataplane.cuda_ipc_step import StepExchange
from epserve.dataplane.cuda_ipc_step_server import StepServer

SHAPE = ChannelShape(max_tokens=8, hidden_size=4, top_k=2, dtype=torch.float32)
NUM_LAYERS = 6
SLOTS_PER_WORKER = 4
BUDGET_S = 1.5            # a device wait's spin budget in the model


class Stream:
    """A device stream: launches run in order on a thread of their own."""

    def __init__(self, device: Device, name: str) -> None:
        self.device, self.ops, self.queued = device, queue.SimpleQueue(), 0
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def launch(self, op) -> None:
        with self.lock:
            self.queued += 1
        self.ops.put(op)

    def idle(self) -> bool:
        with self.lock:
            return self.queued == 0

    def _run(self) -> None:
        while True:
            op = self.ops.get()
            op()
            with self.lock:
                self.queued -= 1


class Device:
    """One process's GPU: its streams, and the peer ranks whose device waits ran out of budget."""

    def __init__(self, name: str, num_streams: int) -> None:
        self.streams = [Stream(self, f"{name}-stream-{i}") for i in range(num_streams)]
        self.late: list[int] = []

    def synchronize(self, timeout_s: float = 30.0) -> None:
        """Every launch made so far has run (or the timeout passed: the test then fails on its own)."""
        deadline = time.monotonic() + timeout_s
        while not all(s.idle() for s in self.streams) and time.monotonic() < deadline:
            time.sleep(1e-3)


class DeviceFlags(PollReadiness):
    """The step path's device flags on the model: ``signal_step`` and ``wait_step`` are launches on the
    channel's stream (``stream_of``); a wait spins until its value or BUDGET_S (then it records the peer and
    goes on, as ``wait_flag`` does). The host never waits in them."""

    name = "flags"

    def __init__(self, device: Device, stream_of) -> None:
        super().__init__()
        self.device, self.stream_of = device, stream_of

    def signal_step(self, channel, flag, counter, layer) -> None:
        word, value = channel.flag(flag), step_value(int(counter), layer)
        self.stream_of(channel).launch(lambda: word.fill_(value))

    def wait_step(self, channel, flag, counter, layer, deadline, gone, peer_rank) -> bool:
        word, target = channel.flag(flag), step_value(int(counter), layer)

        def spin() -> None:
            end = time.monotonic() + BUDGET_S
            while int(word) < target:
                if time.monotonic() > end:
                    self.device.late.append(peer_rank)
                    return
                time.sleep(2e-4)
        self.stream_of(channel).launch(spin)
        return True

    def take_device_error(self) -> int | None:
        self.device.synchronize()
        return self.device.late.pop() if self.device.late else None


class Peer:
    pid = 0

    def alive(self) -> bool:
        return True


class FirstLoadCompute:
    """Zero partials; its first call for (slot, layer) ``at`` takes a while on the host and then waits
    for the device to drain (a kernel loaded for the first time, an allocation that frees cached memory
    first, ...). None: its first call, whichever slot makes it."""

    def __init__(self, device: Device, at: tuple[int, int] | None) -> None:
        self.device, self.at, self.calls, self.loaded = device, at, [], False

    def __call__(self, header: BatchHeader, hidden, local, weights) -> torch.Tensor:
        self.calls.append((header.micro_batch, header.layer))
        if not self.loaded and self.at in (None, (header.micro_batch, header.layer)):
            self.loaded = True
            time.sleep(0.05)
            self.device.synchronize()
        return torch.zeros_like(hidden)


def make_channels() -> list[Channel]:
    return [Channel(0, 0, slot, SHAPE, torch.zeros(CTRL_BYTES, dtype=torch.uint8),
                    torch.zeros(SHAPE.data_bytes, dtype=torch.uint8)) for slot in (0, 1)]


class ModelWorld:
    """One attention rank (its two slots' launches on one model stream) and the real expert server serving
    it (a model stream per slot), over host channels; the server runs ``FirstLoadCompute(at)``."""

    def __init__(self, at, idle_sleep_s: float = 2e-3) -> None:
        self.channels = make_channels()
        self.expert, self.attention = Device("expert", 2), Device("attention", 1)
        link = ExpertLink(attention_rank=0, worker=0, shape=SHAPE, device=torch.device("cpu"),
                          readiness=PollReadiness(),
                          step_readiness=DeviceFlags(self.expert, lambda ch: self.expert.streams[ch.slot]),
                          channels=self.channels, peer=Peer())
        self.side = AttentionSide(rank=0, expert_ranks=[1], shape=SHAPE, num_slots=2, device=torch.device("cpu"),
                                  readiness=PollReadiness(),
                                  step_readiness=DeviceFlags(self.attention, lambda ch: self.attention.streams[0]),
                                  channels=[self.channels], peers=[Peer()])
        self.server = CudaIpcExpertServer({0: link}, link_timeout_s=20, idle_sleep_s=idle_sleep_s)
        self.compute = FirstLoadCompute(self.expert, at)
        self.serving = threading.Thread(target=self.server.serve, args=(self.compute,), daemon=True)
        self.serving.start()

    def timed(self, drive) -> float:
        """Run ``drive()`` (the attention rank's part) and wait for its stream; → seconds. Stops the server."""
        try:
            started = time.monotonic()
            drive()
            self.attention.synchronize()
            return time.monotonic() - started
        finally:
            self.server.stop()
            self.serving.join(30)


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, SHAPE.hidden_size), torch.randint(0, SLOTS_PER_WORKER, (rows, SHAPE.top_k)),
            torch.rand(rows, SHAPE.top_k, dtype=torch.float32))


def two_micro_batches(exchanges: list[StepExchange], step: int, finish: bool = True) -> list[int]:
    """One attention step of two slots in ``run_micro_batches``' order (every launch on one stream); → each
    slot's step number. ``finish``: read the statuses (else the caller does, later)."""
    rows = [SHAPE.max_tokens // 2, SHAPE.max_tokens // 2]
    steps = [exchange.begin_step(n, map_version=1, num_layers=NUM_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                                 group=step, group_size=2) for exchange, n in zip(exchanges, rows)]
    for exchange, n in zip(exchanges, rows):
        exchange.send(0, *batch(n))
    for layer in range(NUM_LAYERS):
        for exchange, n in zip(exchanges, rows):
            exchange.receive(layer)
            if layer + 1 < NUM_LAYERS:
                exchange.send(layer + 1, *batch(n))
    for exchange in exchanges if finish else ():
        exchange.finish_step()
    return steps


@pytest.mark.parametrize("at", [None, (0, 0), (1, 0), (0, 3), (1, 2)], ids=lambda at: f"at{at}")
def test_a_first_kernel_load_in_a_two_slot_step_does_not_deadlock(at):
    """On a GPU the attention rank's launches share one stream: slot 0's receive of layer l spins there, and
    every later launch — slot 0's send of layer l + 1, slot 1's sends — waits behind it. If the expert side
    enqueued its slots from two threads, one of them could run ahead (slot 1's layers all enqueued, their
    waits spinning for the attention's sends) while the other waited on the host for the device to drain
    before it enqueued slot 0's first result: each side then waits for the other until spin budgets run out
    (the likeliest cause of the H100's two-micro-batch start-up hangs; this test fails so with a thread per
    slot). Both slots' layers enqueued in the attention's order from one thread: whatever the host waits for
    is already enqueued, and so are its dependencies."""
    torch.manual_seed(0)
    world = ModelWorld(at)
    exchanges = [StepExchange(world.side, slot, timeout_s=20) for slot in (0, 1)]
    took = world.timed(lambda: [two_micro_batches(exchanges, step) for step in (1, 2)])
    assert [int(ch.step_status(2)[STEP_STATUS_SEQ]) for ch in world.channels] == [2, 2]
    assert world.expert.late == [] and world.attention.late == []
    assert took < BUDGET_S, f"two steps took {took:.1f}s: a device wait waited out its budget"
    assert sorted(world.compute.calls) == sorted((slot, layer) for slot in (0, 1) for layer in range(NUM_LAYERS)
                                           for _ in (1, 2))


def test_each_step_is_enqueued_before_the_last_ones_status_is_read():
    """The attention worker's overlap schedule on the model GPU: the attention rank announces step N + 1 and
    enqueues all its layers before it reads step N's status (the expert's idle poll finds steps 1 and 2
    announced at once; its first compute call waits for its device). Every step is served, in order, each
    status read is its own step's, and no device wait runs out of budget."""
    world = ModelWorld(None, idle_sleep_s=0.2)           # an idle poll sleeps long
    exchange = StepExchange(world.side, 0, timeout_s=20)
    sizes = [4, 8, 3, 8, 1, 5]
    time.sleep(0.5)                 # the poll is idle: it will find steps 1 and 2 announced at once

    def enqueue(n: int) -> int:
        step = exchange.begin_step(n, map_version=1, num_layers=NUM_LAYERS, slots_per_worker=SLOTS_PER_WORKER)
        for layer in range(NUM_LAYERS):
            exchange.send(layer, *batch(n))
            exchange.receive(layer)
        return step

    def drive() -> None:
        previous = enqueue(sizes[0])
        for n in sizes[1:]:
            current = enqueue(n)
            exchange.finish_step(previous, device_error=None)
            previous = current
        exchange.finish_step(previous, device_error=None)
        assert previous == len(sizes)

    took = world.timed(drive)
    assert world.expert.late == [] and world.attention.late == []
    assert took < BUDGET_S, f"{len(sizes)} steps took {took:.1f}s: a device wait waited out its budget"
    assert world.compute.calls == [(0, layer) for _ in sizes for layer in range(NUM_LAYERS)]


def test_two_slot_steps_announced_together_reach_the_step_thread_as_groups():
    """The overlap schedule with two micro-batches: steps 1 and 2 (each two slots, one group) are announced
    before the expert's idle poll wakes up, so it finds four announcements at once. Handed on per channel
    (slot 0's steps 1 and 2, then slot 1's), slot 0's step 1 would be served without its partner, and a
    compute call waiting for the device at slot 0's layer 2 would wait on the attention stream, which waits
    behind slot 1's first result, not yet enqueued: device waits run out of budget. In step order, each
    step's slots are served together and both steps complete."""
    world = ModelWorld((0, 2), idle_sleep_s=0.2)
    exchanges = [StepExchange(world.side, slot, timeout_s=20) for slot in (0, 1)]
    time.sleep(0.5)

    def drive() -> None:
        announced = [two_micro_batches(exchanges, step, finish=False) for step in (1, 2)]
        for steps in announced:
            for exchange, step in zip(exchanges, steps):
                exchange.finish_step(step, device_error=None)

    took = world.timed(drive)
    assert world.expert.late == [] and world.attention.late == []
    assert took < BUDGET_S, f"two steps took {took:.1f}s: a device wait waited out its budget"


def test_a_group_is_served_whole_in_whatever_order_its_slots_come():
    """Slot 1's announcement may be seen first; a step of one slot is served at once; a group whose
    partner does not come is served without it at the deadline, and the partner alone when it comes."""
    channels = make_channels()
    link = ExpertLink(attention_rank=0, worker=0, shape=SHAPE, device=torch.device("cpu"), readiness=PollReadiness(),
                      step_readiness=PollReadiness(), channels=channels, peer=Peer())
    served: list[list[tuple[int, int]]] = []

    class Recorded(StepServer):
        def serve(self, group) -> None:
            served.append(sorted((channel.slot, seq) for channel, seq in group))

    items: queue.SimpleQueue = queue.SimpleQueue()
    thread = threading.Thread(target=Recorded(link, None, 0.3, None, threading.Event()).run, args=(items,))
    thread.start()

    def announce(slot: int, seq: int, group: int, size: int) -> None:
        header = channels[slot].step_header(seq)
        header[STEP_GROUP], header[STEP_GROUP_SIZE] = group, size
        items.put((channels[slot], seq))

    def served_after(count: int) -> float:
        started = time.monotonic()
        while len(served) < count and time.monotonic() - started < 5:
            time.sleep(1e-3)
        return time.monotonic() - started

    announce(1, 1, 1, 2)
    announce(0, 1, 1, 2)
    assert served_after(1) < 0.2
    announce(0, 2, 0, 1)                        # a prefill chunk: slot 0 alone
    assert served_after(2) < 0.2
    announce(0, 3, 3, 2)                        # slot 1 of step 3 comes late
    assert served_after(3) >= 0.25
    announce(1, 3, 3, 2)
    assert served_after(4) < 0.2
    items.put(None)
    thread.join(5)
    assert served == [[(0, 1), (1, 1)], [(0, 2)], [(0, 3)], [(1, 3)]]
