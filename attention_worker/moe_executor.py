"""Where the attention side sends a MoE layer's tokens: ``MoEExecutor`` and its two kinds.

Legend: T tokens, D hidden, K top-k, P physical slots.

``dispatch`` starts the experts' work for one micro-batch and returns at once; ``combine``
waits for the [T, D] result. Both executors first map logical experts to physical slots with
the current expert map and the ``ExpertRouter``.

- ``InProcessExperts`` (``--moe-a2a-backend local``): all P slots live in this process.
- ``RemoteExperts``: slots live on expert workers, reached through a data-plane
  ``ExpertDispatcher`` (``epserve.dataplane``); every message carries the map version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from attention_worker.expert_routing import ExpertRouter
from epserve.expert_map import ExpertMap
from epserve.models.expert_side import ExpertSlots
from epserve.models.qwen3_moe import MoECall
from epserve.moe_runner import MoERunner


class MoEExecutor(Protocol):
    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> object: ...

    def combine(self, handle: object) -> torch.Tensor: ...


STALE_RETRY_S = 0.05
LoadSink = Callable[[int, torch.Tensor], None]   # (moe_layer, physical slot ids [T, K])


class InProcessExperts:
    def __init__(self, slots: ExpertSlots, runner: MoERunner, router: ExpertRouter,
                 record_load: LoadSink | None = None) -> None:
        self.slots, self.runner, self.router, self.record_load = slots, runner, router, record_load

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> torch.Tensor:
        physical = self.router.to_physical(expert_map, call.moe_layer, call.topk_ids)   # [T, K]
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


class RemoteExperts:
    def __init__(self, dispatcher, router: ExpertRouter, timeout_s: float,
                 record_load: LoadSink | None = None, trace_context: Callable[[], bytes] | None = None) -> None:
        self.dispatcher, self.router, self.timeout_s = dispatcher, router, timeout_s
        self.record_load, self.trace_context = record_load, trace_context

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int, record: bool = True) -> _Pending:
        from epserve.dataplane import BatchHeader

        physical = self.router.to_physical(expert_map, call.moe_layer, call.topk_ids)
        if record and self.record_load is not None:
            self.record_load(call.moe_layer, physical)
        header = BatchHeader(map_version=expert_map.version, layer=call.moe_layer, micro_batch=micro_batch,
                             num_tokens=int(call.hidden.shape[0]),
                             trace_context=self.trace_context() if self.trace_context else b"")
        return _Pending(self.dispatcher.dispatch(header, call.hidden, physical, call.topk_weights,
                                                 expert_map.slots_per_worker), call, expert_map, micro_batch)

    def combine(self, handle: _Pending) -> torch.Tensor:
        """Waits for the experts; an expert worker that does not hold the map version yet (a race
        with its own map update) is asked again until ``timeout_s`` has passed."""
        from epserve.dataplane import StaleMapVersion

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self.dispatcher.combine(handle.dispatcher_handle, max(deadline - time.monotonic(), 0.001))
            except StaleMapVersion:
                if time.monotonic() + STALE_RETRY_S > deadline:
                    raise
                time.sleep(STALE_RETRY_S)
                handle = self.dispatch(handle.call, handle.expert_map, handle.micro_batch, record=False)


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
