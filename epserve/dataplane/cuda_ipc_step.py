"""The ``cuda_ipc`` step path: per-layer hand-offs that are device launches only (CUDA-graph capturable).

Legend: T tokens of the step (the graph's bucket size), D hidden, K top-k, L MoE layers of a
step, W expert workers, S slots per worker.

Why a second path: ``CudaIpcDispatcher.dispatch`` splits tokens by worker on the host
(``split_by_worker`` needs a sync) and ``combine`` waits on the host; neither fits in a graph.
Here the host talks once per step, the layers are device work:

- attention, host, once per step: ``begin_step(T, map_version, L, S)`` bumps the step number,
  writes it to a device counter (one small fill on the stream, before the graph replay) and
  announces (T, version, L, S, dtypes, trace, group) in every channel's host-shared step header,
  STEP_SEQ last. The group: the attention step's number and how many micro-batch slots it announced
  (``StepExperts`` numbers them; 0: a step of its own).
- attention, device, per layer (what the graph captures): ``send(layer, hidden, slot_ids,
  weights)``: copy all T rows — physical slot ids, not split — into each expert's input
  region of this slot, then ``signal_step(STEP_IN)``; ``receive(layer)``: ``wait_step(STEP_OUT)``
  per worker, then the partials added in worker order in float32 (float64 for float64), the same
  sum as ``CombineSum``. Flag values are ``step * FLAG_STEP_STRIDE + layer + 1`` computed on the
  device from the counter, so every replay signals and awaits new values.
- expert (``StepServer``, one thread per attention rank and slot): the slots' threads pass a
  ``StepGate`` (``cuda_ipc_gate``) before each step: a group's slots start together, and a graph is
  captured only while no slot has device work in flight. Then, for each layer:
  ``wait_step(STEP_IN)`` → local slot ids (slot − w·S where the owner is w, else -1, weights 0
  there: ``split_by_worker``'s rule on all T rows) → ``compute`` → copy the partial →
  ``signal_step(STEP_OUT)``; then the step status (OK, STALE_VERSION with the held versions,
  ERROR), STEP_STATUS_SEQ last. With device flags all L layers are enqueued at once on this
  rank's own stream (the compute must not sync with the host, or the thread waits with it);
  a stale map version is known when ``compute`` is called for layer 0, before anything runs:
  the remaining layers get zero partials so the attention's graph still completes.
- attention, host, after the step (when it reads the sampled tokens anyway): ``finish_step()``
  raises StaleMapVersion (the caller redoes the step with the new map), RemoteExpertError,
  PeerLost, or DataPlaneTimeout (a device wait that ran out of its budget).

With device flags on a GPU each flag operation is fused with the copy beside it
(``cuda_ipc_handoff.py``): ``send`` is one launch per expert (three copies, then the flag), a
``receive`` from one expert worker is one (the wait, then the partial's copy), and a captured expert
layer is four (the wait with the local slots, the runner's two, the partial's copy with the flag).

Flags only grow and waits are ``>=``: if the attention side abandons a step midway (an error),
its next step's first signal releases every wait the expert still has queued for the old one;
those layers compute on the new data and signal old values, which nobody awaits, before the new
step's layers run in stream order.

Partials of rows routed to no slot of a worker are that worker's compute on all -1 choices,
expected to be zeros (every epserve runner skips -1). Outputs equal the per-message path's when
the compute is row-independent. On host memory (readiness poll) the same calls run on the
host and ``receive`` waits on the host — the CPU tests drive the protocol that way.
"""

from __future__ import annotations

import enum
import logging
import threading
import time

import torch

from epserve.dataplane.base import (BatchHeader, DataPlaneTimeout, ExpertCompute, PeerLost, RemoteExpertError,
                                    StaleMapVersion)
from epserve.dataplane.cuda_ipc_flags import spin_budget
from epserve.dataplane.cuda_ipc_gate import StepGate
from epserve.dataplane.cuda_ipc_join import AttentionSide, ExpertLink
from epserve.dataplane.cuda_ipc_layout import (ATTENTION_STATE, DTYPE_CODES, DTYPES, EXPERT_STATE, STEP_DTYPE,
                                               STEP_GROUP, STEP_GROUP_SIZE, STEP_MAP_VERSION, STEP_NUM_LAYERS,
                                               STEP_NUM_TOKENS, STEP_SEQ, STEP_SLOTS_PER_WORKER, STEP_STATUS,
                                               STEP_STATUS_SEQ, STEP_TRACE, STEP_WEIGHT_DTYPE, AttentionState,
                                               Channel, ExpertState, Flag, Status, read_status, read_trace,
                                               write_status, write_trace)
from epserve.dataplane.cuda_ipc_peers import PeerGone, wait_until
from epserve.kernels.local_slots import local_slots, local_slots_reference

logger = logging.getLogger(__name__)

MAX_STEP_LAYERS = (1 << 16) - 2     # layer + 1 must stay below FLAG_STEP_STRIDE
CAPTURE_WAIT_S = 1.0                # the longest a capture waits for a quiet device (then the step runs eagerly)


class StepExchange:
    """The attention side of one micro-batch slot's step path, to every expert worker."""

    def __init__(self, side: AttentionSide, slot: int, timeout_s: float) -> None:
        self.side, self.slot, self.timeout_s = side, slot, timeout_s
        self.channels = [row[slot] for row in side.channels]                      # [W]
        self.counter = torch.zeros(1, dtype=torch.int64, device=side.device)       # the step number, on the device
        self.step, self.num_tokens, self.weight_dtype = 0, 0, torch.float32
        self._acc_dtype = side.shape.dtype if side.shape.dtype == torch.float64 else torch.float32
        self.fused = getattr(side.step_readiness, "fused", False)   # device flags on a GPU: cuda_ipc_handoff.py
        self._spin_budget = spin_budget(timeout_s, side.device)     # a fused receive's wait: the whole timeout
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=side.device)    # copy_and_signal's counter

    def begin_step(self, num_tokens: int, map_version: int, num_layers: int, slots_per_worker: int,
                   trace_context: bytes = b"", weight_dtype: torch.dtype = torch.float32, group: int = 0,
                   group_size: int = 1) -> None:
        """Host, before the step's launches (or its graph replay): announce it to every expert rank.
        ``group``: the attention step's number (> 0) when ``group_size`` slots are announced together
        for it (the expert side starts them together); 0: this slot's step alone."""
        if not 0 < num_tokens <= self.side.shape.max_tokens:
            raise ValueError(f"a step of {num_tokens} tokens; the cuda_ipc channels hold 1 to "
                             f"{self.side.shape.max_tokens} (the attention worker's --max-num-batched-tokens)")
        if not 0 < num_layers <= MAX_STEP_LAYERS or slots_per_worker < 1 or weight_dtype not in DTYPE_CODES:
            raise ValueError(f"bad step: {num_layers} layers, {slots_per_worker} slots per worker, {weight_dtype}")
        if group < 0 or not 1 <= group_size <= self.side.num_slots:
            raise ValueError(f"bad step group {group} of {group_size} slots ({self.side.num_slots} per channel row)")
        for worker in range(len(self.channels)):
            reason = self._gone(worker)
            if reason:
                rank = self.side.expert_ranks[worker]
                raise PeerLost(f"expert rank {rank} is unreachable ({reason}); step not announced", peer_rank=rank)
        self.step += 1
        self.num_tokens, self.weight_dtype = num_tokens, weight_dtype
        self.counter.fill_(self.step)
        for channel in self.channels:
            words = channel.words
            words[STEP_NUM_TOKENS], words[STEP_MAP_VERSION] = num_tokens, map_version
            words[STEP_NUM_LAYERS] = num_layers
            words[STEP_SLOTS_PER_WORKER] = slots_per_worker
            words[STEP_DTYPE], words[STEP_WEIGHT_DTYPE] = DTYPE_CODES[self.side.shape.dtype], DTYPE_CODES[weight_dtype]
            write_trace(words, STEP_TRACE, trace_context)
            words[STEP_GROUP], words[STEP_GROUP_SIZE] = group, group_size
            words[STEP_SEQ] = self.step                          # last
        self._map_version = map_version

    def expect_step(self, num_tokens: int, weight_dtype: torch.dtype = torch.float32) -> None:
        """Host: the shapes of the next ``send``/``receive`` calls, announcing nothing — for capturing
        them in a CUDA graph (nothing runs then; each replay is preceded by a ``begin_step``)."""
        if not 0 < num_tokens <= self.side.shape.max_tokens or weight_dtype not in DTYPE_CODES:
            raise ValueError(f"a step of {num_tokens} tokens ({weight_dtype}); the channels hold 1 to "
                             f"{self.side.shape.max_tokens}")
        self.num_tokens, self.weight_dtype = num_tokens, weight_dtype

    def send(self, layer: int, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """hidden [T, D], slot_ids [T, K] physical (-1 = none), weights [T, K]: launches only."""
        t = self.num_tokens
        if hidden.shape != (t, self.side.shape.hidden_size) or slot_ids.shape != (t, self.side.shape.top_k) \
                or weights.shape != slot_ids.shape or weights.dtype != self.weight_dtype:
            raise ValueError(f"step of T={t}: need hidden [T, {self.side.shape.hidden_size}], slot_ids and weights "
                             f"[T, {self.side.shape.top_k}] {self.weight_dtype}; got {tuple(hidden.shape)}, "
                             f"{tuple(slot_ids.shape)}, {tuple(weights.shape)} {weights.dtype}")
        readiness = self.side.step_readiness
        for channel in self.channels:
            if self.fused:                   # one launch: the three copies, then the flag
                readiness.copy_and_signal_step(channel, Flag.STEP_IN, self.counter, layer, [
                    (hidden.contiguous(), channel.hidden[:t]), (slot_ids.contiguous(), channel.slot_ids[:t]),
                    (weights.contiguous(), channel.weights(t, self.weight_dtype))], self.arrivals)
                continue
            channel.hidden[:t].copy_(hidden)
            channel.slot_ids[:t].copy_(slot_ids)
            channel.weights(t, self.weight_dtype).copy_(weights)
            readiness.signal_step(channel, Flag.STEP_IN, self.counter, layer)

    def receive(self, layer: int) -> torch.Tensor:
        """→ out [T, D]: every worker's partial of ``layer``, added in worker order. Launches only on GPUs."""
        t = self.num_tokens
        single = len(self.channels) == 1           # one partial: the float32 sum of it alone is the partial
        if single and self.fused:                  # one launch: the wait, then the partial's copy
            out = torch.empty(t, self.side.shape.hidden_size, dtype=self.side.shape.dtype, device=self.side.device)
            self.side.step_readiness.wait_and_copy_step(self.channels[0], Flag.STEP_OUT, self.counter, layer,
                                                        self._spin_budget, self.side.expert_ranks[0],
                                                        self.channels[0].partial[:t], out)
            return out
        out = None if single else torch.zeros(t, self.side.shape.hidden_size, dtype=self._acc_dtype,
                                              device=self.side.device)
        deadline = time.monotonic() + self.timeout_s
        for worker, channel in enumerate(self.channels):
            rank = self.side.expert_ranks[worker]
            try:
                ready = self.side.step_readiness.wait_step(channel, Flag.STEP_OUT, self.counter, layer, deadline,
                                                      lambda: self._gone(worker), rank)
            except PeerGone as exc:
                raise PeerLost(f"expert rank {rank} lost during layer {layer} of step {self.step}: {exc}",
                               peer_rank=rank) from None
            if not ready:
                raise DataPlaneTimeout(f"expert rank {rank} did not answer layer {layer} of step {self.step} "
                                       f"(micro-batch slot {self.slot}) within {self.timeout_s}s", peer_rank=rank,
                                       layer=layer, micro_batch=self.slot)
            if single:
                return channel.partial[:t].clone()
            out += channel.partial[:t]
        return out.to(self.side.shape.dtype)

    def finish_step(self) -> None:
        """Host, after the step ran: raise what went wrong on the expert side, if anything (syncs on GPUs)."""
        deadline = time.monotonic() + self.timeout_s
        errors: list[Exception] = []
        for worker, channel in enumerate(self.channels):
            rank, words = self.side.expert_ranks[worker], channel.words
            try:
                done = wait_until(lambda: int(words[STEP_STATUS_SEQ]) == self.step, deadline,
                                  lambda: self._gone(worker))
            except PeerGone as exc:
                errors.append(PeerLost(f"expert rank {rank} lost during step {self.step}: {exc}", peer_rank=rank))
                continue
            if not done:
                errors.append(DataPlaneTimeout(f"expert rank {rank} did not finish step {self.step} within "
                                               f"{self.timeout_s}s", peer_rank=rank, micro_batch=self.slot))
                continue
            status, held, error = read_status(words, STEP_STATUS)
            if status == Status.STALE_VERSION:
                errors.append(StaleMapVersion(f"expert rank {rank} does not hold map version {self._map_version} "
                                              f"(step {self.step}): {error}", requested=self._map_version,
                                              held_versions=held, peer_rank=rank))
            elif status == Status.ERROR:
                errors.append(RemoteExpertError(f"expert rank {rank} failed step {self.step}: {error}",
                                                peer_rank=rank))
        late = self.side.step_readiness.take_device_error()
        if late is not None:
            errors.append(DataPlaneTimeout(f"a device-side wait for expert rank {late} ran out of budget in step "
                                           f"{self.step}: its results are not valid", peer_rank=late))
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {type(other).__name__}: {other}")
            raise errors[0]

    def _gone(self, worker: int) -> str:
        rank, channel = self.side.expert_ranks[worker], self.channels[worker]
        if int(channel.words[EXPERT_STATE]) == ExpertState.STOPPED:
            return f"expert rank {rank} stopped serving"
        if not self.side.peers[worker].alive():
            return f"expert rank {rank} (pid {self.side.peers[worker].pid}) exited"
        return ""


class StepServer:
    """The expert side of the step path for one attention rank and micro-batch slot (run by one thread
    of the server). ``gate``: shared by the server's step threads (None: one of its own)."""

    def __init__(self, link: ExpertLink, compute: ExpertCompute, timeout_s: float,
                 compute_device: torch.device | None, stopping: threading.Event, graphs: bool = False,
                 gate: StepGate | None = None) -> None:
        self.link, self.compute, self.timeout_s = link, compute, timeout_s
        self.compute_device, self.stopping = compute_device, stopping
        self.gate = gate if gate is not None else StepGate(stopping)
        self.counter = torch.zeros(1, dtype=torch.int64, device=link.device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=link.device)    # copy_and_signal's counter
        self.stream = torch.cuda.Stream(link.device) if link.device.type == "cuda" else None
        self.done = torch.cuda.Event() if self.stream is not None else None     # recorded after each step
        self.graphs = StepGraphs(self) if graphs and self.stream is not None and compute_device is None else None

    def serve_step(self, channel: Channel, seq: int) -> None:
        if self.stream is None:
            self._serve_step(channel, seq)
            return
        with torch.cuda.stream(self.stream):
            self._serve_step(channel, seq)

    def _serve_step(self, channel: Channel, seq: int) -> None:
        """Plan (replay, capture or eagerly), pass the gate (``cuda_ipc_gate``), enqueue the step."""
        words, link = channel.words, self.link
        n, version, num_layers = int(words[STEP_NUM_TOKENS]), int(words[STEP_MAP_VERSION]), int(words[STEP_NUM_LAYERS])
        slots_per_worker = int(words[STEP_SLOTS_PER_WORKER])
        dtype, weight_dtype = DTYPES.get(int(words[STEP_DTYPE])), DTYPES.get(int(words[STEP_WEIGHT_DTYPE]))
        trace = read_trace(words, STEP_TRACE)
        status, held, error = Status.OK, (), ""
        if not 0 < n <= channel.shape.max_tokens or dtype != channel.shape.dtype or weight_dtype is None \
                or not 0 < num_layers <= MAX_STEP_LAYERS or slots_per_worker < 1:
            status, error = Status.ERROR, f"malformed step {seq}: {n} tokens, {num_layers} layers, dtype {dtype}"
            n, num_layers = max(min(n, channel.shape.max_tokens), 0), max(min(num_layers, MAX_STEP_LAYERS), 0)
        key, plan = (version, n, num_layers, slots_per_worker, weight_dtype), Plan.EAGER
        if status == Status.OK and self.graphs is not None:
            plan = self.graphs.plan(key, channel)
            try:
                if plan is not Plan.EAGER:
                    self.graphs.check_version(key, channel, trace)
            except StaleMapVersion as exc:          # known before anything was enqueued: the eager path zeroes
                status, held, error, plan = Status.STALE_VERSION, exc.held_versions, str(exc), Plan.EAGER
        member, now = (link.attention_rank, channel.slot), time.monotonic()
        group, group_size = int(words[STEP_GROUP]), int(words[STEP_GROUP_SIZE])
        if not 1 <= group_size <= len(link.channels):       # a slot count this link cannot have: alone
            group, group_size = 0, 1
        captures = self.gate.arrive(member, group, group_size, plan is Plan.CAPTURE,
                                    now + min(self.timeout_s, CAPTURE_WAIT_S))
        deadline = now + self.timeout_s
        try:
            try:
                if captures:
                    self.graphs.capture(key, channel, trace)
            finally:
                self.gate.start(member, deadline)       # ends the capture; returns once the step may start
            self.counter.fill_(seq)
            if plan is Plan.REPLAY or captures:
                self.graphs.replay(key, channel)
                write_status(words, STEP_STATUS, status, held, error)
                words[STEP_STATUS_SEQ] = seq                              # last
                return
            self._run_eagerly(channel, seq, key, trace, (status, held, error))
        finally:
            if self.done is not None:
                self.done.record(self.stream)
            self.gate.finish(member, self.done.query if self.done is not None else None)

    def _run_eagerly(self, channel: Channel, seq: int, key: tuple, trace: bytes,
                     outcome: tuple[Status, tuple[int, ...], str]) -> None:
        """Every layer launched from here (on host memory: run, waiting on the host); ``outcome``: the
        status so far (not OK: zero partials, so the attention side's waits still complete)."""
        words, link = channel.words, self.link
        version, n, num_layers, slots_per_worker, weight_dtype = key
        status, held, error = outcome
        try:
            for layer in range(num_layers):
                deadline = time.monotonic() + self.timeout_s
                if not link.step_readiness.wait_step(channel, Flag.STEP_IN, self.counter, layer, deadline,
                                                lambda: self._gone(channel), link.attention_rank):
                    logger.warning("attention rank %d did not send layer %d of step %d within %.1fs; step dropped",
                                   link.attention_rank, layer, seq, self.timeout_s)
                    return
                if status == Status.OK:
                    try:
                        header = BatchHeader(version, layer, channel.slot, n, trace)
                        channel.partial[:n].copy_(self._compute(header, channel, n, weight_dtype, slots_per_worker))
                    except StaleMapVersion as exc:
                        status, held, error = Status.STALE_VERSION, exc.held_versions, str(exc)
                    except Exception as exc:  # the compute's failure goes back to the attention rank
                        logger.exception("expert compute failed for step %d layer %d", seq, layer)
                        status, error = Status.ERROR, f"{type(exc).__name__}: {exc}"
                if status != Status.OK:
                    channel.partial[:n].zero_()
                link.step_readiness.signal_step(channel, Flag.STEP_OUT, self.counter, layer)
        except PeerGone as exc:
            logger.info("step %d of attention rank %d abandoned: %s", seq, link.attention_rank, exc)
            return
        write_status(words, STEP_STATUS, status, held, error)
        words[STEP_STATUS_SEQ] = seq                                  # last

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


class Plan(enum.Enum):
    """How the expert side runs one step."""

    EAGER = "eager"           # every layer launched from the step thread
    CAPTURE = "capture"       # captured now (if the gate lets it), then replayed
    REPLAY = "replay"         # a graph captured before


class StepGraphs:
    """The expert side of a step, captured in CUDA graphs (GPUs with a capturable runner).

    Eagerly, every layer of a step costs the expert thread a dozen launches from Python (the flag
    wait, the local-slot masks, the runner's kernels, the partial's copy, the signal), ~0.3–0.6 ms a
    layer with the GIL shared: slower than the attention side's replayed layer, so the attention
    graph waited on it. A step of a shape seen before — (map version, tokens, layers, slots per
    worker, weight dtype) — replays one graph instead: the flag values come from the device counter
    (``StepServer.counter``) and the waits run with a fixed spin budget, as in the attention side's
    graphs. A shape runs eagerly the first time (Triton compiles then), is captured the second time
    (capture launches nothing: the graph is replayed right after), and replays from then on. The
    capture waits for the server's ``StepGate`` (no other slot's step in flight meanwhile); a capture
    the gate turns down runs that step eagerly, and the shape is captured the next time it comes.

    Before a replay the map version is checked with a zero-row compute call (the store raises
    StaleMapVersion for a version it no longer holds, whose weights a graph must never read): its
    graphs are dropped. Graphs share one memory pool; at most ``MAX_GRAPHS`` are kept, the least
    recently used dropped first; steps of more than ``MAX_TOKENS`` tokens (prefill chunks) stay eager.
    """

    MAX_TOKENS = 256
    MAX_GRAPHS = 48

    def __init__(self, server: StepServer) -> None:
        from collections import OrderedDict

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
        readiness = link.step_readiness
        budget = spin_budget(server.timeout_s, link.device)
        graph = torch.cuda.CUDAGraph()
        started = time.perf_counter()
        # thread_local: the worker's other threads (map loads, heartbeats) may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, stream=server.stream, capture_error_mode="thread_local"):
            for layer in range(num_layers):
                header = BatchHeader(version, layer, channel.slot, n, trace)
                if getattr(readiness, "fused", False):   # 4 launches a layer: wait+slots, the runner's 2, copy+signal
                    routed = readiness.wait_local_slots_step(channel, Flag.STEP_IN, server.counter, layer, budget,
                                                             link.attention_rank, n, weight_dtype, link.worker,
                                                             slots_per_worker)
                    out = server._compute(header, channel, n, weight_dtype, slots_per_worker, routed)
                    readiness.copy_and_signal_step(channel, Flag.STEP_OUT, server.counter, layer,
                                                   [(out.contiguous(), channel.partial[:n])], server.arrivals)
                    continue
                readiness.wait_step_budget(channel, Flag.STEP_IN, server.counter, layer, budget, link.attention_rank)
                channel.partial[:n].copy_(server._compute(header, channel, n, weight_dtype, slots_per_worker))
                readiness.signal_step(channel, Flag.STEP_OUT, server.counter, layer)
        logger.info("captured the expert step of %d tokens x %d layers (map version %d, micro-batch slot %d) "
                    "in %.0f ms", n, num_layers, version, channel.slot, (time.perf_counter() - started) * 1e3)
        return graph
