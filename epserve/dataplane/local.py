"""``--moe-a2a-backend local``: the experts live in this process; no network.

Legend: T tokens, D hidden, K top-k, W expert "workers" (one ``ExpertCompute`` each), S slots
per worker.

``dispatch`` splits the tokens by worker exactly as the networked backends do and returns;
``combine`` calls each worker's ``ExpertCompute`` on its share and adds the partials in worker
order. It is the parity reference for every other backend, and what the colocated engine
uses. Errors raised by a compute (``StaleMapVersion`` included) surface from ``combine``
unchanged. No threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from epserve.dataplane.base import BatchHeader, ExpertCompute, PendingCombine
from epserve.dataplane.split import CombineSum, WorkerShare, check_dispatch_inputs, split_by_worker


@dataclass
class _LocalPending(PendingCombine):
    hidden: torch.Tensor | None = None                     # [T, D]
    share_headers: list[BatchHeader] = field(default_factory=list)


class LocalDispatcher:
    """experts[w] computes the slots of worker w (slot ids local to w)."""

    def __init__(self, experts: Sequence[ExpertCompute]) -> None:
        if not experts:
            raise ValueError("the local data plane needs at least one ExpertCompute")
        self.experts = list(experts)
        self._closed = False

    def dispatch(self, header: BatchHeader, hidden: torch.Tensor, slot_ids: torch.Tensor,
                 weights: torch.Tensor, slots_per_worker: int) -> PendingCombine:
        """hidden [T, D], slot_ids [T, K] physical, weights [T, K]."""
        if self._closed:
            raise RuntimeError("dispatch on a closed LocalDispatcher")
        check_dispatch_inputs(header, hidden, slot_ids, weights)
        shares: list[WorkerShare] = []
        if header.num_tokens:
            shares = [s for s in split_by_worker(slot_ids, weights, slots_per_worker, len(self.experts))
                      if s.num_tokens]
        return _LocalPending(header, int(hidden.shape[1]), hidden.dtype, hidden.device, shares, hidden)

    def combine(self, pending: PendingCombine, timeout_s: float) -> torch.Tensor:
        """→ out [T, D]. ``timeout_s`` is unused: the experts run here, in the caller's thread."""
        assert isinstance(pending, _LocalPending)
        total = CombineSum(pending.header.num_tokens, pending.hidden_size, pending.dtype, pending.device)
        for share in pending.shares:
            header = BatchHeader(pending.header.map_version, pending.header.layer,
                                 pending.header.micro_batch, share.num_tokens, pending.header.trace_context)
            partial = self.experts[share.worker](header, pending.hidden[share.token_idx],
                                                 share.local_slot_ids, share.weights)
            total.add(share, partial)
        return total.result()

    def close(self) -> None:
        self._closed = True

