"""Expert maps around lost expert workers: the pure tensor functions of elastic EP.

Legend: L MoE layers, E logical experts, P physical slots, W expert workers (slot owners),
S = P // W slots per worker (slot p on worker p // S).

``live [W] bool`` says which slot owners may serve: not DEAD and not drained. Placement plans
with these functions (``placement_service/failover.py``); an expert worker uses
``uncovered`` to tell an urgent load (requests wait for it) from a live rebalance (paced).

- ``live_slots(num_slots, live)`` → [P] bool.
- ``uncovered(phy2log, live)`` → [L, E] bool: experts without a replica on a live worker.
- ``routing_only(phy2log, live)`` → the lost workers' slots emptied (-1) wherever the expert
  keeps a live replica. No weight moves: every live worker keeps exactly its slots. An expert
  with no live replica keeps its lost slots (a valid map; requests for it wait for the reload).
- ``reload_uncovered(phy2log, live, weight)`` → every uncovered expert put into a live slot —
  an empty one first, else a replica of the expert with the most live replicas — and every
  lost slot emptied. Only the slots taken change (the survivors load those experts).
- ``extend(phy2log, num_new_workers)`` → [L, P + S·n]: new workers' slots appended, empty.

No I/O, no RPC; ``ValueError`` when the live slots cannot hold every expert.
"""

from __future__ import annotations

import torch


def live_slots(num_slots: int, live: torch.Tensor) -> torch.Tensor:
    """→ [P] bool: slots owned by a live worker."""
    live = torch.as_tensor(live, dtype=torch.bool)
    if num_slots % len(live):
        raise ValueError(f"{num_slots} slots do not split over {len(live)} workers")
    return live.repeat_interleave(num_slots // len(live))


def uncovered(phy2log: torch.Tensor, live: torch.Tensor, num_logical: int) -> torch.Tensor:
    """phy2log [L, P] → [L, E] bool: logical experts with no replica in a live slot."""
    held = torch.where(live_slots(phy2log.shape[1], live).unsqueeze(0) & (phy2log >= 0), phy2log,
                       torch.full_like(phy2log, num_logical))                        # [L, P], E = not held
    covered = torch.zeros(phy2log.shape[0], num_logical + 1, dtype=torch.bool)
    covered.scatter_(1, held, True)
    return ~covered[:, :num_logical]


def routing_only(phy2log: torch.Tensor, live: torch.Tensor, num_logical: int) -> torch.Tensor:
    """phy2log [L, P] → [L, P]: lost slots emptied except those holding an uncovered expert."""
    lost = ~live_slots(phy2log.shape[1], live).unsqueeze(0) & (phy2log >= 0)          # [L, P]
    orphan = uncovered(phy2log, live, num_logical)                                    # [L, E]
    keeps = orphan.gather(1, phy2log.clamp(min=0)) & lost                             # [L, P]
    return torch.where(lost & ~keeps, torch.full_like(phy2log, -1), phy2log)


def reload_uncovered(phy2log: torch.Tensor, live: torch.Tensor, num_logical: int,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """phy2log [L, P] → [L, P] with every expert covered by a live slot and every lost slot -1.

    weight [L, E] (load per logical expert, None = uniform) orders the work: heavier uncovered
    experts are placed first, and a replica is taken from the expert with the most live
    replicas, the lightest per replica on ties. Each worker takes as few new experts as it can
    (spreads the loading). Raises ValueError when the live slots are fewer than E."""
    live = torch.as_tensor(live, dtype=torch.bool)
    num_layers, num_slots = phy2log.shape
    per = num_slots // len(live)
    mask = live_slots(num_slots, live)                                                # [P]
    if int(mask.sum()) < num_logical:
        raise ValueError(f"{int(live.sum())} live expert workers hold {int(mask.sum())} slots, fewer than the "
                         f"{num_logical} logical experts: start more expert workers")
    weight = torch.ones(num_layers, num_logical, dtype=torch.float64) if weight is None else weight.double()
    out = phy2log.clone()
    for layer in range(num_layers):
        row = out[layer]                                                              # [P] (a view)
        count = torch.zeros(num_logical, dtype=torch.int64)                           # live replicas
        count.scatter_add_(0, row[mask & (row >= 0)], torch.ones_like(row[mask & (row >= 0)]))
        taken = torch.zeros(len(live), dtype=torch.int64)                             # new experts per worker
        free = [int(s) for s in (mask & (row < 0)).nonzero().flatten()]
        for expert in sorted(range(num_logical), key=lambda e: -float(weight[layer, e])):
            if count[expert] > 0:
                continue
            if free:
                slot = min(free, key=lambda s: (int(taken[s // per]), s))
                free.remove(slot)
            else:
                donors = [int(s) for s in (mask & (row >= 0)).nonzero().flatten() if count[int(row[s])] >= 2]
                slot = min(donors, key=lambda s: (-int(count[int(row[s])]),
                                                  float(weight[layer, int(row[s])]) / int(count[int(row[s])]),
                                                  int(taken[s // per]), s))
                count[int(row[slot])] -= 1
            row[slot] = expert
            count[expert] += 1
            taken[slot // per] += 1
        row[~mask] = -1
    return out


def extend(phy2log: torch.Tensor, num_workers: int, num_new_workers: int) -> torch.Tensor:
    """phy2log [L, P] of ``num_workers`` owners → [L, P + S·n], the n new workers' slots empty."""
    per = phy2log.shape[1] // num_workers
    empty = torch.full((phy2log.shape[0], per * num_new_workers), -1, dtype=phy2log.dtype)
    return torch.cat([phy2log, empty], dim=1)
