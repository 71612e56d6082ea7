"""Remote experts over the ``cuda_ipc`` step path: the MoE exchange of a whole step as device work.

Legend: T tokens of the step (a CUDA graph's bucket size when replayed), D hidden, K top-k, L MoE
layers, S slots per expert worker.

The per-message path (``RemoteExperts`` + ``CudaIpcDispatcher``) splits tokens by worker and waits
for partials on the host at every layer, so a forward pass through it cannot be captured. Here the
host speaks once per step and every layer's hand-off is a launch (``cuda_ipc_step.StepExchange``):

- ``begin_step([T0, T1], map)`` — host, before the step's launches or its graph replay: the step (its
  micro-batches' tokens, map version, L, S, and its number as their group) is announced to every expert
  worker, which enqueues all L layers' wait → compute → signal on a stream of each micro-batch's slot;
- ``dispatch`` per MoE layer: route (device), then copy all T rows into every expert's channel and
  signal (``send``); ``combine``: wait for each worker's partial on the device and add them in
  worker order (``receive``) — both only launch work, so the GPU runner captures them in its graphs;
- ``end_step()`` — host, after the launches: → the step's check, called once its tokens reached the
  host (``PendingTokens.result``): the expert side's status for the step, and the device error word,
  copied behind the step's launches (no sync). A map version an expert worker does not hold yet
  (``StaleMapVersion``: a race with its own map update) makes the runner redo the whole step once the
  worker catches up; the step's KV writes are the same values again, so redoing is safe. Statuses
  are read after the tokens, and the channels keep the last two steps' announcements and statuses,
  so the engine's overlap schedule launches step N + 1 before step N's check (``overlappable``); a
  stale step N then also drops the step launched ahead of it (``Engine._redo``).
  ``finish_step()`` is ``end_step()()``.

``expect_step(sizes)`` is ``begin_step`` without the announcement, for capturing a graph (nothing runs).

Two micro-batches (``--num-micro-batches 2``): the GPU runner splits a decode step's sequences in two
halves and interleaves them layer by layer (``run_micro_batches``): half B's attention runs while the
expert workers compute half A's experts, each half through its own channel slot. It runs through host
memory (CPU devices); on a GPU it is refused (``GPU_TWO_MICRO_BATCHES``): an H100 hung at start-up,
first in an expert worker's graph capture of one slot with the other slot's kernels in flight, then in
the first two-slot step (eager) when each slot had an expert thread of its own. The expert side now
takes a step's halves (announced as one group) in one thread per attention rank, enqueued in this
rank's order (``dataplane/cuda_ipc_step_server.py``), not yet proven on a GPU:
``EPSERVE_GPU_TWO_MICRO_BATCHES=1`` (the attention worker's ``gpu_two_micro_batches``) lifts the refusal
to try it. The default is one.

On a CPU device (tests) the same calls run through host shared memory and wait on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from epserve.attention_worker.expert_routing import ExpertRouter
from epserve.attention_worker.moe_executor import LoadSink, route
from epserve.dataplane.base import DataPlaneTimeout, PeerLost
from epserve.expert_map import ExpertMap
from epserve.models.decoder import MoECall

if TYPE_CHECKING:
    from epserve.attention_worker.elastic import ElasticRecovery

WEIGHT_DTYPE = torch.float32       # the GPU routing kernels give float32 top-k weights
GPU_TWO_MICRO_BATCHES_ENV = "EPSERVE_GPU_TWO_MICRO_BATCHES"
GPU_TWO_MICRO_BATCHES = (
    "--num-micro-batches 2 is not supported on the GPU cuda_ipc step path yet; use 1 (the default). Expert "
    "workers hung at start-up on an H100 while one slot's kernels waited on this attention worker and the other "
    "slot's expert thread waited for the device (a graph capture, then a first eager step). Two micro-batches run on "
    "the CPU. The expert side's fix (one thread per attention rank, cuda_ipc_step_server.py) is not yet proven on a "
    f"GPU: {GPU_TWO_MICRO_BATCHES_ENV}=1 tries it.")


class StepExperts:
    overlappable = True         # a step's status is read after its tokens; the channels keep two steps' headers

    def __init__(self, dispatcher, router: ExpertRouter, num_moe_layers: int, timeout_s: float,
                 record_load: LoadSink | None = None, num_micro_batches: int = 1,
                 gpu_two_micro_batches: bool = False, recovery: ElasticRecovery | None = None) -> None:
        """``dispatcher``: a ``CudaIpcDispatcher`` (``make_dispatcher("cuda_ipc", ...)``) with at least
        ``num_micro_batches`` channel slots; micro-batch i goes through slot i. ``gpu_two_micro_batches``:
        allow two on a GPU (``EPSERVE_GPU_TWO_MICRO_BATCHES=1``; refused otherwise, not yet proven there).
        ``recovery`` (elastic EP): ``recover`` gives the map to redo a step with after an expert worker was
        lost or late."""
        self.dispatcher, self.router, self.record_load, self.recovery = dispatcher, router, record_load, recovery
        self.num_moe_layers = num_moe_layers
        if not 1 <= num_micro_batches <= dispatcher.side.num_slots:
            raise ValueError(f"{num_micro_batches} micro-batches on cuda_ipc channels of "
                             f"{dispatcher.side.num_slots} slots")
        if num_micro_batches > 1 and dispatcher.side.device.type == "cuda" and not gpu_two_micro_batches:
            raise ValueError(GPU_TWO_MICRO_BATCHES)
        self.step_micro_batches = num_micro_batches     # how many the GPU runner splits a decode step into
        self.exchanges = [dispatcher.step_exchange(slot, timeout_s) for slot in range(num_micro_batches)]
        self._announced: list[int] = []                 # the current step's number in each exchange it uses
        self._workers: tuple[int, ...] | None = None    # the last step's expert workers (a capture's too)
        self._workers_of: tuple[int, tuple[int, ...]] | None = None     # (map version, its workers)
        self.num_steps = 0                              # steps announced: each one's number is its group
        self.capturable = dispatcher.side.device.type == "cuda"    # device flags; host waits on a CPU

    def effective(self, expert_map: ExpertMap) -> ExpertMap:
        """The map steps route with: ``expert_map``, or a newer one the recovery adopted since."""
        return expert_map if self.recovery is None else self.recovery.effective(expert_map)

    def step_workers(self, expert_map: ExpertMap) -> tuple[int, ...]:
        """The expert workers a step under ``expert_map`` goes to: those with a filled slot. A worker that
        died, once elastic EP moved its experts away (placement's re-placed map empties its slots), gets
        nothing sent and nothing awaited; so a decode graph captured with it must be captured again."""
        expert_map = self.effective(expert_map)
        if self._workers_of is None or self._workers_of[0] != expert_map.version:
            num_layers, num_slots = expert_map.phy2log.shape
            filled = (expert_map.phy2log >= 0).view(num_layers, num_slots // expert_map.slots_per_worker, -1)
            workers = tuple(int(w) for w in filled.any(dim=2).any(dim=0).nonzero().flatten())
            self._workers_of = (expert_map.version, workers)
        return self._workers_of[1]

    def recover(self, error: Exception, expert_map: ExpertMap) -> ExpertMap:
        """A step under ``expert_map`` failed with ``error`` (``PeerLost``, ``DataPlaneTimeout``): → the map to
        redo it with (elastic EP: placement re-places a lost worker's experts; ``ElasticRecovery.recover``
        waits for that map); raises ``error`` without recovery or when no map came in time."""
        if self.recovery is None or not isinstance(error, (PeerLost, DataPlaneTimeout)):
            raise error
        return self.recovery.recover(self.effective(expert_map), error)

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        self.router.prepare(self.effective(expert_map), device)

    def begin_step(self, sizes: list[int], expert_map: ExpertMap) -> None:
        """``sizes``: the tokens of each micro-batch of the step (one entry: one micro-batch)."""
        self._check(sizes)
        expert_map = self.effective(expert_map)
        self._workers = self.step_workers(expert_map)
        self.num_steps += 1
        self._announced = [
            exchange.begin_step(num_tokens, expert_map.version, self.num_moe_layers, expert_map.slots_per_worker,
                                weight_dtype=WEIGHT_DTYPE, group=self.num_steps, group_size=len(sizes),
                                workers=self._workers)
            for exchange, num_tokens in zip(self.exchanges, sizes)]

    def expect_step(self, sizes: list[int]) -> None:
        """Before capturing: the shapes of the step, to the workers of the last ``begin_step``."""
        self._check(sizes)
        for exchange, num_tokens in zip(self.exchanges, sizes):
            exchange.expect_step(num_tokens, WEIGHT_DTYPE, self._workers)

    def end_step(self) -> Callable[[], None]:
        """Host, after the step's launches: → its check (call it once the step's tokens are on the host; it
        raises the first micro-batch's failure, the others ride along as notes). Queues a copy of the
        device error word behind the launches; nothing waits here."""
        readiness = self.dispatcher.side.step_readiness
        announced, snapshot = list(zip(self.exchanges, self._announced)), readiness.snapshot_error()

        def check() -> None:
            late = readiness.error_from_snapshot(snapshot)
            errors: list[Exception] = []
            for i, (exchange, step) in enumerate(announced):
                try:
                    exchange.finish_step(step, device_error=late if i == 0 else None)
                except Exception as exc:  # noqa: BLE001 - all slots are checked, then the first error raised
                    errors.append(exc)
            if errors:
                for other in errors[1:]:
                    errors[0].add_note(f"also: {type(other).__name__}: {other}")
                raise errors[0]
        return check

    def finish_step(self) -> None:
        """The step's check, now (waits for the step's launches on the current stream: its tokens need not
        be on the host)."""
        check, device = self.end_step(), self.dispatcher.side.device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()       # the error word's copy has landed
        check()

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> tuple[int, int]:
        physical = route(self.router, call, self.effective(expert_map))                # [T, K]
        if self.record_load is not None:
            self.record_load(call.moe_layer, physical)
        self.exchanges[micro_batch].send(call.moe_layer, call.hidden, physical, call.topk_weights.to(WEIGHT_DTYPE))
        return micro_batch, call.moe_layer

    def combine(self, handle: tuple[int, int]) -> torch.Tensor:
        micro_batch, layer = handle
        return self.exchanges[micro_batch].receive(layer)                               # [T, D]

    def _check(self, sizes: list[int]) -> None:
        if not 1 <= len(sizes) <= len(self.exchanges):
            raise ValueError(f"a step of {len(sizes)} micro-batches; this exchange has {len(self.exchanges)}")
