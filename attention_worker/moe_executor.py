"""Where the attention side sends a MoE layer's tokens: ``MoEExecutor`` and its two kinds.

Legend: T tokens, D hidden, K top-k, P physical slots.

``dispatch`` starts the experts' work for one micro-batch and returns at once; ``combine``
waits for the [T, D] result. Both executors first map logical experts to physical slots with
the current expert map and the ``ExpertRouter``.

- ``InProcessExperts`` (``--moe-a2a-backend local``): all P slots live in this process.
- ``RemoteExperts``: slots live on expert workers, reached through a data-plane
  ``ExpertDispatcher`` (``epserve.dataplane``); every message carries the map version and
  the trace context of the span current at dispatch (the engine's ``attention.step`` on a
  sampled step, else nothing: ``b""``). On a sampled step, ``moe.dispatch`` and ``moe.combine``
  spans (children of the step span) time each exchange; on other steps tracing costs one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from epserve.attention_worker.expert_routing import ExpertRouter
from epserve.expert_map import ExpertMap
from epserve.telemetry import NO_SPAN, Tracing, setup_tracing
from epserve.models.expert_side import ExpertSlots
from epserve.models.decoder import MoECall
from epserve.moe_runner import MoERunner

if TYPE_CHECKING:
    from epserve.attention_worker.elastic import ElasticRecovery


class MoEExecutor(Protocol):
    # Whether dispatch/combine only launch device work (no host sync), so a forward pass through
    # them can be captured in a CUDA graph.
    capturable: bool
    # Whether the engine may launch a step before the step before it has finished (the overlap schedule,
    # engine.py): experts in this process, where a step is device work queued in order, or the cuda_ipc
    # step path, whose status is read after the step's tokens (``end_step``); not experts answered within
    # the step on the host (``RemoteExperts``).
    overlappable: bool

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        """Host, once per step before the forward pass: what routing on ``device`` needs."""
        ...

    # Step hooks of the GPU runner (no-ops unless the exchange is announced per step, as the
    # cuda_ipc step path is: attention_worker/step_experts.py). ``begin_step`` before a step's
    # launches or graph replay, ``end_step`` after them (→ the check to call once the step's tokens are
    # on the host: it raises what the expert side reported; ``finish_step``: that check at once),
    # ``expect_step`` before capturing a graph. ``sizes``: the tokens of each micro-batch of the step;
    # ``step_micro_batches``: how many the GPU runner splits a decode step into.
    step_micro_batches: int

    def begin_step(self, sizes: list[int], expert_map: ExpertMap) -> None: ...

    def expect_step(self, sizes: list[int]) -> None: ...

    def end_step(self) -> Callable[[], None]: ...

    def finish_step(self) -> None: ...

    # Elastic EP on the step path: the expert workers a step under a map goes to (None: not announced per
    # step; a decode graph holds that set, so it is captured again when the set changes), and the map to
    # redo a step with after an expert worker was lost or late (raises the error when none recovers it).
    def step_workers(self, expert_map: ExpertMap) -> tuple[int, ...] | None: ...

    def recover(self, error: Exception, expert_map: ExpertMap) -> ExpertMap: ...

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> object: ...

    def combine(self, handle: object) -> torch.Tensor: ...


STALE_RETRY_S = 0.05
LoadSink = Callable[[int, torch.Tensor], None]   # (moe_layer, physical slot ids [T, K], -1 = none)


def route(router: ExpertRouter, call: MoECall, expert_map: ExpertMap) -> torch.Tensor:
    """Physical slot ids [T, K] of a call's choices; padding rows (``call.padding_rows``) get -1,
    which every expert runner and data plane skips: padding costs no expert compute."""
    physical = router.to_physical(expert_map, call.moe_layer, call.topk_ids)
    if call.padding_rows is not None:
        physical = physical.masked_fill(call.padding_rows, -1)
    return physical


class NoStepHooks:
    """The step hooks of an executor whose exchange needs no per-step announcement; the GPU runner runs
    its steps as one micro-batch (experts in process gain nothing from two)."""

    step_micro_batches = 1

    def begin_step(self, sizes: list[int], expert_map: ExpertMap) -> None:
        pass

    def expect_step(self, sizes: list[int]) -> None:
        pass

    def end_step(self) -> Callable[[], None]:
        return _nothing_to_check

    def finish_step(self) -> None:
        pass

    def step_workers(self, expert_map: ExpertMap) -> tuple[int, ...] | None:
        return None

    def recover(self, error: Exception, expert_map: ExpertMap) -> ExpertMap:
        raise error


def _nothing_to_check() -> None:
    pass


class InProcessExperts(NoStepHooks):
    overlappable = True

    def __init__(self, slots: ExpertSlots, runner: MoERunner, router: ExpertRouter,
                 record_load: LoadSink | None = None) -> None:
        self.slots, self.runner, self.router, self.record_load = slots, runner, router, record_load
        self.capturable = bool(getattr(runner, "capturable", False))

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        self.router.prepare(expert_map, device)

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> torch.Tensor:
        physical = route(self.router, call, expert_map)                                # [T, K]
        if self.record_load is not None:
            self.record_load(call.moe_layer, physical)
        return self.slots.compute(self.runner, call.moe_layer, call.hidden, physical, call.topk_weights)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


@dataclass
class _Pending:
    dispatcher_handle: object
    call: MoECall
    expert_map: ExpertMap
    micro_batch: int
    trace_context: bytes = b""       # the step span's, b"" when the step is not traced


class RemoteExperts(NoStepHooks):
    """``tracing``: the process's handle (default off). ``on_timeout(peer_rank)``: called when a
    combine passes its deadline, before the ``DataPlaneTimeout`` propagates (metrics).
    ``recovery`` (elastic EP, ``elastic.py``): a layer whose exchange fails with ``PeerLost`` or
    ``DataPlaneTimeout`` is redone — under a newer map, or on a new link — instead of raising;
    every dispatch is a new attempt (``BatchHeader.attempt``)."""

    overlappable = False        # the expert workers' replies are waited for within the step (combine)

    def __init__(self, dispatcher, router: ExpertRouter, timeout_s: float, record_load: LoadSink | None = None,
                 tracing: Tracing | None = None, on_timeout: Callable[[int | None], None] | None = None,
                 recovery: ElasticRecovery | None = None) -> None:
        self.dispatcher, self.router, self.timeout_s = dispatcher, router, timeout_s
        self.record_load, self.on_timeout, self.recovery = record_load, on_timeout, recovery
        self._num_attempts = 0
        # host-mediated transports (gloo, NCCL point to point) wait on the host in combine
        self.capturable = bool(getattr(dispatcher, "capturable", False))
        self.tracing = tracing if tracing is not None else setup_tracing("epserve-attention-worker", None)

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        self.router.prepare(self._effective(expert_map), device)

    def _effective(self, expert_map: ExpertMap) -> ExpertMap:
        """A newer map adopted mid-step by the recovery routes the rest of the step."""
        return expert_map if self.recovery is None else self.recovery.effective(expert_map)

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int, record: bool = True,
                 trace_context: bytes | None = None) -> _Pending:
        from epserve.dataplane import BatchHeader, PeerLost

        effective = self._effective(expert_map)
        record, expert_map = record and effective is expert_map, effective     # the recorder counts the step's map
        self._num_attempts += 1
        if trace_context is None:
            trace_context = self.tracing.current_trace_context()
        num_tokens = int(call.hidden.shape[0])
        span = self.tracing.span("moe.dispatch", attributes=_span_attributes(call, micro_batch, num_tokens)) \
            if trace_context else NO_SPAN
        with span:
            physical = route(self.router, call, expert_map)
            if record and self.record_load is not None:
                self.record_load(call.moe_layer, physical)
            header = BatchHeader(map_version=expert_map.version, layer=call.moe_layer, micro_batch=micro_batch,
                                 num_tokens=num_tokens, trace_context=trace_context, attempt=self._num_attempts)
            try:
                handle = self.dispatcher.dispatch(header, call.hidden, physical, call.topk_weights,
                                                  expert_map.slots_per_worker)
            except PeerLost as exc:          # a link known lost: combine recovers (or raises it)
                if self.recovery is None:
                    raise
                handle = exc
        return _Pending(handle, call, expert_map, micro_batch, trace_context)

    def combine(self, handle: _Pending) -> torch.Tensor:
        """Waits for the experts; an expert worker that does not hold the map version yet (a race
        with its own map update) is asked again until ``timeout_s`` has passed."""
        if not handle.trace_context:
            return self._combine(handle)
        call = handle.call
        with self.tracing.span("moe.combine", attributes=_span_attributes(call, handle.micro_batch,
                                                                          int(call.hidden.shape[0]))):
            return self._combine(handle)

    def _combine(self, handle: _Pending) -> torch.Tensor:
        from epserve.dataplane import DataPlaneTimeout, PeerLost, StaleMapVersion

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if isinstance(handle.dispatcher_handle, PeerLost):
                    raise handle.dispatcher_handle
                return self.dispatcher.combine(handle.dispatcher_handle, max(deadline - time.monotonic(), 0.001))
            except StaleMapVersion:
                if time.monotonic() + STALE_RETRY_S > deadline:
                    raise
                time.sleep(STALE_RETRY_S)
                handle = self.dispatch(handle.call, handle.expert_map, handle.micro_batch, record=False,
                                       trace_context=handle.trace_context)
            except (DataPlaneTimeout, PeerLost) as exc:
                if isinstance(exc, DataPlaneTimeout) and self.on_timeout is not None:
                    self.on_timeout(exc.peer_rank)
                if self.recovery is None:
                    raise
                expert_map = self.recovery.recover(handle.expert_map, exc)       # raises exc when out of time
                handle = self.dispatch(handle.call, expert_map, handle.micro_batch, record=False,
                                       trace_context=handle.trace_context)
                deadline = time.monotonic() + self.timeout_s


def _span_attributes(call: MoECall, micro_batch: int, num_tokens: int) -> dict[str, int]:
    return {"epserve.layer": call.moe_layer, "epserve.micro_batch": micro_batch, "epserve.num_tokens": num_tokens}


def run_micro_batches(generators: list, executor: MoEExecutor, expert_map: ExpertMap) -> list[torch.Tensor]:
    """Drive ``forward_steps`` generators in ping-pong: while micro-batch i waits on its experts,
    the others run attention. Returns each generator's return value (logits)."""
    results: list[torch.Tensor | None] = [None] * len(generators)
    handles: dict[int, object] = {}

    def advance(index: int, value: torch.Tensor | None) -> None:
        try:
            call = next(generators[index]) if value is None else generators[index].send(value)
        except StopIteration as stop:
            results[index] = stop.value
            return
        handles[index] = executor.dispatch(call, expert_map, index)

    for index in range(len(generators)):
        advance(index, None)
    while handles:
        for index in sorted(handles):
            advance(index, executor.combine(handles.pop(index)))
    return results
