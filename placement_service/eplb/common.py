"""Shared pieces of the EPLB planners: input checks, replication, balanced packing, metrics.

Legend: L MoE layers, E logical experts, P physical slots (P = E + R redundant), W expert
workers, S = P // W slots per worker (slot p lives on worker p // S), B a batch of rows
(layers, or layer×node pairs in the hierarchical planner), N items packed per row.

Everything here is a pure function: tensors in, tensors out. The greedy loops run in numpy
on whole batches (one step per item, every row at once): per-step overhead is ~3x lower
than torch's on these small arrays, which is what keeps a DeepSeek-V3 plan in milliseconds.

Load model: a slot's load is the load of its logical expert divided by that expert's
replica count (tokens spread evenly over replicas). A worker's *time* is the sum of its
slots' loads divided by its capacity (relative speed; 1.0 everywhere when not given).
"""

from __future__ import annotations

import numpy as np
import torch

_FLOAT = np.float64


# -- input checks ------------------------------------------------------------------------
def check_shapes(weight: torch.Tensor, num_replicas: int, num_workers: int) -> None:
    """Raise ValueError unless weight [L, E] fits P = num_replicas slots over W workers."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, logical experts], got shape {tuple(weight.shape)}")
    num_logical = weight.shape[1]
    if num_workers <= 0:
        raise ValueError(f"num_workers must be positive, got {num_workers}")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas (physical slots) = {num_replicas} is fewer than the "
                         f"{num_logical} logical experts: every expert needs a slot")
    if num_replicas % num_workers != 0:
        raise ValueError(f"{num_replicas} physical slots do not split evenly over {num_workers} "
                         "workers: choose num_redundant_experts so (experts + redundant) % workers == 0")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("weight (load per logical expert) must be finite and >= 0")


def capacity_array(worker_capacity: torch.Tensor | None, num_workers: int) -> np.ndarray:
    """worker_capacity [W] (or None) → validated float64 array [W] of relative speeds."""
    if worker_capacity is None:
        return np.ones(num_workers, dtype=_FLOAT)
    cap = torch.as_tensor(worker_capacity, dtype=torch.float64).reshape(-1).numpy().copy()
    if cap.shape[0] != num_workers:
        raise ValueError(f"worker_capacity has {cap.shape[0]} entries, there are {num_workers} workers")
    if not np.isfinite(cap).all() or (cap <= 0).any():
        raise ValueError(f"worker_capacity must be finite and > 0, got {cap.tolist()}")
    return cap


def live_array(live_workers: torch.Tensor | None, num_workers: int) -> np.ndarray:
    """live_workers [W] bool (or None: all live) → bool array [W]."""
    if live_workers is None:
        return np.ones(num_workers, dtype=bool)
    live = torch.as_tensor(live_workers).reshape(-1).numpy().astype(bool)
    if live.shape[0] != num_workers:
        raise ValueError(f"live_workers has {live.shape[0]} entries, there are {num_workers} workers")
    return live


def check_previous(previous_phy2log: torch.Tensor, num_layers: int, num_logical: int,
                   num_replicas: int) -> np.ndarray:
    """previous_phy2log [L, P] → int64 array, or ValueError naming the mismatch."""
    prev = torch.as_tensor(previous_phy2log)
    if prev.dim() != 2 or prev.shape[0] != num_layers or prev.shape[1] != num_replicas:
        raise ValueError(f"previous_phy2log has shape {tuple(prev.shape)}, expected "
                         f"[{num_layers} layers, {num_replicas} physical slots]")
    prev = prev.to(torch.int64).numpy().copy()
    if (prev < -1).any() or (prev >= num_logical).any():
        raise ValueError(f"previous_phy2log values must be in [-1, {num_logical})")
    return prev


# -- replication and packing ---------------------------------------------------------------
def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """Give the num_phy - E spare replicas, one at a time, to the expert with the highest
    load per replica (DeepSeek's rule; ties → lowest expert id).

    weight [B, E] → (phy [B, num_phy] logical id of each replica, first E are 0..E-1;
                     logcnt [B, E] replica counts).
    """
    num_rows, num_logical = weight.shape
    phy = np.empty((num_rows, num_phy), dtype=np.int64)
    phy[:, :num_logical] = np.arange(num_logical)
    logcnt = np.ones((num_rows, num_logical), dtype=np.int64)
    flat_cnt = logcnt.reshape(-1)
    base = np.arange(num_rows) * num_logical
    for k in range(num_logical, num_phy):
        expert = (weight / logcnt).argmax(1)
        phy[:, k] = expert
        flat_cnt[base + expert] += 1
    return phy, logcnt


def balanced_pack(items: np.ndarray, num_packs: int,
                  capacity: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy LPT packing with equal item counts: items in descending order, each to the pack
    that would finish it first ((load + item) / capacity; with equal capacities that is the
    least loaded pack, as in DeepSeek's balanced packing) among packs not yet full.

    items [B, N] (N % num_packs == 0), capacity [num_packs] or [B, num_packs] or None →
    (pack [B, N] pack index of each item, rank [B, N] position of the item inside its pack).
    """
    num_rows, num_items = items.shape
    per_pack = num_items // num_packs
    assert per_pack * num_packs == num_items, (num_items, num_packs)
    order = np.argsort(-items, axis=1, kind="stable")
    values = np.ascontiguousarray(np.take_along_axis(items, order, 1).T)  # [N, B]
    load = np.zeros(num_rows * num_packs, dtype=_FLOAT)
    load2d = load.reshape(num_rows, num_packs)
    fill = np.zeros(num_rows * num_packs, dtype=np.int64)
    pack_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    rank_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    base = np.arange(num_rows) * num_packs
    inv_cap = None
    if capacity is not None:
        cap = np.broadcast_to(np.asarray(capacity, dtype=_FLOAT), (num_rows, num_packs))
        if not np.all(cap == cap[:, :1]):
            inv_cap = 1.0 / cap
    for k in range(num_items):
        if inv_cap is None:
            choice = load2d.argmin(1)
        else:
            choice = ((load2d + values[k][:, None]) * inv_cap).argmin(1)
        idx = base + choice
        load[idx] += values[k]
        pos = fill[idx]
        fill[idx] = pos + 1
        load[idx[pos + 1 == per_pack]] = np.inf  # full packs take nothing more
        pack_sorted[k] = choice
        rank_sorted[k] = pos
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank = np.empty((num_rows, num_items), dtype=np.int64)
    np.put_along_axis(pack, order, pack_sorted.T, 1)
    np.put_along_axis(rank, order, rank_sorted.T, 1)
    return pack, rank


# -- metrics -------------------------------------------------------------------------------
def replica_counts(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """phy2log [L, P] → logcnt [L, E] (empty slots, -1, are not counted)."""
    num_layers = phy2log.shape[0]
    flat = phy2log + (np.arange(num_layers) * num_logical)[:, None]
    counts = np.bincount(flat[phy2log >= 0], minlength=num_layers * num_logical)
    return counts.reshape(num_layers, num_logical)


def worker_times(phy2log: np.ndarray, weight: np.ndarray, num_workers: int,
                 capacity: np.ndarray) -> np.ndarray:
    """phy2log [L, P], weight [L, E], capacity [W] → time per worker [L, W] (load / capacity)."""
    num_layers, num_slots = phy2log.shape
    logcnt = replica_counts(phy2log, weight.shape[1])
    per_replica = weight / np.maximum(logcnt, 1)
    slot_load = np.where(phy2log >= 0,
                         np.take_along_axis(per_replica, np.maximum(phy2log, 0), 1), 0.0)
    return slot_load.reshape(num_layers, num_workers, -1).sum(-1) / capacity


def layer_balancedness_np(phy2log: np.ndarray, weight: np.ndarray, num_workers: int,
                          capacity: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
    """[L] balancedness per layer: ideal time / actual time = (total load / total capacity of
    the counted workers) / max worker time. With equal capacities this is mean load per worker
    / max load per worker. Counted workers: ``live`` if given, else those holding any expert in
    the layer. A layer without load counts as 1.0."""
    num_layers = phy2log.shape[0]
    times = worker_times(phy2log, weight, num_workers, capacity)
    if live is None:
        counted = (phy2log.reshape(num_layers, num_workers, -1) >= 0).any(-1)
    else:
        counted = np.broadcast_to(live, (num_layers, num_workers))
    total = (times * capacity).sum(1)
    ideal = total / np.maximum((capacity * counted).sum(1), 1e-300)
    peak = times.max(1)
    return np.where(peak > 0, ideal / np.where(peak > 0, peak, 1.0), 1.0)


def layer_balancedness(phy2log: torch.Tensor, weight: torch.Tensor, num_workers: int,
                       worker_capacity: torch.Tensor | None = None,
                       live_workers: torch.Tensor | None = None) -> torch.Tensor:
    """phy2log [L, P], weight [L, E] → balancedness per layer [L] (float64); see
    ``layer_balancedness_np``."""
    phy = torch.as_tensor(phy2log).to(torch.int64).numpy()
    cap = capacity_array(worker_capacity, num_workers)
    live = None if live_workers is None else live_array(live_workers, num_workers)
    w = torch.as_tensor(weight).to(torch.float64).numpy()
    return torch.from_numpy(layer_balancedness_np(phy, w, num_workers, cap, live))


def balancedness(phy2log: torch.Tensor, weight: torch.Tensor, num_workers: int,
                 worker_capacity: torch.Tensor | None = None,
                 live_workers: torch.Tensor | None = None) -> float:
    """Mean over layers of (mean load per worker / max load per worker), loads divided by
    worker capacity when given (then the mean is capacity-weighted: ideal time / actual time).

    phy2log [L, P], weight [L, E] load per logical expert. 1.0 is perfect balance.
    """
    return float(layer_balancedness(phy2log, weight, num_workers, worker_capacity,
                                    live_workers).mean())


def experts_moved(previous_phy2log: torch.Tensor, phy2log: torch.Tensor) -> int:
    """Number of (layer, slot) pairs whose logical expert differs. Both [L, P]."""
    prev = torch.as_tensor(previous_phy2log)
    new = torch.as_tensor(phy2log)
    if prev.shape != new.shape:
        raise ValueError(f"cannot compare maps of shapes {tuple(prev.shape)} and {tuple(new.shape)}")
    return int((prev != new).sum())


# -- keeping experts where they are --------------------------------------------------------
def align_to_previous(new: np.ndarray, prev: np.ndarray, num_workers: int,
                      worker_class: np.ndarray) -> np.ndarray:
    """Relabel a plan so it changes as few (layer, slot) entries of ``prev`` as possible
    without changing what any worker class gets: workers of the same class (equal capacity
    and liveness) are interchangeable, and slots inside a worker are interchangeable.

    new, prev [L, P]; worker_class [W] int → [L, P], the same per-worker multisets as ``new``.
    Worker matching is greedy on overlap (largest first); inside a worker, experts already in
    a slot stay in it and the rest fill the freed slots in order.
    """
    num_layers, num_slots = new.shape
    per = num_slots // num_workers
    num_logical = int(max(new.max(), prev.max())) + 2  # ids shifted by 1 so -1 counts too
    hist_new = _worker_histograms(new, num_workers, num_logical)  # [L, W, ids]
    hist_old = _worker_histograms(prev, num_workers, num_logical)
    overlap = np.matmul(hist_new, hist_old.transpose(0, 2, 1))  # [L, W new pack, W old worker]
    same_class = worker_class[:, None] == worker_class[None, :]
    overlap[:, ~same_class] = -np.inf
    target_of_pack = np.empty((num_layers, num_workers), dtype=np.int64)
    flat = overlap.reshape(num_layers, -1)
    rows = np.arange(num_layers)
    for _ in range(num_workers):
        best = flat.argmax(1)
        pack, worker = best // num_workers, best % num_workers
        target_of_pack[rows, pack] = worker
        overlap[rows, pack, :] = -np.inf
        overlap[rows, :, worker] = -np.inf
    # move each pack's items to its target worker
    packs = new.reshape(num_layers, num_workers, per)
    moved = np.empty_like(packs)
    moved[rows[:, None], target_of_pack] = packs
    old = prev.reshape(num_layers, num_workers, per)
    return _align_slots(moved, old).reshape(num_layers, num_slots)


def _worker_histograms(phy2log: np.ndarray, num_workers: int, num_ids: int) -> np.ndarray:
    """[L, P] → [L, W, num_ids] float counts of (id + 1) per worker."""
    num_layers, num_slots = phy2log.shape
    per = num_slots // num_workers
    cell = (np.arange(num_layers * num_workers) * num_ids).reshape(num_layers, num_workers, 1)
    flat = (phy2log.reshape(num_layers, num_workers, per) + 1 + cell).reshape(-1)
    counts = np.bincount(flat, minlength=num_layers * num_workers * num_ids)
    return counts.reshape(num_layers, num_workers, num_ids).astype(_FLOAT)


def _occurrence(values: np.ndarray) -> np.ndarray:
    """[..., S] → [..., S] how many earlier entries of the same row hold the same value."""
    per = values.shape[-1]
    equal = values[..., :, None] == values[..., None, :]
    earlier = np.tril(np.ones((per, per), dtype=bool), -1)
    return (equal & earlier).sum(-1)


def _align_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Inside each worker: new, old [L, W, S] → new's items, placed where old had them."""
    occ_new, occ_old = _occurrence(new), _occurrence(old)
    match = (old[..., :, None] == new[..., None, :]) & (occ_old[..., :, None] == occ_new[..., None, :])
    kept_old = match.any(-1)  # [L, W, S] old slot keeps its expert
    used_new = match.any(-2)  # [L, W, S] new item already placed
    leftovers = np.take_along_axis(new, np.argsort(used_new, axis=-1, kind="stable"), -1)
    fill_rank = np.cumsum(~kept_old, axis=-1) - 1
    fill = np.take_along_axis(leftovers, np.maximum(fill_rank, 0), -1)
    return np.where(kept_old, old, fill)
