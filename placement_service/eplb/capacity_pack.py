"""Replicate and pack: DeepSeek's greedy (``replicate_and_pack``) and, for workers of different
speeds, a plan where slower workers get fewer and colder experts (``capacity_replicate_and_pack``).

Legend: B rows (layers, or layer×node pairs), E logical experts, P physical slots (``num_phy``),
W packs (workers), S = P // W slots per pack, R = P - E redundant slots.

DeepSeek's greedy (``replicate``, then ``balanced_pack``) fills every slot and packs replicas in
descending load order onto the pack that would finish each first. With unequal capacities that
goes wrong twice: a fast pack that is nearly full leaves a hot replica to a slow one, which must
later also take S - 1 more items because every pack ends with S; and every redundant slot holds
a replica even where a slow worker's replica only adds to the bottleneck. Here, per row:

1. For every number of replicas kept, r = R, R-1, ..., 0: DeepSeek's replication of E + r
   replicas, plus P - E - r *empty* slots (load 0, logical id -1), packed by the capacity-aware
   greedy (empty slots go where the greedy puts them);
2. swap search: while some swap of a slot of the slowest-finishing (bottleneck) worker with a
   slot of another worker — a lighter replica or an empty slot — leaves both below the
   bottleneck's time, make the best such swap (lowest resulting max time). A slow worker thus
   hands hot replicas to fast ones and takes empty slots: fewer, colder experts;
3. keep the r whose plan has the lowest max time (load / capacity); ties keep more replicas. The
   search over r stops after ``_PATIENCE`` values in a row that plan no faster than the best (the
   max time falls while slow workers shed replicas, then rises as fast workers lose hot ones).

Pure numpy, one row at a time (used only when capacities differ): DeepSeek-V3's shape (58 layers,
288 slots, 32 workers, one at capacity 0.1) plans in about a second on one CPU core. Empty slots are -1, as a dead
worker's: the dispatch spreads an expert's tokens over the replicas that exist.
"""

from __future__ import annotations

import numpy as np

from epserve.placement_service.eplb.common import balanced_pack, replicate

_TOL = 1e-12
_PATIENCE = 3       # step 3 stops after this many replica counts in a row that plan no faster than the best


def replicate_and_pack(weight: np.ndarray, num_phy: int, num_packs: int,
                       capacity: np.ndarray | None = None) -> np.ndarray:
    """DeepSeek's global step: replicate, then pack the replicas onto packs of equal size.

    weight [B, E] → phy2log [B, num_phy] with slot = pack * (num_phy // num_packs) + rank. With
    capacities that differ, ``capacity_replicate_and_pack`` plans instead: slower packs get fewer
    and colder experts, and slots that would only slow the layer down stay empty (-1).
    """
    if capacity is not None:
        cap = np.broadcast_to(np.asarray(capacity, dtype=np.float64), (weight.shape[0], num_packs))
        if not np.all(cap == cap[:, :1]):
            return capacity_replicate_and_pack(weight, num_phy, num_packs, cap)
    phy, logcnt = replicate(weight, num_phy)
    rows = np.arange(weight.shape[0])[:, None]
    item_load = weight[rows, phy] / logcnt[rows, phy]  # [B, num_phy]
    pack, rank = balanced_pack(item_load, num_packs, capacity)
    slot = pack * (num_phy // num_packs) + rank
    out = np.empty_like(phy)
    np.put_along_axis(out, slot, phy, 1)
    return out


def capacity_replicate_and_pack(weight: np.ndarray, num_phy: int, num_packs: int,
                                capacity: np.ndarray) -> np.ndarray:
    """weight [B, E], capacity [W] or [B, W] (not all equal) → phy2log [B, num_phy], -1 = empty slot,
    slot = pack * S + rank."""
    num_rows, num_logical = weight.shape
    per_pack = num_phy // num_packs
    caps = np.broadcast_to(np.asarray(capacity, dtype=np.float64), (num_rows, num_packs))
    out = np.empty((num_rows, num_phy), dtype=np.int64)
    for row in range(num_rows):
        w, cap = weight[row:row + 1], caps[row]
        best, best_time, worse = None, np.inf, 0
        for kept in range(num_phy - num_logical, -1, -1):
            if worse == _PATIENCE:
                break
            phy, logcnt = replicate(w, num_logical + kept)                         # [1, E + kept]
            ids = np.full(num_phy, -1, dtype=np.int64)
            ids[:num_logical + kept] = phy[0]
            load = np.zeros(num_phy)
            load[:num_logical + kept] = w[0, phy[0]] / logcnt[0, phy[0]]
            pack, rank = balanced_pack(load[None], num_packs, cap)
            slots = np.empty(num_phy, dtype=np.int64)
            slots[pack[0] * per_pack + rank[0]] = np.arange(num_phy)               # slot → item
            grid_ids, grid_load = ids[slots].reshape(num_packs, per_pack), load[slots].reshape(num_packs, per_pack)
            time = _swap_search(grid_ids, grid_load, cap)
            if time < best_time * (1 - _TOL):
                best, best_time, worse = grid_ids.reshape(-1).copy(), time, 0
            else:
                worse += 1
        out[row] = best
    return out


def _swap_search(ids: np.ndarray, load: np.ndarray, cap: np.ndarray) -> float:
    """In place on ids/load [W, S]: best bottleneck swaps (module docstring, step 2). → max time."""
    num_packs, per_pack = load.shape
    times = load.sum(1) / cap                                                       # [W]
    for _ in range(4 * num_packs * per_pack):
        b = int(times.argmax())
        diff = load[b][:, None, None] - load[None, :, :]                            # [S, W, S] moved off b
        after_b = times[b] - diff / cap[b]
        after_v = times[None, :, None] + diff / cap[None, :, None]
        worst = np.maximum(after_b, after_v)
        worst[:, b, :] = np.inf
        worst[diff <= 0] = np.inf                                                   # only lighter items come back
        i, v, j = np.unravel_index(int(worst.argmin()), worst.shape)
        if not worst[i, v, j] < times[b] * (1 - _TOL):
            break
        ids[b, i], ids[v, j] = ids[v, j], ids[b, i]
        load[b, i], load[v, j] = load[v, j], load[b, i]
        times[b], times[v] = after_b[i, v, j], after_v[i, v, j]
    return float(times.max())
