"""Remote experts over the ``cuda_ipc`` step path: the MoE exchange of a whole step as device work.

Legend: T tokens of the step (a CUDA graph's bucket size when replayed), D hidden, K top-k, L MoE
layers, S slots per expert worker.

The per-message path (``RemoteExperts`` + ``CudaIpcDispatcher``) splits tokens by worker and waits
for partials on the host at every layer, so a forward pass through it cannot be captured. Here the
host speaks once per step and every layer's hand-off is a launch (``cuda_ipc_step.StepExchange``):

- ``begin_step(T, map)`` — host, before the step's launches or its graph replay: the step (T, map
  version, L, S) is announced to every expert worker, which enqueues all L layers' wait → compute
  → signal on its own stream;
- ``dispatch`` per MoE layer: route (device), then copy all T rows into every expert's channel and
  signal (``send``); ``combine``: wait for each worker's partial on the device and add them in
  worker order (``receive``) — both only launch work, so the GPU runner captures them in its graphs;
- ``finish_step()`` — host, after the launches: the expert side's status for the step. A map version
  an expert worker does not hold yet (``StaleMapVersion``: a race with its own map update) makes the
  runner redo the whole step once the worker catches up; the step's KV writes are the same values
  again, so redoing is safe.

``expect_step(T)`` is ``begin_step`` without the announcement, for capturing a graph (nothing runs).
On a CPU device (tests) the same calls run through host shared memory and wait on the host.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.expert_routing import ExpertRouter
from epserve.attention_worker.moe_executor import LoadSink, route
from epserve.expert_map import ExpertMap
from epserve.models.decoder import MoECall

WEIGHT_DTYPE = torch.float32       # the GPU routing kernels give float32 top-k weights


class StepExperts:
    def __init__(self, dispatcher, router: ExpertRouter, num_moe_layers: int, timeout_s: float,
                 record_load: LoadSink | None = None) -> None:
        """``dispatcher``: a ``CudaIpcDispatcher`` (``make_dispatcher("cuda_ipc", ...)``)."""
        self.dispatcher, self.router, self.record_load = dispatcher, router, record_load
        self.num_moe_layers = num_moe_layers
        self.exchange = dispatcher.step_exchange(0, timeout_s)      # the GPU runner runs one micro-batch
        self.capturable = dispatcher.side.device.type == "cuda"    # device flags; host waits on a CPU

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        self.router.prepare(expert_map, device)

    def begin_step(self, num_tokens: int, expert_map: ExpertMap) -> None:
        self.exchange.begin_step(num_tokens, expert_map.version, self.num_moe_layers, expert_map.slots_per_worker,
                                 weight_dtype=WEIGHT_DTYPE)

    def expect_step(self, num_tokens: int) -> None:
        self.exchange.expect_step(num_tokens, WEIGHT_DTYPE)

    def finish_step(self) -> None:
        self.exchange.finish_step()

    def dispatch(self, call: MoECall, expert_map: ExpertMap, micro_batch: int) -> int:
        physical = route(self.router, call, expert_map)                                 # [T, K]
        if self.record_load is not None:
            self.record_load(call.moe_layer, physical)
        self.exchange.send(call.moe_layer, call.hidden, physical, call.topk_weights.to(WEIGHT_DTYPE))
        return call.moe_layer

    def combine(self, layer: int) -> torch.Tensor:
        return self.exchange.receive(layer)                                             # [T, D]
