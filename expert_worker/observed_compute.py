"""The data plane's ``ExpertCompute`` with telemetry around ``ExpertStore.compute``.

One call serves one batch: the requests of one or more attention workers (one MoE layer, one
map version), so it has no single parent. With tracing on and at least one sender sampled
(``header.trace_contexts``, or ``header.trace_context`` for a batch of one), it runs in an
``expert.compute`` span: a child of the first sampled sender's ``attention.step`` span, linked
to every sender's. Unsampled steps send ``b""`` and cost one ``any()`` here. Metrics: batches,
tokens, compute time, refusals of a map version not held.

Runs on the expert server's compute thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from epserve.telemetry import NO_SPAN, ExpertWorkerMetrics, Tracing

Compute = Callable[..., torch.Tensor]


class ObservedCompute:
    def __init__(self, compute: Compute, tracing: Tracing, metrics: ExpertWorkerMetrics | None) -> None:
        self._compute, self._tracing, self._metrics = compute, tracing, metrics

    def __call__(self, header, hidden: torch.Tensor, local_slot_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """hidden [n, D], local_slot_ids [n, K], weights [n, K] → [n, D]."""
        span = NO_SPAN
        contexts = header.trace_contexts or (header.trace_context,)
        if self._tracing.enabled and any(contexts):
            span = self._tracing.linked_span("expert.compute", contexts, attributes={
                "epserve.layer": header.layer, "epserve.map_version": header.map_version,
                "epserve.num_tokens": header.num_tokens, "epserve.num_senders": len(contexts)})
        metrics = self._metrics
        if metrics is None:
            with span:
                return self._compute(header, hidden, local_slot_ids, weights)
        from epserve.dataplane import StaleMapVersion

        start = time.perf_counter()
        try:
            with span:
                out = self._compute(header, hidden, local_slot_ids, weights)
        except StaleMapVersion:
            metrics.stale_version_refusals.inc()
            raise
        metrics.compute_duration.observe(time.perf_counter() - start)
        metrics.batches.inc()
        metrics.tokens.inc(header.num_tokens)
        return out

    def observe_replay(self, num_tokens: int, num_layers: int) -> None:
        """A step replayed from a CUDA graph (``cuda_ipc_step_server.StepGraphs``): its ``num_layers`` compute
        calls ran on the device without passing through ``__call__`` (no duration, no span)."""
        if self._metrics is not None:
            self._metrics.batches.inc(num_layers)
            self._metrics.tokens.inc(num_tokens * num_layers)
