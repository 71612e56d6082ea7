"""The ``cuda_ipc`` step path: per-layer hand-offs that are device launches only (CUDA-graph capturable);
the attention side (the expert side: ``cuda_ipc_step_server``).

Legend: T tokens of the step (the graph's bucket size), D hidden, K top-k, L MoE layers of a
step, W expert workers, S slots per worker.

Why a second path: ``CudaIpcDispatcher.dispatch`` splits tokens by worker on the host
(``split_by_worker`` needs a sync) and ``combine`` waits on the host; neither fits in a graph.
Here the host talks once per step, the layers are device work:

- attention, host, once per step: ``begin_step(T, map_version, L, S)`` bumps the step number s,
  writes it to a device counter (one small fill on the stream, before the graph replay) and
  announces (T, version, L, S, dtypes, trace, group) in every channel's host-shared step header,
  STEP_SEQ last. Headers and statuses are rings of two (``Channel.step_header(s)``): step s + 1 may
  be announced before step s's status is read (the engine's overlap schedule launches the next
  decode step first); announcing step s + 2 first waits until the expert side has written step s's
  status (so it has read step s's header; at once in practice). The group: the attention step's number
  and how many micro-batch slots it announced (``StepExperts`` numbers them; 0: a step of its own).
- attention, device, per layer (what the graph captures): ``send(layer, hidden, slot_ids,
  weights)``: copy all T rows — physical slot ids, not split — into each expert's input
  region of this slot, then ``signal_step(STEP_IN)``; ``receive(layer)``: ``wait_step(STEP_OUT)``
  per worker, then the partials added in worker order in float32 (float64 for float64), the same
  sum as ``CombineSum``. Flag values are ``step * FLAG_STEP_STRIDE + layer + 1`` computed on the
  device from the counter, so every replay signals and awaits new values.
- expert (``cuda_ipc_step_server.StepServer``, one thread per attention rank): a step's slots,
  as a group, for each layer: ``wait_step(STEP_IN)`` → local slot ids (slot − w·S where the owner is
  w, else -1, weights 0 there: ``split_by_worker``'s rule on all T rows) → ``compute`` → copy the
  partial → ``signal_step(STEP_OUT)``; then the step status (OK, STALE_VERSION with the held
  versions, ERROR), STEP_STATUS_SEQ last. With device flags every layer of every slot is enqueued
  at once, each slot on its own stream, the slots' layers in the attention rank's order (the compute
  must not sync with the host, or the thread waits with it); replayed from CUDA graphs once a shape
  was seen twice.
- attention, host, after the step (when it reads the sampled tokens anyway): ``finish_step(s)``
  raises StaleMapVersion (the caller redoes the step with the new map), RemoteExpertError,
  PeerLost, or DataPlaneTimeout (a device wait that ran out of its budget: ``device_error``, read
  from a copy the caller queued behind the step, else here with a sync).

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

import time

import torch

from epserve.dataplane.base import DataPlaneTimeout, PeerLost, RemoteExpertError, StaleMapVersion
from epserve.dataplane.cuda_ipc_flags import spin_budget
from epserve.dataplane.cuda_ipc_join import AttentionSide
from epserve.dataplane.cuda_ipc_layout import (DTYPE_CODES, STEP_DTYPE, STEP_GROUP, STEP_GROUP_SIZE,
                                               STEP_MAP_VERSION, STEP_NUM_LAYERS, STEP_NUM_TOKENS, STEP_RING,
                                               STEP_SEQ, STEP_SLOTS_PER_WORKER, STEP_STATUS, STEP_STATUS_SEQ,
                                               STEP_TRACE, STEP_WEIGHT_DTYPE, Flag, Status,
                                               read_status, write_trace)
from epserve.dataplane.cuda_ipc_peers import PeerGone, wait_until

MAX_STEP_LAYERS = (1 << 16) - 2     # layer + 1 must stay below FLAG_STEP_STRIDE


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
        self._map_versions = [0] * STEP_RING                        # each ring entry's step's map version
        everyone = tuple(range(len(self.channels)))
        self.workers = everyone                                     # the current step's expert workers
        self._entry_workers = [everyone] * STEP_RING                # each ring entry's step's workers
        self._announced = [[0] * STEP_RING for _ in self.channels]  # per worker, per entry: the last step there
        self._epochs = list(side.epochs)                            # per worker: the process the above is about

    def begin_step(self, num_tokens: int, map_version: int, num_layers: int, slots_per_worker: int,
                   trace_context: bytes = b"", weight_dtype: torch.dtype = torch.float32, group: int = 0,
                   group_size: int = 1, workers: tuple[int, ...] | None = None) -> int:
        """Host, before the step's launches (or its graph replay): announce it to the expert ranks (→ its
        step number, for ``finish_step``). ``group``: the attention step's number (> 0) when ``group_size``
        slots are announced together for it (the expert side starts them together); 0: this slot's step
        alone. ``workers``: the expert workers (indexes) the step goes to, ascending; None: all. A worker
        whose slots the map leaves empty (one that died, after elastic EP re-placed its experts) is left
        out: nothing is sent to it or awaited from it."""
        if not 0 < num_tokens <= self.side.shape.max_tokens:
            raise ValueError(f"a step of {num_tokens} tokens; the cuda_ipc channels hold 1 to "
                             f"{self.side.shape.max_tokens} (the attention worker's --max-num-batched-tokens)")
        if not 0 < num_layers <= MAX_STEP_LAYERS or slots_per_worker < 1 or weight_dtype not in DTYPE_CODES:
            raise ValueError(f"bad step: {num_layers} layers, {slots_per_worker} slots per worker, {weight_dtype}")
        if group < 0 or not 1 <= group_size <= self.side.num_slots:
            raise ValueError(f"bad step group {group} of {group_size} slots ({self.side.num_slots} per channel row)")
        workers = self._check_workers(workers)
        for worker in workers:
            reason = self._gone(worker)
            if reason:
                rank = self.side.expert_ranks[worker]
                raise PeerLost(f"expert rank {rank} is unreachable ({reason}); step not announced", peer_rank=rank)
        step = self.step + 1
        self._await_ring_entry(step, workers)
        self.step, self.workers = step, workers
        self.num_tokens, self.weight_dtype = num_tokens, weight_dtype
        self.counter.fill_(step)
        for worker in workers:
            self._announced[worker][step % STEP_RING] = step
            words = self.channels[worker].step_header(step)
            words[STEP_NUM_TOKENS], words[STEP_MAP_VERSION] = num_tokens, map_version
            words[STEP_NUM_LAYERS] = num_layers
            words[STEP_SLOTS_PER_WORKER] = slots_per_worker
            words[STEP_DTYPE], words[STEP_WEIGHT_DTYPE] = DTYPE_CODES[self.side.shape.dtype], DTYPE_CODES[weight_dtype]
            write_trace(words, STEP_TRACE, trace_context)
            words[STEP_GROUP], words[STEP_GROUP_SIZE] = group, group_size
            words[STEP_SEQ] = step                               # last
        self._map_versions[step % STEP_RING] = map_version
        self._entry_workers[step % STEP_RING] = workers
        return step

    def _check_workers(self, workers: tuple[int, ...] | None) -> tuple[int, ...]:
        if workers is None:
            return tuple(range(len(self.channels)))
        workers = tuple(workers)
        ascending = list(workers) == sorted(set(workers))
        if not workers or not ascending or workers[0] < 0 or workers[-1] >= len(self.channels):
            raise ValueError(f"a step's expert workers must be distinct ascending indexes below "
                             f"{len(self.channels)}; got {workers}")
        return workers

    def _await_ring_entry(self, step: int, workers: tuple[int, ...]) -> None:
        """Before announcing ``step`` in a ring entry: wait until each of its expert ranks wrote the status of
        the step announced to it there before (it read that header; a step never finished is dropped here)."""
        deadline = time.monotonic() + self.timeout_s
        for worker in workers:
            old, channel = self._announced[worker][step % STEP_RING], self.channels[worker]
            if not old:
                continue
            status = channel.step_status(old)
            try:
                done = wait_until(lambda: int(status[STEP_STATUS_SEQ]) >= old, deadline, lambda: self._gone(worker))
            except PeerGone as exc:
                rank = self.side.expert_ranks[worker]
                raise PeerLost(f"expert rank {rank} lost before step {step}: {exc}", peer_rank=rank) from None
            if not done:
                rank = self.side.expert_ranks[worker]
                raise DataPlaneTimeout(f"expert rank {rank} has not finished step {old} within {self.timeout_s}s; "
                                       f"step {step} not announced", peer_rank=rank, micro_batch=self.slot)

    def expect_step(self, num_tokens: int, weight_dtype: torch.dtype = torch.float32,
                    workers: tuple[int, ...] | None = None) -> None:
        """Host: the shapes and expert workers of the next ``send``/``receive`` calls, announcing nothing —
        for capturing them in a CUDA graph (nothing runs then; each replay is preceded by a ``begin_step``
        with the same workers)."""
        if not 0 < num_tokens <= self.side.shape.max_tokens or weight_dtype not in DTYPE_CODES:
            raise ValueError(f"a step of {num_tokens} tokens ({weight_dtype}); the channels hold 1 to "
                             f"{self.side.shape.max_tokens}")
        self.num_tokens, self.weight_dtype, self.workers = num_tokens, weight_dtype, self._check_workers(workers)

    def send(self, layer: int, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """hidden [T, D], slot_ids [T, K] physical (-1 = none), weights [T, K]: launches only."""
        t = self.num_tokens
        if hidden.shape != (t, self.side.shape.hidden_size) or slot_ids.shape != (t, self.side.shape.top_k) \
                or weights.shape != slot_ids.shape or weights.dtype != self.weight_dtype:
            raise ValueError(f"step of T={t}: need hidden [T, {self.side.shape.hidden_size}], slot_ids and weights "
                             f"[T, {self.side.shape.top_k}] {self.weight_dtype}; got {tuple(hidden.shape)}, "
                             f"{tuple(slot_ids.shape)}, {tuple(weights.shape)} {weights.dtype}")
        readiness = self.side.step_readiness
        for channel in (self.channels[worker] for worker in self.workers):
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
        t, workers = self.num_tokens, self.workers
        single = len(workers) == 1                 # one partial: the float32 sum of it alone is the partial
        if single and self.fused:                  # one launch: the wait, then the partial's copy
            only = self.channels[workers[0]]
            out = torch.empty(t, self.side.shape.hidden_size, dtype=self.side.shape.dtype, device=self.side.device)
            self.side.step_readiness.wait_and_copy_step(only, Flag.STEP_OUT, self.counter, layer,
                                                        self._spin_budget, self.side.expert_ranks[workers[0]],
                                                        only.partial[:t], out)
            return out
        out = None if single else torch.zeros(t, self.side.shape.hidden_size, dtype=self._acc_dtype,
                                              device=self.side.device)
        deadline = time.monotonic() + self.timeout_s
        for worker in workers:
            channel, rank = self.channels[worker], self.side.expert_ranks[worker]
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

    def finish_step(self, step: int | None = None, device_error: int | None | bool = True) -> None:
        """Host, after step ``step`` (default: the last announced) ran: raise what went wrong on the expert
        side, if anything. ``device_error``: the expert rank whose device wait ran out of budget in the step,
        read by the caller from a copy queued behind it (``Readiness.snapshot_error``; None: none); True:
        read it here (syncs on GPUs)."""
        step = self.step if step is None else step
        if not 0 < step <= self.step or self.step - step >= STEP_RING:
            raise ValueError(f"step {step}: this exchange announced up to {self.step}, and keeps the status of the "
                             f"last {STEP_RING}")
        deadline = time.monotonic() + self.timeout_s
        errors: list[Exception] = []
        for worker in self._entry_workers[step % STEP_RING]:
            rank, words = self.side.expert_ranks[worker], self.channels[worker].step_status(step)
            try:
                done = wait_until(lambda: int(words[STEP_STATUS_SEQ]) == step, deadline,
                                  lambda: self._gone(worker))
            except PeerGone as exc:
                errors.append(PeerLost(f"expert rank {rank} lost during step {step}: {exc}", peer_rank=rank))
                continue
            if not done:
                errors.append(DataPlaneTimeout(f"expert rank {rank} did not finish step {step} within "
                                               f"{self.timeout_s}s", peer_rank=rank, micro_batch=self.slot))
                continue
            status, held, error = read_status(words, STEP_STATUS)
            version = self._map_versions[step % STEP_RING]
            if status == Status.STALE_VERSION:
                errors.append(StaleMapVersion(f"expert rank {rank} does not hold map version {version} "
                                              f"(step {step}): {error}", requested=version,
                                              held_versions=held, peer_rank=rank))
            elif status == Status.ERROR:
                errors.append(RemoteExpertError(f"expert rank {rank} failed step {step}: {error}",
                                                peer_rank=rank))
        late = self.side.step_readiness.take_device_error() if device_error is True else device_error
        if late is not None:
            errors.append(DataPlaneTimeout(f"a device-side wait for expert rank {late} ran out of budget in step "
                                           f"{step}: its results are not valid", peer_rank=late))
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {type(other).__name__}: {other}")
            raise errors[0]

    def _gone(self, worker: int) -> str:
        """Why expert ``worker`` cannot answer, or "". A restarted process that joined again is taken
        (``AttentionSide.readmit``): the ring entries its predecessor never answered are forgotten."""
        reason = self.side.unreachable(worker, self.slot)
        if self._epochs[worker] != self.side.epochs[worker]:
            self._epochs[worker] = self.side.epochs[worker]
            self._announced[worker] = [0] * STEP_RING
        return reason

