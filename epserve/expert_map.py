"""The expert map: which physical slot holds which logical expert, per MoE layer.

Legend: L MoE layers, E logical experts, P physical slots (P = E + R redundant),
W expert workers, Rmax the largest replica count of any expert.

Slots are split evenly over workers: slot p lives on worker ``p // (P // W)``.

- ``phy2log [L, P]``      logical expert held by each slot, -1 = empty.
- ``log2phy [L, E, Rmax]`` slots holding each logical expert, -1 padded, ascending.
- ``logcnt  [L, E]``      replica count of each logical expert.

An ``ExpertMap`` is immutable and validated on construction: every logical expert has at
least one replica in every layer. ``log2phy`` and ``logcnt`` are derived from ``phy2log``,
so there is one source of truth. ``version`` is monotonic; ``checksum`` identifies the
content (two maps with equal checksums route identically).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


def derive_log2phy(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [L, P] → (log2phy [L, E, Rmax], logcnt [L, E]). Pure, vectorised (no per-slot loop)."""
    num_layers, num_slots = phy2log.shape
    # Empty slots (-1) count into an extra bucket E that is dropped at the end.
    bucket = torch.where(phy2log >= 0, phy2log, torch.full_like(phy2log, num_logical))
    counts = torch.zeros(num_layers, num_logical + 1, dtype=torch.int64)
    counts.scatter_add_(1, bucket, torch.ones_like(bucket))
    logcnt = counts[:, :num_logical]
    max_replicas = max(int(logcnt.max()), 1) if logcnt.numel() else 1
    # Stable sort of slots by expert keeps each expert's slots ascending; a slot's replica index
    # is its position in the sorted order minus where its expert's run starts.
    order = torch.sort(bucket, dim=1, stable=True).indices                       # [L, P]
    sorted_expert = torch.gather(bucket, 1, order)
    run_start = torch.cumsum(counts, dim=1) - counts                             # [L, E+1]
    replica = torch.arange(num_slots).unsqueeze(0) - torch.gather(run_start, 1, sorted_expert)
    log2phy = torch.full((num_layers, num_logical, max_replicas), -1, dtype=torch.int64)
    layer = torch.arange(num_layers).unsqueeze(1).expand_as(order)
    held = sorted_expert < num_logical
    log2phy[layer[held], sorted_expert[held], replica[held]] = order[held]
    return log2phy, logcnt.contiguous()


@dataclass(frozen=True)
class ExpertMap:
    """A validated, versioned logical↔physical expert placement.

    phy2log: [L, P] int64, -1 for an empty slot.
    slot_owners: worker id per slot group; len(slot_owners) == W, slot p → slot_owners[p // (P // W)].
    """

    phy2log: torch.Tensor
    num_logical_experts: int
    version: int = 0
    slot_owners: tuple[str, ...] = ()
    log2phy: torch.Tensor = field(init=False, repr=False, compare=False)
    logcnt: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phy2log = torch.as_tensor(self.phy2log, dtype=torch.int64).clone()
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be [layers, slots], got shape {tuple(phy2log.shape)}")
        num_layers, num_slots = phy2log.shape
        if num_slots < self.num_logical_experts:
            raise ValueError(
                f"phy2log has {num_slots} slots for {self.num_logical_experts} logical experts; "
                "need at least one slot per expert"
            )
        if (phy2log < -1).any() or (phy2log >= self.num_logical_experts).any():
            raise ValueError(f"phy2log values must be in [-1, {self.num_logical_experts}), got "
                             f"min {int(phy2log.min())} max {int(phy2log.max())}")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
        if self.slot_owners and num_slots % len(self.slot_owners) != 0:
            raise ValueError(f"{num_slots} slots do not split evenly over {len(self.slot_owners)} workers")
        log2phy, logcnt = derive_log2phy(phy2log, self.num_logical_experts)
        missing = (logcnt == 0).nonzero()
        if len(missing):
            layer, expert = (int(v) for v in missing[0])
            raise ValueError(f"logical expert {expert} of MoE layer {layer} has no replica "
                             f"({len(missing)} (layer, expert) pairs uncovered)")
        object.__setattr__(self, "phy2log", phy2log)
        object.__setattr__(self, "slot_owners", tuple(self.slot_owners))
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "logcnt", logcnt)

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_redundant(self) -> int:
        return self.num_physical_slots - self.num_logical_experts

    @property
    def num_workers(self) -> int:
        return len(self.slot_owners)

    @property
    def slots_per_worker(self) -> int:
        assert self.slot_owners, "map has no slot owners"
        return self.num_physical_slots // len(self.slot_owners)

    @property
    def checksum(self) -> str:
        digest = hashlib.sha256()
        digest.update(str(self.num_logical_experts).encode())
        digest.update(self.phy2log.numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- queries -------------------------------------------------------------------------
    def worker_of_slot(self, slot: int) -> str:
        return self.slot_owners[slot // self.slots_per_worker]

    def slots_of_worker(self, worker_id: str) -> range:
        """The physical slots [start, end) owned by ``worker_id`` (same range in every layer)."""
        index = self.slot_owners.index(worker_id)
        per = self.slots_per_worker
        return range(index * per, (index + 1) * per)

    def replicas(self, layer: int, expert: int) -> list[int]:
        count = int(self.logcnt[layer, expert])
        return [int(s) for s in self.log2phy[layer, expert, :count]]

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def trivial(cls, num_layers: int, num_logical: int, num_redundant: int = 0,
                slot_owners: tuple[str, ...] = (), version: int = 0) -> ExpertMap:
        """Slot p holds expert p % E: experts in order, redundant slots repeat from expert 0."""
        num_slots = num_logical + num_redundant
        row = torch.arange(num_slots, dtype=torch.int64) % num_logical
        return cls(row.unsqueeze(0).repeat(num_layers, 1), num_logical, version, slot_owners)
