"""The data-plane interface: what attention workers and expert workers exchange per MoE layer.

Legend: T tokens, D hidden, K top-k, P physical slots, W expert workers,
S = P // W slots per worker (worker w owns slots [w*S, (w+1)*S)), n tokens sent to one worker.

Flow of one MoE layer of one micro-batch (point to point, MegaScale-Infer's M2N):

1. The attention side calls ``ExpertDispatcher.dispatch(header, hidden [T, D], slot_ids [T, K],
   weights [T, K], S)``. For every expert worker w that holds ≥1 of a token's K slots, the
   token goes to w with its slot ids made local to w (slot − w*S, -1 for choices held
   elsewhere) and its K weights. Workers that get nothing get no message. ``dispatch``
   returns a ``PendingCombine`` at once so two micro-batches can be in flight (ping-pong).
2. The expert side (``ExpertServer.serve(compute)``) runs ``ExpertCompute`` on what arrived,
   batching requests that arrived together for the same (layer, map version), and sends each
   requester its weighted partial sum [n, D].
3. ``ExpertDispatcher.combine(pending, timeout_s)`` adds the partials into out [T, D], in
   worker order (so every backend gives bit-identical sums), or raises one of the typed
   errors below. Nothing waits without a deadline.

Every message carries a ``BatchHeader``: the expert-map version the tokens were routed with,
the MoE layer, the micro-batch, the attempt (elastic EP redoes an interrupted layer under a new
map version as a new attempt; an answer to an older attempt is never taken for it) and a W3C
trace context for tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_TRACE_CONTEXT_BYTES = 64


@dataclass(frozen=True)
class BatchHeader:
    """What every data-plane message carries."""

    map_version: int
    layer: int
    micro_batch: int
    num_tokens: int
    trace_context: bytes = b""   # W3C traceparent of the sender's step span
    # Set by an expert server on the header it hands ``ExpertCompute`` for a batch of several
    # requests: every request's ``trace_context``, in order (not sent on the wire).
    trace_contexts: tuple[bytes, ...] = ()
    attempt: int = 0             # the sender's id of this try (a retry of the layer is a new attempt)

    def __post_init__(self) -> None:
        if len(self.trace_context) > MAX_TRACE_CONTEXT_BYTES:
            raise ValueError(f"trace_context is {len(self.trace_context)} bytes; "
                             f"at most {MAX_TRACE_CONTEXT_BYTES} fit in a data-plane header")
        if self.num_tokens < 0 or self.layer < 0 or self.map_version < 0 or self.attempt < 0:
            raise ValueError(f"num_tokens, layer, map_version and attempt must be >= 0: {self}")


class DataPlaneTimeout(TimeoutError):
    """A data-plane wait passed its deadline. ``peer_rank`` is the rank that did not answer."""

    def __init__(self, message: str, *, peer_rank: int | None = None, layer: int | None = None,
                 micro_batch: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank, self.layer, self.micro_batch = peer_rank, layer, micro_batch


class StaleMapVersion(RuntimeError):
    """The expert side does not hold the map version the tokens were routed with.

    ``held_versions``: the versions the expert side holds (empty when unknown).
    """

    def __init__(self, message: str = "", *, requested: int | None = None,
                 held_versions: Sequence[int] = (), peer_rank: int | None = None) -> None:
        if not message:
            message = f"map version {requested} not held; held versions: {list(held_versions)}"
        super().__init__(message)
        self.requested, self.held_versions, self.peer_rank = requested, tuple(held_versions), peer_rank


class PeerLost(ConnectionError):
    """A peer died or its connection broke; exchanges with it cannot complete."""

    def __init__(self, message: str, *, peer_rank: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank = peer_rank


class RemoteExpertError(RuntimeError):
    """The expert side's ``ExpertCompute`` raised something other than ``StaleMapVersion``."""

    def __init__(self, message: str, *, peer_rank: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank = peer_rank


class BackendUnavailable(RuntimeError):
    """The ``--moe-a2a-backend`` named cannot run here (package missing, no GPU, not built)."""


@dataclass
class PendingCombine:
    """What ``dispatch`` hands back and ``combine`` consumes. Backends add their own state.

    ``shares`` lists, in worker order, the non-empty shares that were sent.
    """

    header: BatchHeader
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    shares: list = field(default_factory=list)   # list[WorkerShare]


class ExpertCompute(Protocol):
    """What an expert worker plugs in: the weighted partial sum over its local slots."""

    def __call__(self, header: BatchHeader, hidden: torch.Tensor, local_slot_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """hidden [n, D], local_slot_ids [n, K] int64 (-1 = not here), weights [n, K] → [n, D].

        May raise ``StaleMapVersion``. When several requests are batched, ``header`` is the
        first request's with ``num_tokens`` = n of the batch and ``trace_contexts`` = every
        request's ``trace_context`` (so a tracing compute can link all senders).
        """
        ...


class ExpertDispatcher(Protocol):
    """The attention side. One dispatcher is used from one thread."""

    def dispatch(self, header: BatchHeader, hidden: torch.Tensor, slot_ids: torch.Tensor,
                 weights: torch.Tensor, slots_per_worker: int) -> PendingCombine:
        """hidden [T, D], slot_ids [T, K] physical int64, weights [T, K]; returns at once."""
        ...

    def combine(self, pending: PendingCombine, timeout_s: float) -> torch.Tensor:
        """→ out [T, D]; raises DataPlaneTimeout, StaleMapVersion, PeerLost or RemoteExpertError."""
        ...

    def close(self) -> None: ...


class ExpertServer(Protocol):
    """The expert side."""

    def serve(self, compute: ExpertCompute) -> None:
        """Serve whoever sends until ``stop()``; blocks the calling thread."""
        ...

    def stop(self) -> None:
        """Thread-safe; makes ``serve`` return."""
        ...
