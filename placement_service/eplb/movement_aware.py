"""Movement-aware EPLB (epserve's own): rebalance by changing as few slots as possible.

Legend: L MoE layers, E logical experts, P physical slots, W workers, S = P // W slots per
worker, M worker pairs examined per step.

Moving an expert costs a weight copy (and, for a make-before-break switch, spare memory),
so after a load drift re-planning from scratch (DeepSeek) is wasteful: its greedy packing
reshuffles nearly every slot. This planner starts from ``previous_phy2log`` and changes
slots only until every layer is balanced to within ``tolerance`` of a from-scratch plan:

1. Reference and target. A from-scratch plan for the current load (DeepSeek's global
   replicate-and-pack; capacity-aware and live-workers-only when those are given) gives,
   per layer, its max worker time (load / capacity) and its largest load per replica. The
   target is that max time × (1 + tolerance); meeting it in every layer keeps
   balancedness >= reference / (1 + tolerance).
2. Repair. Slots of dead workers are emptied; an expert left without a replica takes a
   free live slot, else a slot of the expert that can best spare one.
3. Replica counts (1 changed slot each). While some expert's load per replica is above the
   reference's largest, one replica moves to it from the expert that loses least by giving
   one up (DeepSeek's replication rule run as a correction, not from scratch). Donors give
   up their replicas on the least loaded workers; the new replicas, heaviest first, take
   those slots, least loaded worker first.
4. Swaps (2 changed slots each), all layers at once. Objective: the excess, sum over
   workers of max(0, time - target). Each step pairs the k-th hottest worker with the k-th
   coldest (k < M) and applies, per pair, the swap of one slot each that reduces their excess
   most. When the hottest worker's pair has no such swap it searches every live slot
   instead ([S, P] candidates: needed when loads are coarse, e.g. two big replicas per
   worker under very skewed load). A layer stops when its excess is zero or nothing helps.
5. Fallback, per layer: a layer still above target takes the reference plan, relabelled to
   keep as many previous entries as possible (interchangeable workers matched by overlap,
   experts kept in their old slots). So every layer meets the target.

Expert groups and nodes are not taken into account (like ``deepseek``, not like
``deepseek_hierarchical``). Deterministic: no randomness, ties go to the lowest index.
"""

from __future__ import annotations

import numpy as np
import torch

from epserve.placement_service.eplb.common import (align_to_previous, capacity_array, check_previous,
                                           check_shapes, live_array, replica_counts, worker_times)
from epserve.placement_service.eplb.elasticity_aware import elastic_plan_np

_PAIRS = 8  # M: hottest workers paired with the coldest ones per step


def plan_movement_aware(weight: torch.Tensor, num_replicas: int, num_workers: int, *,
                        previous_phy2log: torch.Tensor | None = None,
                        worker_capacity: torch.Tensor | None = None,
                        live_workers: torch.Tensor | None = None,
                        tolerance: float = 0.01, max_steps: int | None = None) -> torch.Tensor:
    """weight [L, E], previous_phy2log [L, P] → phy2log [L, P] (dead workers' slots -1).

    Without ``previous_phy2log`` this is the reference plan itself.
    """
    check_shapes(weight, num_replicas, num_workers)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    num_layers, num_logical = weight.shape
    cap = capacity_array(worker_capacity, num_workers)
    live = live_array(live_workers, num_workers)
    w = weight.detach().to(torch.float64).cpu().numpy()
    reference = elastic_plan_np(w, num_replicas, num_workers, live,
                                None if worker_capacity is None else cap)
    if previous_phy2log is None:
        return torch.from_numpy(reference)
    prev = check_previous(previous_phy2log, num_layers, num_logical, num_replicas)
    per = num_replicas // num_workers
    slot_live = np.repeat(live, per)  # [P]

    target = worker_times(reference, w, num_workers, cap).max(1) * (1.0 + tolerance)  # [L]
    start = prev.copy()
    start[:, ~slot_live] = -1
    _cover_missing(start, w, slot_live)
    ref_counts = replica_counts(reference, num_logical)
    ceiling = (w / np.maximum(ref_counts, 1)).max(1) * (1.0 + 1e-9)  # [L]
    _transfer_replicas(w, start, cap, slot_live, per, ceiling)
    searched, met = _swap_search(w, start, cap, slot_live, target, per,
                                 max_steps if max_steps is not None else num_replicas)

    failed = ~met
    if failed.any():  # relabel the reference to keep what it can of the previous map
        worker_class = np.where(live, np.unique(cap, return_inverse=True)[1], -1)
        searched[failed] = align_to_previous(reference[failed], prev[failed], num_workers, worker_class)
    return torch.from_numpy(searched)


def _cover_missing(phy: np.ndarray, weight: np.ndarray, slot_live: np.ndarray) -> None:
    """In place: give every uncovered expert a live slot, heaviest expert first. The slot is
    an empty live slot if any, else one of the expert whose per-replica load grows least
    when it loses a replica (it must keep at least one)."""
    num_layers, num_logical = weight.shape
    rows = np.arange(num_layers)
    while True:
        counts = replica_counts(phy, num_logical)
        uncovered = counts == 0
        todo = uncovered.any(1)
        if not todo.any():
            return
        expert = np.where(uncovered, weight, -1.0).argmax(1)  # [L]
        holder = np.maximum(phy, 0)
        held = np.take_along_axis(counts, holder, 1)
        held_w = np.take_along_axis(weight, holder, 1)
        penalty = np.where(held >= 2, held_w / np.maximum(held - 1, 1) - held_w / np.maximum(held, 1), np.inf)
        penalty = np.where(phy < 0, -1.0, penalty)
        penalty[:, ~slot_live] = np.inf
        slot = penalty.argmin(1)
        ok = np.isfinite(penalty[rows, slot])
        if (todo & ~ok).any():
            layer = int(np.flatnonzero(todo & ~ok)[0])
            raise ValueError(f"layer {layer}: no live slot can take uncovered expert {int(expert[layer])}")
        phy[rows[todo], slot[todo]] = expert[todo]


def _transfer_replicas(weight: np.ndarray, phy: np.ndarray, cap: np.ndarray,
                       slot_live: np.ndarray, per: int, ceiling: np.ndarray) -> None:
    """In place: while some expert's load per replica exceeds ``ceiling`` [L], one replica
    moves to it from the expert that loses least (lowest load per replica after giving one
    up), as DeepSeek's replication rule would; empty live slots are used before any donor's.

    The new counts are that greedy rule's result, computed in closed form
    (``_corrected_counts``); then, all at once, each donor gives up its replicas on the least
    loaded workers and the new replicas, heaviest first, take the freed slots, least loaded
    worker first.

    weight [L, E], phy [L, P] (changed in place), cap [W], slot_live [P], ceiling [L].
    """
    num_layers, num_logical = weight.shape
    num_slots = phy.shape[1]
    counts = replica_counts(phy, num_logical)  # [L, E]
    free = (phy < 0) & slot_live  # [L, P]
    new, used_free = _corrected_counts(weight, counts, free.sum(1), ceiling)
    if np.array_equal(new, counts):
        return

    # which slots are given up: per expert (and for the empty slots), the ones on the least loaded workers
    rows_all = np.arange(num_layers)[:, None]
    holder = np.maximum(phy, 0)
    slot_load = np.where(phy >= 0, (weight / np.maximum(counts, 1))[rows_all, holder], 0.0)
    times = slot_load.reshape(num_layers, -1, per).sum(-1) / cap  # [L, W]
    slot_time = np.repeat(times, per, axis=1)  # [L, P]
    group = np.where(slot_live, phy, -2)  # expert id; -1 empty live slot; -2 slot of a dead worker
    order = np.lexsort((slot_time, group), axis=-1)  # by group, then worker time
    sorted_expert = np.take_along_axis(group, order, 1)
    position = np.broadcast_to(np.arange(num_slots), phy.shape)
    starts = np.ones_like(sorted_expert, dtype=bool)
    starts[:, 1:] = sorted_expert[:, 1:] != sorted_expert[:, :-1]
    rank_sorted = position - np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    rank = np.empty_like(rank_sorted)
    np.put_along_axis(rank, order, rank_sorted, 1)  # [L, P] rank of a slot among its expert's
    lost = np.maximum(counts - new, 0)
    quota = np.where(group >= 0, lost[rows_all, holder], np.where(group == -1, used_free[:, None], 0))
    freed = rank < quota  # [L, P]

    gained = np.maximum(new - counts, 0).ravel()  # [L*E]
    layer_of = np.repeat(np.repeat(np.arange(num_layers), num_logical), gained)
    expert_of = np.repeat(np.tile(np.arange(num_logical), num_layers), gained)
    load_of = weight[layer_of, expert_of] / new[layer_of, expert_of]
    by_load = np.lexsort((-load_of, layer_of))  # per layer, heaviest new replica first
    slot_layer, slot_index = np.nonzero(freed)
    by_time = np.lexsort((slot_time[slot_layer, slot_index], slot_layer))  # per layer, least loaded first
    assert np.array_equal(layer_of[by_load], slot_layer[by_time])
    phy[slot_layer[by_time], slot_index[by_time]] = expert_of[by_load]


def _corrected_counts(weight: np.ndarray, counts: np.ndarray, num_free: np.ndarray,
                      ceiling: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replica counts after the transfers of ``_transfer_replicas``, without running them one
    by one: each expert above the ceiling ends with the fewest replicas that bring it under
    (the greedy rule raises it until then); the replicas come from the empty live slots first,
    then from the donors' removal steps with the lowest load per replica after the removal
    (the greedy rule's choices: each donor's steps w/(c-1), w/(c-2), ... only increase).

    weight, counts [L, E], num_free [L] empty live slots, ceiling [L] → (new counts [L, E],
    empty slots used [L]). When the ceiling is the largest load per replica of a plan with
    the same live slots, donors always suffice (that plan's counts are a witness).
    """
    num_layers, num_logical = weight.shape
    ceiling = ceiling[:, None]
    receiver = weight > ceiling * counts  # [L, E] load per replica above the ceiling
    wanted = np.where(receiver, np.ceil(weight / np.where(ceiling > 0, ceiling, 1.0)), counts)
    gain = np.maximum(wanted.astype(np.int64) - counts, 0) * receiver
    needed = gain.sum(1)
    used_free = np.minimum(needed, num_free)
    from_donors = needed - used_free  # [L]
    # every removal step of every donor, as one flat list
    steps = np.where(receiver, 0, np.maximum(counts - 1, 0)).ravel()  # [L*E]
    layer_of = np.repeat(np.repeat(np.arange(num_layers), num_logical), steps)
    expert_of = np.repeat(np.tile(np.arange(num_logical), num_layers), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    step = np.arange(steps.sum()) - first + 1  # 1, 2, ... per expert
    value = weight[layer_of, expert_of] / (counts[layer_of, expert_of] - step)
    order = np.lexsort((value, layer_of))  # per layer, cheapest removal first
    layer_sorted = layer_of[order]
    layer_start = np.searchsorted(layer_sorted, np.arange(num_layers))
    rank = np.arange(order.size) - layer_start[layer_sorted]
    taken = order[rank < from_donors[layer_sorted]]
    assert (np.bincount(layer_of[taken], minlength=num_layers) == from_donors).all(), "not enough donors"
    lost = np.bincount(layer_of[taken] * num_logical + expert_of[taken],
                       minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    return counts + gain - lost, used_free


def _swap_search(weight: np.ndarray, phy: np.ndarray, cap: np.ndarray, slot_live: np.ndarray,
                 target: np.ndarray, per: int, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Swap search, see the module docstring. Replica counts do not change here, so each
    slot's load is fixed and a swap only changes the times of the two workers involved.

    weight [L, E], phy [L, P] start map, cap [W], slot_live [P], target [L] max worker time
    allowed → (phy2log [L, P], met [L] bool: the layer's max worker time is within target).
    """
    phy = phy.copy()
    num_layers, num_slots = phy.shape
    num_workers = num_slots // per
    inv_cap = 1.0 / cap
    unit_cap = bool(np.all(cap == 1.0))  # then swap gains skip the capacity products
    counts = replica_counts(phy, weight.shape[1])  # [L, E]
    rows_all = np.arange(num_layers)[:, None]
    slot_load = np.where(phy >= 0, (weight / np.maximum(counts, 1))[rows_all, np.maximum(phy, 0)], 0.0)
    slack = 1e-12 * np.maximum(target, 1e-300)
    live_worker = slot_live.reshape(num_workers, per)[:, 0]
    num_live = int(live_worker.sum())
    num_pairs = min(_PAIRS, num_live // 2)
    slot_worker = np.arange(num_slots) // per
    inner = np.arange(per)
    active = np.arange(num_layers)
    for _ in range(max_steps):
        if active.size == 0 or num_pairs == 0:
            break
        n_act = active.size
        rows = np.arange(n_act)
        r1, r2 = rows[:, None], rows[:, None, None]
        load, tgt = slot_load[active], target[active]
        over = load.reshape(n_act, num_workers, per).sum(-1) * inv_cap - tgt[:, None]  # [La, W] time - target
        busy = (over > slack[active][:, None]).any(1)

        # M hottest workers (descending) and M coldest live workers (ascending)
        by_time = np.argsort(np.where(live_worker, -over, np.inf), axis=1, kind="stable")
        hot = by_time[:, :num_pairs]  # [La, M]
        cold = by_time[:, num_live - 1 - np.arange(num_pairs)]  # [La, M]
        slots_hot = hot[:, :, None] * per + inner  # [La, M, S]
        slots_cold = cold[:, :, None] * per + inner
        load_i, load_j = load[r2, slots_hot], load[r2, slots_cold]  # [La, M, S]
        over_hot, over_cold = over[r1, hot], over[r1, cold]  # [La, M]
        ic_hot, ic_cold = inv_cap[hot], inv_cap[cold]

        # k-th hottest with k-th coldest: [La, M, S, S]
        dk = load_i[:, :, :, None] - load_j[:, :, None, :]
        gaink = _swap_gain(over_hot[:, :, None, None], over_cold[:, :, None, None], dk,
                           None if unit_cap else ic_hot[:, :, None, None],
                           None if unit_cap else ic_cold[:, :, None, None]).reshape(n_act, num_pairs, -1)
        gaink[hot == cold] = 0.0
        bestk = gaink.argmax(2)  # [La, M]
        take_k = np.take_along_axis(gaink, bestk[:, :, None], 2)[:, :, 0] > slack[active][:, None]

        # the hottest worker, when its pair has no gain, may swap with any live slot: [Ls, S, P]
        wide = busy & ~take_k[:, 0]
        best_wide = np.zeros(n_act, dtype=np.int64)
        if wide.any():
            lw = rows[wide]
            h = hot[lw, 0]
            load_w = np.where((slot_worker[None, :] == h[:, None]) | ~slot_live, np.inf, load[lw])
            d0 = load_i[lw, 0, :, None] - load_w[:, None, :]  # [Ls, S, P]
            over_j = over[lw][:, slot_worker]
            gain0 = _swap_gain(over_hot[lw, 0, None, None], over_j[:, None, :], d0,
                               None if unit_cap else ic_hot[lw, 0, None, None],
                               None if unit_cap else inv_cap[slot_worker]).reshape(lw.size, -1)
            best = gain0.argmax(1)
            ok = gain0[np.arange(lw.size), best] > slack[active[lw]]
            best_wide[lw] = best
            wide[lw] = ok
            partner = slot_worker[best % num_slots]
            # pairs touching the partner wait for the next step
            clash = (cold[lw] == partner[:, None]) | (hot[lw] == partner[:, None])
            take_k[lw] &= ~(ok[:, None] & clash)

        if take_k.any():
            r, k = np.nonzero(take_k)
            _swap(phy, slot_load, active[r], slots_hot[r, k, bestk[r, k] // per],
                  slots_cold[r, k, bestk[r, k] % per])
        if wide.any():
            lw = rows[wide]
            _swap(phy, slot_load, active[lw], slots_hot[lw, 0, best_wide[lw] // num_slots],
                  best_wide[lw] % num_slots)
        active = active[take_k.any(1) | wide]
    met = worker_times(phy, weight, num_workers, cap).max(1) <= target + slack
    return phy, met


def _swap_gain(over_a: np.ndarray, over_b: np.ndarray, delta: np.ndarray, inv_cap_a: np.ndarray | None,
               inv_cap_b: np.ndarray | None) -> np.ndarray:
    """Reduction of the excess (time above target) of workers a and b when a gives a slot of
    load x and takes one of load y from b, delta = x - y (consumed). Arrays broadcast; a
    capacity of None means 1."""
    if inv_cap_a is None:
        new_a = np.subtract(over_a, delta)
        new_b = np.add(over_b, delta, out=delta)
    else:
        new_a = over_a - delta * inv_cap_a
        new_b = np.add(over_b, np.multiply(delta, inv_cap_b, out=delta), out=delta)
    np.maximum(new_a, 0.0, out=new_a)
    np.maximum(new_b, 0.0, out=new_b)
    new_a += new_b
    return np.subtract(np.maximum(over_a, 0.0) + np.maximum(over_b, 0.0), new_a, out=new_a)


def _swap(phy: np.ndarray, slot_load: np.ndarray, layer: np.ndarray, slot_i: np.ndarray,
          slot_j: np.ndarray) -> None:
    """In place: exchange the experts (and loads) of slots i and j in each listed layer."""
    for table in (phy, slot_load):
        a, b = table[layer, slot_i], table[layer, slot_j]
        table[layer, slot_i], table[layer, slot_j] = b, a
