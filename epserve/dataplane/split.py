"""Backend-independent halves of dispatch and combine: who gets which tokens, and the sum.

Legend: T tokens, D hidden, K top-k, W expert workers, S slots per worker, n tokens of one
worker's share.

``split_by_worker`` decides what each expert worker gets; ``CombineSum`` adds the partial sums
that come back. Every backend uses both, in worker order, so all backends give bit-identical
results for the same per-worker partials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.dataplane.base import BatchHeader


@dataclass(frozen=True)
class WorkerShare:
    """The tokens one expert worker gets.

    token_idx [n] int64 (rows of the caller's [T, ...] tensors), local_slot_ids [n, K] int64
    (slot − worker*S, -1 for choices held by other workers), weights [n, K] (0 where the
    local id is -1).
    """

    worker: int
    token_idx: torch.Tensor
    local_slot_ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_idx.shape[0])


def split_by_worker(slot_ids: torch.Tensor, weights: torch.Tensor, slots_per_worker: int,
                    num_workers: int) -> list[WorkerShare]:
    """slot_ids [T, K] physical (-1 = no choice), weights [T, K] → one share per worker (n may be 0).

    A token goes to every worker holding ≥1 of its K slots.
    """
    if slot_ids.dim() != 2 or weights.shape != slot_ids.shape:
        raise ValueError(f"slot_ids and weights must both be [T, K]; got {tuple(slot_ids.shape)} "
                         f"and {tuple(weights.shape)}")
    if slots_per_worker <= 0 or num_workers <= 0:
        raise ValueError(f"slots_per_worker ({slots_per_worker}) and num_workers ({num_workers}) must be > 0")
    slot_ids = slot_ids.to(torch.int64)
    if slot_ids.numel() and int(slot_ids.max()) >= slots_per_worker * num_workers:
        raise ValueError(f"slot id {int(slot_ids.max())} out of range: {num_workers} workers × "
                         f"{slots_per_worker} slots")
    owner = torch.where(slot_ids >= 0, slot_ids // slots_per_worker, -1)              # [T, K]
    shares = []
    for worker in range(num_workers):
        mine = owner == worker                                                          # [T, K]
        token_idx = mine.any(dim=1).nonzero().squeeze(1)                                # [n]
        mine = mine[token_idx]
        local = torch.where(mine, slot_ids[token_idx] - worker * slots_per_worker, -1)  # [n, K]
        local_weights = torch.where(mine, weights[token_idx], 0).to(weights.dtype)      # [n, K]
        shares.append(WorkerShare(worker, token_idx, local, local_weights))
    return shares


class CombineSum:
    """out [T, D]: the sum of the partials of every share, accumulated in float32 or wider.

    Add partials in worker order (``add``), then take the result (``result``).
    """

    def __init__(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.dtype = dtype
        acc_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
        self.out = torch.zeros(num_tokens, hidden_size, dtype=acc_dtype, device=device)

    def add(self, share: WorkerShare, partial: torch.Tensor) -> None:
        """partial [n, D] for the rows ``share.token_idx``."""
        if partial.shape != (share.num_tokens, self.out.shape[1]):
            raise ValueError(f"partial of worker {share.worker} is {tuple(partial.shape)}, "
                             f"expected {(share.num_tokens, self.out.shape[1])}")
        self.out.index_add_(0, share.token_idx, partial.to(self.out.dtype))

    def result(self) -> torch.Tensor:
        return self.out.to(self.dtype)


def check_dispatch_inputs(header: BatchHeader, hidden: torch.Tensor, slot_ids: torch.Tensor,
                          weights: torch.Tensor) -> None:
    """hidden [T, D], slot_ids [T, K], weights [T, K], T == header.num_tokens, or ValueError."""
    if hidden.dim() != 2 or slot_ids.dim() != 2 or weights.shape != slot_ids.shape:
        raise ValueError(f"need hidden [T, D], slot_ids [T, K], weights [T, K]; got {tuple(hidden.shape)}, "
                         f"{tuple(slot_ids.shape)}, {tuple(weights.shape)}")
    if not hidden.shape[0] == slot_ids.shape[0] == header.num_tokens:
        raise ValueError(f"header.num_tokens={header.num_tokens} but hidden has {hidden.shape[0]} rows "
                         f"and slot_ids {slot_ids.shape[0]}")
