"""The expert side of the ``cuda_ipc`` step path: one thread per attention rank enqueues its steps.

Legend: T tokens of a micro-batch's step (a graph's bucket size), L MoE layers of a step, S slots per
worker, M micro-batch slots of the attention rank (1 or 2).

Threads: the server's poll thread hands each step announcement (channel, STEP_SEQ) to the queue of its
attention rank; that rank's ``StepServer.run`` takes them as groups — the slots one attention step
announced together (STEP_GROUP, STEP_GROUP_SIZE) — and serves each group whole:

1. read each slot's header and plan it: replay a graph captured before, capture one (the shape's second
   time), or run eagerly (its first time, a prefill chunk, a stale map version);
2. pass the server's ``StepGate`` (``cuda_ipc_gate``), capturing the group's new graphs if it lets them;
3. enqueue: every slot's graph replayed back to back when all have one, else every slot eagerly, the
   slots' layers interleaved in the attention rank's order — slot 0's layer l, slot 1's layer l, slot
   0's layer l + 1... (``run_micro_batches``: the rank sends slot 0's layer l + 1 after it received slot
   0's layer l and slot 1's layer l - 1). Each slot's kernels go to a stream of its own, so one slot's
   waits never hold the other's kernels back;
4. write each slot's step status in the step's ring entry (``Channel.step_status``), STEP_STATUS_SEQ last
   (on a GPU right after the enqueue: the attention rank reads it with the step's tokens).

Why one thread for all of a rank's slots: on a GPU the host only enqueues a step (device flag waits,
the compute, the partial's copy and signal), and the attention rank's launches share one stream, so a
slot's layer l + 1 reaches the expert only after the other slot's layer l - 1 came back. Enqueued in
that order from one thread, whatever is in flight depends only on launches already made: a host call
that waits for the device (a kernel loaded or a graph captured for the first time, an allocation that
returns cached memory) always ends. From two threads, one could wait there while the other slot's
layers, enqueued ahead, waited through the attention rank for its next launch (the likeliest cause of
the H100's two-micro-batch start-up hangs; ``tests/epserve/dataplane/test_cuda_ipc_step_server.py``).
On host memory the same order works with host waits: the attention rank sends each layer's input
having waited only for results of layers earlier in this order.

Eager layers: ``wait_step(STEP_IN)`` → local slot ids (``split_by_worker``'s rule on all T rows) →
``compute`` → copy the partial → ``signal_step(STEP_OUT)``. A stale map version is known when
``compute`` is called for layer 0, before anything runs: the remaining layers get zero partials so the
attention rank's waits still complete.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from epserve.dataplane.base import BatchHeader, ExpertCompute, StaleMapVersion
from epserve.dataplane.cuda_ipc_flags import spin_budget
from epserve.dataplane.cuda_ipc_gate import StepGate
from epserve.dataplane.cuda_ipc_join import ExpertLink
from epserve.dataplane.cuda_ipc_layout import (ATTENTION_STATE, DTYPES, STEP_DTYPE, STEP_GROUP, STEP_GROUP_SIZE,
                                               STEP_MAP_VERSION, STEP_NUM_LAYERS, STEP_NUM_TOKENS, STEP_SEQ,
                                               STEP_SLOTS_PER_WORKER, STEP_STATUS, STEP_STATUS_SEQ, STEP_TRACE,
                                               STEP_WEIGHT_DTYPE, AttentionState, Channel, Flag, Status, read_trace,
                                               write_status)
from epserve.dataplane.cuda_ipc_peers import PeerGone
from epserve.dataplane.cuda_ipc_step import MAX_STEP_LAYERS
from epserve.kernels.local_slots import local_slots, local_slots_reference

logger = logging.getLogger(__name__)

CAPTURE_WAIT_S = 1.0                # the longest a capture waits for a quiet device (then the step runs eagerly)


class Plan(enum.Enum):
    """How the expert side runs one slot's step."""

    EAGER = "eager"           # every layer launched from the step thread
    CAPTURE = "capture"       # captured now (if the gate lets it), then replayed
    REPLAY = "replay"         # a graph captured before


@dataclass
class Slot:
    """One micro-batch slot's device state: its stream, the step number its flag values come from
    (int64 [1]), ``copy_and_signal``'s arrival counter (int32 [1]), an event recorded after each step."""

    counter: torch.Tensor
    arrivals: torch.Tensor
    stream: torch.cuda.Stream | None
    done: torch.cuda.Event | None


@dataclass
class SlotStep:
    """One slot's part of a group: its announcement, read once."""

    channel: Channel
    seq: int
    key: tuple                                  # (map version, T, L, S, weight dtype)
    trace: bytes
    plan: Plan
    outcome: tuple[Status, tuple[int, ...], str]    # status so far; not OK: zero partials


class StepServer:
    """The expert side of the step path for one attention rank: all its micro-batch slots, one thread
    (``run``). ``gate``: shared by the server's step threads (None: one of its own)."""

    def __init__(self, link: ExpertLink, compute: ExpertCompute, timeout_s: float,
                 compute_device: torch.device | None, stopping: threading.Event, graphs: bool = False,
                 gate: StepGate | None = None) -> None:
        self.link, self.compute, self.timeout_s = link, compute, timeout_s
        self.compute_device, self.stopping = compute_device, stopping
        self.gate = gate if gate is not None else StepGate(stopping)
        on_gpu = link.device.type == "cuda"
        self.slots = [Slot(torch.zeros(1, dtype=torch.int64, device=link.device),
                           torch.zeros(1, dtype=torch.int32, device=link.device),
                           torch.cuda.Stream(link.device) if on_gpu else None,
                           torch.cuda.Event() if on_gpu else None) for _ in link.channels]
        self.graphs = StepGraphs(self) if graphs and on_gpu and compute_device is None else None
        self._last_group = 0

    def run(self, items: queue.SimpleQueue) -> None:
        """Serve (channel, seq) announcements as groups until a None."""
        carried = None
        while True:
            first = carried if carried is not None else items.get()
            if first is None:
                return
            group, carried = self._collect(first, items)
            if group is None:
                return
            self.serve(group)

    def serve(self, group: list[tuple[Channel, int]]) -> None:
        """One attention step (``group``: its slots' announcements): plan each slot, pass the gate, enqueue
        every slot."""
        steps = [self._read(channel, seq) for channel, seq in sorted(group, key=lambda item: item[0].slot)]
        member, now = self.link.attention_rank, time.monotonic()
        replays = all(step.plan is not Plan.EAGER for step in steps)
        captures = self.gate.arrive(member, replays and any(step.plan is Plan.CAPTURE for step in steps),
                                    now + min(self.timeout_s, CAPTURE_WAIT_S))
        try:
            try:
                if captures:
                    for step in steps:
                        if step.plan is Plan.CAPTURE:
                            self.graphs.capture(step.key, step.channel, step.trace)
            finally:
                self.gate.start(member, now + self.timeout_s)
            if replays and (captures or all(step.plan is Plan.REPLAY for step in steps)):
                self._replay(steps)
            else:
                self._run_eagerly(steps)
        finally:
            used = [self.slots[step.channel.slot] for step in steps]
            for slot in used:
                if slot.done is not None:
                    slot.done.record(slot.stream)
            on_gpu = used[0].done is not None
            self.gate.finish(member, (lambda: all(slot.done.query() for slot in used)) if on_gpu else None)

    # -- one group ---------------------------------------------------------------------------
    def _collect(self, first: tuple[Channel, int], items: queue.SimpleQueue
                 ) -> tuple[list[tuple[Channel, int]] | None, tuple[Channel, int] | None]:
        """``first`` and the other slots of its group, as they come (→ the group, and an announcement
        that came instead of a partner; None: the server stops)."""
        number, size = self._group_of(*first)
        if number == self._last_group:          # a slot of a group that went ahead without it: alone
            number, size = 0, 1
        self._last_group = number or self._last_group
        group, deadline = [first], time.monotonic() + self.timeout_s
        while len(group) < size:
            try:
                item = items.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                item = ()
            if item is None:
                return None, None
            if not item or self._group_of(*item)[0] != number or item[0].slot in {ch.slot for ch, _ in group}:
                logger.warning("attention rank %d: step group %d has %d of its %d micro-batch slots; serving "
                               "those", self.link.attention_rank, number, len(group), size)
                return group, item or None
            group.append(item)
        return group, None

    def _group_of(self, channel: Channel, seq: int) -> tuple[int, int]:
        """(group number, slots) of the channel's announcement of step ``seq``; (0, 1): a step of its own."""
        words = channel.step_header(seq)
        number, size = int(words[STEP_GROUP]), int(words[STEP_GROUP_SIZE])
        return (number, size) if number > 0 and 1 < size <= len(self.link.channels) else (0, 1)

    def _read(self, channel: Channel, seq: int) -> SlotStep:
        words = channel.step_header(seq)
        n, version, num_layers = int(words[STEP_NUM_TOKENS]), int(words[STEP_MAP_VERSION]), int(words[STEP_NUM_LAYERS])
        slots_per_worker = int(words[STEP_SLOTS_PER_WORKER])
        dtype, weight_dtype = DTYPES.get(int(words[STEP_DTYPE])), DTYPES.get(int(words[STEP_WEIGHT_DTYPE]))
        trace = read_trace(words, STEP_TRACE)
        status, held, error = Status.OK, (), ""
        if int(words[STEP_SEQ]) != seq:         # the attention rank went on without this step's status
            status, error = Status.ERROR, f"step {seq}'s announcement was replaced by step {int(words[STEP_SEQ])}'s"
            n, num_layers = 0, 0
        elif not 0 < n <= channel.shape.max_tokens or dtype != channel.shape.dtype or weight_dtype is None \
                or not 0 < num_layers <= MAX_STEP_LAYERS or slots_per_worker < 1:
            status, error = Status.ERROR, f"malformed step {seq}: {n} tokens, {num_layers} layers, dtype {dtype}"
            n, num_layers = max(min(n, channel.shape.max_tokens), 0), max(min(num_layers, MAX_STEP_LAYERS), 0)
        key, plan = (version, n, num_layers, slots_per_worker, weight_dtype), Plan.EAGER
        if status == Status.OK and self.graphs is not None:
            plan = self.graphs.plan(key, channel)
            try:
                if plan is not Plan.EAGER:
                    with self._on(channel):
                        self.graphs.check_version(key, channel, trace)
            except StaleMapVersion as exc:          # known before anything was enqueued: the eager path zeroes
                status, held, error, plan = Status.STALE_VERSION, exc.held_versions, str(exc), Plan.EAGER
        return SlotStep(channel, seq, key, trace, plan, (status, held, error))

    def _replay(self, steps: list[SlotStep]) -> None:
        """Every slot's graph, back to back (nothing that could wait on the host between them)."""
        for step in steps:
            with self._on(step.channel):
                self.slots[step.channel.slot].counter.fill_(step.seq)
        for step in steps:
            with self._on(step.channel):
                self.graphs.replay(step.key, step.channel)
        for step in steps:
            status = step.channel.step_status(step.seq)
            write_status(status, STEP_STATUS, *step.outcome)
            status[STEP_STATUS_SEQ] = step.seq                              # last

    def _run_eagerly(self, steps: list[SlotStep]) -> None:
        """Every slot's layers launched from here (on host memory: run, waiting on the host), interleaved:
        each slot's next layer in turn."""
        for step in steps:
            with self._on(step.channel):
                self.slots[step.channel.slot].counter.fill_(step.seq)
        running = [self._layers(step) for step in steps]
        while running:
            running = [layers for layers in running if next(layers, None) is not None]

    def _layers(self, step: SlotStep):
        """One slot's eager step, one layer per ``next`` (→ the layer; done: the status is written)."""
        channel, seq, link = step.channel, step.seq, self.link
        version, n, num_layers, slots_per_worker, weight_dtype = step.key
        counter = self.slots[channel.slot].counter
        status, held, error = step.outcome
        for layer in range(num_layers):
            try:
                with self._on(channel):
                    deadline = time.monotonic() + self.timeout_s
                    if not link.step_readiness.wait_step(channel, Flag.STEP_IN, counter, layer, deadline,
                                                         lambda: self._gone(channel), link.attention_rank):
                        logger.warning("attention rank %d did not send layer %d of step %d (micro-batch slot %d) "
                                       "within %.1fs; step dropped", link.attention_rank, layer, seq, channel.slot,
                                       self.timeout_s)
                        return
                    if status == Status.OK:
                        try:
                            header = BatchHeader(version, layer, channel.slot, n, step.trace)
                            channel.partial[:n].copy_(self._compute(header, channel, n, weight_dtype,
                                                                    slots_per_worker))
                        except StaleMapVersion as exc:
                            status, held, error = Status.STALE_VERSION, exc.held_versions, str(exc)
                        except Exception as exc:  # the compute's failure goes back to the attention rank
                            logger.exception("expert compute failed for step %d layer %d", seq, layer)
                            status, error = Status.ERROR, f"{type(exc).__name__}: {exc}"
                    if status != Status.OK:
                        channel.partial[:n].zero_()
                    link.step_readiness.signal_step(channel, Flag.STEP_OUT, counter, layer)
            except PeerGone as exc:
                logger.info("step %d of attention rank %d abandoned: %s", seq, link.attention_rank, exc)
                return
            yield layer
        words = channel.step_status(seq)
        write_status(words, STEP_STATUS, status, held, error)
        words[STEP_STATUS_SEQ] = seq                                          # last

    # -- helpers -----------------------------------------------------------------------------
    def _on(self, channel: Channel):
        """The slot's stream as the current one (on a GPU)."""
        stream = self.slots[channel.slot].stream
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _compute(self, header: BatchHeader, channel: Channel, n: int, weight_dtype: torch.dtype,
                 slots_per_worker: int, routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """This worker's partial [n, D] of all n rows (split_by_worker's local ids and weights; ``routed``:
        those already computed, by the fused wait of the step's graph)."""
        worker = self.link.worker
        slot_ids, weights = channel.slot_ids[:n], channel.weights(n, weight_dtype)                # [n, K]
        if routed is not None:
            local, local_weights = routed
        elif slot_ids.device.type == "cuda":        # one launch instead of ~8 (a node of the step's graph)
            local, local_weights = local_slots(slot_ids, weights, worker, slots_per_worker, weight_dtype)
        else:
            local, local_weights = local_slots_reference(slot_ids, weights, worker, slots_per_worker, weight_dtype)
        hidden = channel.hidden[:n]
        if self.compute_device is not None:
            hidden, local, local_weights = (x.to(self.compute_device) for x in (hidden, local, local_weights))
        out = self.compute(header, hidden, local, local_weights)
        if out.shape != hidden.shape:
            raise ValueError(f"ExpertCompute returned {tuple(out.shape)} for {tuple(hidden.shape)} tokens")
        return out

    def _gone(self, channel: Channel) -> str:
        if self.stopping.is_set():
            return "the expert server is stopping"
        if int(channel.words[ATTENTION_STATE]) == AttentionState.CLOSED:
            return f"attention rank {self.link.attention_rank} closed its channels"
        if not self.link.peer.alive():
            return f"attention rank {self.link.attention_rank} exited"
        return ""


class StepGraphs:
    """The expert side of a step, captured in CUDA graphs (GPUs with a capturable runner), one per slot.

    Eagerly, every layer of a step costs the expert thread a dozen launches from Python (the flag
    wait, the local-slot masks, the runner's kernels, the partial's copy, the signal), ~0.3–0.6 ms a
    layer with the GIL shared: slower than the attention side's replayed layer, so the attention
    graph waited on it. A step of a shape seen before — (slot, map version, tokens, layers, slots per
    worker, weight dtype) — replays one graph instead: the flag values come from the slot's device
    counter (``Slot.counter``) and the waits run with a fixed spin budget, as in the attention side's
    graphs. A shape runs eagerly the first time (Triton compiles then), is captured the second time
    (capture launches nothing: the graph is replayed right after), and replays from then on. A group
    replays only when every slot has its graph (else all its slots run eagerly); the capture waits for
    the server's ``StepGate``; a capture the gate turns down runs that step eagerly, and the shape is
    captured the next time it comes.

    Before a replay the map version is checked with a zero-row compute call (the store raises
    StaleMapVersion for a version it no longer holds, whose weights a graph must never read): its
    graphs are dropped. Graphs share one memory pool; at most ``MAX_GRAPHS`` are kept, the least
    recently used dropped first; steps of more than ``MAX_TOKENS`` tokens (prefill chunks) stay eager.
    """

    MAX_TOKENS = 256
    MAX_GRAPHS = 48

    def __init__(self, server: StepServer) -> None:
        self.server = server
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        self.seen: dict[tuple, int] = {}

    def plan(self, key: tuple, channel: Channel) -> Plan:
        """What to do with this step of ``key`` (counts the shape: once per step)."""
        if key[1] > self.MAX_TOKENS:
            return Plan.EAGER
        if (channel.slot, *key) in self.graphs:
            return Plan.REPLAY
        return Plan.CAPTURE if self._count(channel, key) >= 2 else Plan.EAGER

    def check_version(self, key: tuple, channel: Channel, trace: bytes) -> None:
        """Raise StaleMapVersion (dropping its graphs) if the compute no longer holds ``key``'s map version."""
        version, _, _, slots_per_worker, weight_dtype = key
        try:
            self.server._compute(BatchHeader(version, 0, channel.slot, 0, trace), channel, 0, weight_dtype,
                                 slots_per_worker)                    # raises StaleMapVersion, enqueues ~nothing
        except StaleMapVersion:
            for k in [k for k in self.graphs if k[1] == version]:
                del self.graphs[k]
            raise

    def capture(self, key: tuple, channel: Channel, trace: bytes) -> None:
        """Capture the step ``key`` (launches nothing); the least recently used graph beyond MAX_GRAPHS goes."""
        self.graphs[(channel.slot, *key)] = self._capture(channel, key, trace)
        while len(self.graphs) > self.MAX_GRAPHS:
            self.graphs.popitem(last=False)

    def replay(self, key: tuple, channel: Channel) -> None:
        graph_key = (channel.slot, *key)
        self.graphs.move_to_end(graph_key)
        self.graphs[graph_key].replay()
        observe = getattr(self.server.compute, "observe_replay", None)
        if observe is not None:
            observe(key[1], key[2])

    def _count(self, channel: Channel, key: tuple) -> int:
        count = self.seen.get((channel.slot, *key), 0) + 1
        self.seen[(channel.slot, *key)] = count
        if len(self.seen) > 4 * self.MAX_GRAPHS:
            self.seen.clear()
        return count

    def _capture(self, channel: Channel, key: tuple, trace: bytes) -> torch.cuda.CUDAGraph:
        version, n, num_layers, slots_per_worker, weight_dtype = key
        server, link = self.server, self.server.link
        slot, readiness = server.slots[channel.slot], link.step_readiness
        budget = spin_budget(server.timeout_s, link.device)
        graph = torch.cuda.CUDAGraph()
        started = time.perf_counter()
        # thread_local: the worker's other threads (map loads, heartbeats) may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, stream=slot.stream, capture_error_mode="thread_local"):
            for layer in range(num_layers):
                header = BatchHeader(version, layer, channel.slot, n, trace)
                if getattr(readiness, "fused", False):   # 4 launches a layer: wait+slots, the runner's 2, copy+signal
                    routed = readiness.wait_local_slots_step(channel, Flag.STEP_IN, slot.counter, layer, budget,
                                                             link.attention_rank, n, weight_dtype, link.worker,
                                                             slots_per_worker)
                    out = server._compute(header, channel, n, weight_dtype, slots_per_worker, routed)
                    readiness.copy_and_signal_step(channel, Flag.STEP_OUT, slot.counter, layer,
                                                   [(out.contiguous(), channel.partial[:n])], slot.arrivals)
                    continue
                readiness.wait_step_budget(channel, Flag.STEP_IN, slot.counter, layer, budget, link.attention_rank)
                channel.partial[:n].copy_(server._compute(header, channel, n, weight_dtype, slots_per_worker))
                readiness.signal_step(channel, Flag.STEP_OUT, slot.counter, layer)
        logger.info("captured the expert step of %d tokens x %d layers (map version %d, micro-batch slot %d) "
                    "in %.0f ms", n, num_layers, version, channel.slot, (time.perf_counter() - started) * 1e3)
        return graph
