"""EPLB planners (placement_service.eplb) and the ``epserve eplb simulate`` command.

Legend: L MoE layers, E logical experts, P physical slots, W workers, S = P // W.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.placement_service.eplb import EplbAlgorithm, balancedness, experts_moved, plan, resolve_algorithm

CONCRETE = [a for a in EplbAlgorithm if a is not EplbAlgorithm.auto]
REPO = Path(__file__).resolve().parents[2]
EPSERVE = REPO / ".venv" / "bin" / "epserve"


def zipf_load(num_layers: int, num_logical: int, exponent: float, seed: int) -> torch.Tensor:
    """[L, E] Zipf-skewed load, hot experts permuted per layer."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(1, num_logical + 1, dtype=torch.float64) ** -exponent
    rows = [base[torch.randperm(num_logical, generator=gen)] for _ in range(num_layers)]
    return torch.stack(rows) * 1000.0


def drift(weight: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Multiply by lognormal noise and swap two hot experts (ranks 1 and 4) in every layer."""
    gen = torch.Generator().manual_seed(seed)
    out = weight * torch.exp(sigma * torch.randn(weight.shape, generator=gen, dtype=torch.float64))
    order = weight.argsort(dim=1, descending=True)
    rows = torch.arange(weight.shape[0])
    a, b = order[:, 1], order[:, 4]
    out[rows, a], out[rows, b] = out[rows, b].clone(), out[rows, a].clone()
    return out


def run_plan(algorithm, weight, num_slots, num_groups, num_nodes, num_workers, **kwargs):
    if algorithm is EplbAlgorithm.movement_aware and "previous_phy2log" not in kwargs:
        previous = ExpertMap.trivial(weight.shape[0], weight.shape[1], num_slots - weight.shape[1]).phy2log
        kwargs["previous_phy2log"] = previous
    return plan(weight, num_slots, num_groups, num_nodes, num_workers, algorithm=algorithm, **kwargs)


def assert_valid(phy2log: torch.Tensor, num_layers: int, num_logical: int, num_slots: int,
                 num_workers: int, live: torch.Tensor | None = None, capacity: torch.Tensor | None = None) -> None:
    """With ``capacity`` (not all equal) a live worker may leave slots empty."""
    assert phy2log.shape == (num_layers, num_slots)
    assert phy2log.dtype == torch.int64
    ExpertMap(phy2log, num_logical)  # every expert of every layer has a replica, ids in range
    per_worker = phy2log.view(num_layers, num_workers, num_slots // num_workers)
    filled = (per_worker >= 0).sum(-1)  # [L, W]
    expected = torch.full((num_workers,), num_slots // num_workers)
    if live is not None:
        expected = expected * live
    if capacity is None:
        assert torch.equal(filled, expected.expand_as(filled)), "every live worker holds exactly S experts"
        return
    assert bool((filled <= expected).all()) and bool((filled[:, expected == 0] == 0).all())


# -- every algorithm ------------------------------------------------------------------------
SHAPES = [  # L, E, R, W, N, G
    (3, 16, 4, 4, 2, 4),
    (2, 12, 3, 5, 1, 3),  # odd: 15 slots over 5 workers of 3
    (4, 64, 0, 8, 2, 8),  # no redundant slots
    (5, 32, 16, 8, 4, 8),
]


@pytest.mark.parametrize("algorithm", CONCRETE, ids=lambda a: a.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}E{}R{}W{}N{}G{}".format(*s))
def test_every_algorithm_gives_valid_deterministic_map(algorithm, shape):
    num_layers, num_logical, redundant, num_workers, num_nodes, num_groups = shape
    weight = zipf_load(num_layers, num_logical, 1.0, seed=1)
    num_slots = num_logical + redundant
    first = run_plan(algorithm, weight, num_slots, num_groups, num_nodes, num_workers)
    second = run_plan(algorithm, weight.clone(), num_slots, num_groups, num_nodes, num_workers)
    assert_valid(first, num_layers, num_logical, num_slots, num_workers)
    assert torch.equal(first, second)


@pytest.mark.parametrize("algorithm", CONCRETE, ids=lambda a: a.value)
def test_balancedness_beats_trivial_on_skewed_load(algorithm):
    num_layers, num_logical, redundant, num_workers = 4, 64, 16, 8
    weight = zipf_load(num_layers, num_logical, 1.2, seed=2)
    trivial = ExpertMap.trivial(num_layers, num_logical, redundant).phy2log
    planned = run_plan(algorithm, weight, num_logical + redundant, 8, 2, num_workers)
    before = balancedness(trivial, weight, num_workers)
    after = balancedness(planned, weight, num_workers)
    assert after > before + 0.1, (before, after)


def test_inputs_are_not_modified():
    weight = zipf_load(3, 16, 1.0, seed=3)
    previous = ExpertMap.trivial(3, 16, 4).phy2log
    weight_copy, previous_copy = weight.clone(), previous.clone()
    for algorithm in CONCRETE:
        plan(weight, 20, 4, 2, 4, algorithm=algorithm, previous_phy2log=previous)
    assert torch.equal(weight, weight_copy) and torch.equal(previous, previous_copy)


# -- helpers ----------------------------------------------------------------------------------
def test_balancedness_and_experts_moved_by_hand():
    # 2 workers of 2 slots; expert 0 has two replicas (load 4 each), experts 1, 2 loads 2 and 6
    phy2log = torch.tensor([[0, 1, 0, 2]])
    weight = torch.tensor([[8.0, 2.0, 6.0]])
    # worker loads: 4 + 2 = 6, 4 + 6 = 10 → mean 8 / max 10
    assert balancedness(phy2log, weight, 2) == pytest.approx(0.8)
    # capacity 1 and 2: times 6 and 5 → ideal 16 / 3 over max 6
    assert balancedness(phy2log, weight, 2, torch.tensor([1.0, 2.0])) == pytest.approx(16 / 3 / 6)
    assert experts_moved(phy2log, torch.tensor([[0, 1, 2, 0]])) == 2
    assert experts_moved(phy2log, phy2log) == 0


def test_deepseek_replicates_the_heaviest_expert():
    weight = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    phy2log = plan(weight, 6, None, 1, 2, algorithm="deepseek")
    counts = torch.bincount(phy2log[0], minlength=4)
    assert counts.tolist() == [3, 1, 1, 1]


def test_vectorised_greedy_matches_a_plain_loop():
    """replicate + balanced_pack (batched numpy) against the rules written as plain loops."""
    import numpy as np

    from epserve.placement_service.eplb.common import balanced_pack, replicate

    gen = np.random.default_rng(1)
    weight = gen.pareto(1.5, size=(5, 12)) + 0.01  # [B, E]
    num_phy, num_packs = 18, 3
    phy, logcnt = replicate(weight, num_phy)
    pack, rank = balanced_pack(weight[np.arange(5)[:, None], phy] / logcnt[np.arange(5)[:, None], phy], num_packs)
    for row in range(5):
        counts = [1] * 12
        for _ in range(num_phy - 12):
            ratios = [weight[row, e] / counts[e] for e in range(12)]
            counts[ratios.index(max(ratios))] += 1
        assert counts == logcnt[row].tolist()
        items = [weight[row, e] / counts[e] for e in phy[row]]
        loads, sizes, expect = [0.0] * num_packs, [0] * num_packs, [None] * num_phy
        for item in sorted(range(num_phy), key=lambda i: -items[i]):
            open_packs = [p for p in range(num_packs) if sizes[p] < num_phy // num_packs]
            best = min(open_packs, key=lambda p: loads[p])
            expect[item] = (best, sizes[best])
            loads[best] += items[item]
            sizes[best] += 1
        assert expect == list(zip(pack[row].tolist(), rank[row].tolist()))


# -- auto and hierarchical ------------------------------------------------------------------
def test_auto_picks_hierarchical_only_when_groups_split_over_nodes():
    assert resolve_algorithm("auto", 8, 4) is EplbAlgorithm.deepseek_hierarchical
    assert resolve_algorithm("auto", 8, 3) is EplbAlgorithm.deepseek
    assert resolve_algorithm("auto", None, 4) is EplbAlgorithm.deepseek
    assert resolve_algorithm("auto", 8, 4, torch.tensor([True, False])) is EplbAlgorithm.elasticity_aware
    assert resolve_algorithm("movement_aware", 8, 4) is EplbAlgorithm.movement_aware
    with pytest.raises(ValueError, match="unknown EPLB algorithm 'greedy'"):
        resolve_algorithm("greedy", 8, 4)


def test_hierarchical_keeps_each_group_on_one_node():
    num_layers, num_logical, num_slots, num_workers, num_nodes, num_groups = 6, 64, 80, 8, 4, 8
    weight = zipf_load(num_layers, num_logical, 1.0, seed=4)
    phy2log = plan(weight, num_slots, num_groups, num_nodes, num_workers, algorithm="deepseek_hierarchical")
    assert_valid(phy2log, num_layers, num_logical, num_slots, num_workers)
    node_of_slot = torch.arange(num_slots) // (num_slots // num_nodes)
    group_of_expert = torch.arange(num_logical) // (num_logical // num_groups)
    for layer in range(num_layers):
        for group in range(num_groups):
            in_group = group_of_expert[phy2log[layer]] == group
            nodes = node_of_slot[in_group].unique()
            assert len(nodes) == 1, f"layer {layer} group {group} spans nodes {nodes.tolist()}"
        # and each node holds num_groups / num_nodes whole groups
        for node in range(num_nodes):
            groups = group_of_expert[phy2log[layer][node_of_slot == node]].unique()
            assert len(groups) == num_groups // num_nodes


@pytest.mark.parametrize("num_groups,num_nodes,num_workers,message", [
    (8, 3, 6, "8 expert groups do not split over 3 nodes"),
    (8, 4, 6, "6 workers do not split over 4 nodes"),
    (5, 1, 4, "16 logical experts do not split into 5 groups"),
    (None, 2, 4, "needs num_groups"),
])
def test_hierarchical_refuses_shapes_it_cannot_place(num_groups, num_nodes, num_workers, message):
    weight = zipf_load(2, 16, 1.0, seed=5)
    num_slots = 24
    with pytest.raises(ValueError, match=message):
        plan(weight, num_slots, num_groups, num_nodes, num_workers, algorithm="deepseek_hierarchical")


def test_bad_shapes_are_refused():
    weight = zipf_load(2, 16, 1.0, seed=5)
    with pytest.raises(ValueError, match="do not split evenly over 3 workers"):
        plan(weight, 20, None, 1, 3, algorithm="deepseek")
    with pytest.raises(ValueError, match="fewer than the 16 logical experts"):
        plan(weight, 12, None, 1, 4, algorithm="deepseek")
    with pytest.raises(ValueError, match="previous_phy2log has shape"):
        plan(weight, 20, None, 1, 4, algorithm="movement_aware", previous_phy2log=torch.zeros(3, 20))


# -- elasticity ---------------------------------------------------------------------------------
def test_elasticity_aware_never_uses_dead_workers():
    num_layers, num_logical, num_slots, num_workers = 4, 32, 48, 8
    weight = zipf_load(num_layers, num_logical, 1.0, seed=6)
    live = torch.ones(num_workers, dtype=torch.bool)
    live[[2, 5]] = False
    phy2log = plan(weight, num_slots, None, 1, num_workers, algorithm="elasticity_aware", live_workers=live)
    assert_valid(phy2log, num_layers, num_logical, num_slots, num_workers, live)
    per = num_slots // num_workers
    for worker in (2, 5):
        assert (phy2log[:, worker * per:(worker + 1) * per] == -1).all()
    assert balancedness(phy2log, weight, num_workers, live_workers=live) > 0.9


def test_elasticity_aware_errors_when_live_slots_cannot_cover_experts():
    weight = zipf_load(2, 32, 1.0, seed=6)
    live = torch.tensor([True, True, False, False, False, False, False, True])
    with pytest.raises(ValueError, match="3 live workers hold 18 slots, fewer than the 32 logical experts"):
        plan(weight, 48, None, 1, 8, algorithm="elasticity_aware", live_workers=live)


def test_deepseek_refuses_dead_workers():
    weight = zipf_load(2, 16, 1.0, seed=6)
    live = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="workers \\[1\\] are dead"):
        plan(weight, 20, None, 1, 4, algorithm="deepseek", live_workers=live)


# -- movement_aware -------------------------------------------------------------------------
def test_movement_aware_moves_nothing_when_the_map_still_fits():
    weight = zipf_load(4, 64, 1.0, seed=7)
    previous = plan(weight, 80, None, 1, 8, algorithm="deepseek")
    again = plan(weight, 80, None, 1, 8, algorithm="movement_aware", previous_phy2log=previous)
    assert experts_moved(previous, again) == 0


@pytest.mark.parametrize("exponent", [0.6, 1.0, 1.4])
def test_movement_aware_moves_far_fewer_experts_after_drift(exponent):
    # DeepSeek-V3 shape: 58 layers, 256 experts, 32 redundant, 32 workers
    num_layers, num_logical, num_slots, num_workers = 58, 256, 288, 32
    weight = zipf_load(num_layers, num_logical, exponent, seed=8)
    new_weight = drift(weight, sigma=0.2, seed=9)
    previous = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    scratch = plan(new_weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    kept = plan(new_weight, num_slots, None, 1, num_workers, algorithm="movement_aware",
                previous_phy2log=previous)
    assert_valid(kept, num_layers, num_logical, num_slots, num_workers)
    b_scratch = balancedness(scratch, new_weight, num_workers)
    b_kept = balancedness(kept, new_weight, num_workers)
    b_before = balancedness(previous, new_weight, num_workers)
    assert b_kept >= 0.99 * b_scratch, (b_kept, b_scratch)
    assert b_kept > b_before
    moved_kept, moved_scratch = experts_moved(previous, kept), experts_moved(previous, scratch)
    assert moved_kept <= 0.25 * moved_scratch, (moved_kept, moved_scratch)


def test_align_to_previous_undoes_worker_and_slot_relabelling():
    import numpy as np

    from epserve.placement_service.eplb.common import align_to_previous

    num_layers, num_logical, num_slots, num_workers = 3, 32, 48, 8
    weight = zipf_load(num_layers, num_logical, 1.0, seed=16)
    previous = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek").numpy()
    gen = np.random.default_rng(0)
    shuffled = previous.reshape(num_layers, num_workers, -1).copy()
    for layer in range(num_layers):
        shuffled[layer] = shuffled[layer, gen.permutation(num_workers)]
        for worker in range(num_workers):
            shuffled[layer, worker] = shuffled[layer, worker, gen.permutation(shuffled.shape[2])]
    shuffled = shuffled.reshape(num_layers, num_slots)
    assert (shuffled != previous).sum() > num_slots
    aligned = align_to_previous(shuffled, previous, num_workers, np.zeros(num_workers, dtype=np.int64))
    assert (aligned == previous).all()
    # workers of different classes (e.g. capacities) are never exchanged
    classes = np.arange(num_workers)
    assert (align_to_previous(shuffled, previous, num_workers, classes).reshape(num_layers, num_workers, -1)
            .sum(-1) == shuffled.reshape(num_layers, num_workers, -1).sum(-1)).all()


def test_movement_aware_fallback_still_meets_the_target():
    # with no search steps allowed, every layer that does not fit takes the relabelled reference
    num_layers, num_logical, num_slots, num_workers = 8, 64, 80, 8
    weight = zipf_load(num_layers, num_logical, 1.0, seed=17)
    new_weight = drift(weight, sigma=0.3, seed=18)
    previous = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    from epserve.placement_service.eplb.movement_aware import plan_movement_aware

    fallback = plan_movement_aware(new_weight, num_slots, num_workers, previous_phy2log=previous, max_steps=0)
    scratch = plan(new_weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    assert_valid(fallback, num_layers, num_logical, num_slots, num_workers)
    assert balancedness(fallback, new_weight, num_workers) >= 0.99 * balancedness(scratch, new_weight, num_workers)
    assert experts_moved(previous, fallback) < experts_moved(previous, scratch)


def test_movement_aware_replaces_dead_workers_with_few_moves():
    num_layers, num_logical, num_slots, num_workers = 6, 64, 96, 12
    weight = zipf_load(num_layers, num_logical, 1.0, seed=10)
    previous = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    live = torch.ones(num_workers, dtype=torch.bool)
    live[3] = False
    kept = plan(weight, num_slots, None, 1, num_workers, algorithm="movement_aware",
                previous_phy2log=previous, live_workers=live)
    assert_valid(kept, num_layers, num_logical, num_slots, num_workers, live)
    scratch = plan(weight, num_slots, None, 1, num_workers, algorithm="elasticity_aware", live_workers=live)
    assert balancedness(kept, weight, num_workers, live_workers=live) >= \
        0.99 * balancedness(scratch, weight, num_workers, live_workers=live)
    assert experts_moved(previous, kept) < 0.5 * experts_moved(previous, scratch)


def test_movement_aware_fills_a_revived_worker_only_as_needed():
    num_layers, num_logical, num_slots, num_workers = 4, 32, 48, 6
    weight = zipf_load(num_layers, num_logical, 1.0, seed=11)
    live = torch.tensor([True, True, False, True, True, True])
    previous = plan(weight, num_slots, None, 1, num_workers, algorithm="elasticity_aware", live_workers=live)
    revived = plan(weight, num_slots, None, 1, num_workers, algorithm="movement_aware", previous_phy2log=previous)
    ExpertMap(revived, num_logical)
    scratch = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    assert balancedness(revived, weight, num_workers, live_workers=torch.ones(6, dtype=torch.bool)) >= \
        0.99 * balancedness(scratch, weight, num_workers)
    # worker 2 comes back while worker 4 dies, under a drifted load
    new_weight = drift(weight, sigma=0.3, seed=3)
    live = torch.tensor([True, True, True, True, False, True])
    swapped = plan(new_weight, num_slots, None, 1, num_workers, algorithm="movement_aware",
                   previous_phy2log=previous, live_workers=live)
    ExpertMap(swapped, num_logical)
    assert (swapped[:, 4 * 8:5 * 8] == -1).all()
    scratch = plan(new_weight, num_slots, None, 1, num_workers, algorithm="elasticity_aware", live_workers=live)
    assert balancedness(swapped, new_weight, num_workers, live_workers=live) >= \
        0.99 * balancedness(scratch, new_weight, num_workers, live_workers=live)


def test_capacity_weighting_puts_more_load_on_faster_workers():
    num_layers, num_logical, num_slots, num_workers = 4, 64, 96, 8
    weight = zipf_load(num_layers, num_logical, 1.2, seed=12)
    capacity = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0])  # 4 GPU-like, 4 CPU-like
    # a capacity-blind plan splits the load 1:1; the aware one comes close to the ideal 4:1 by giving
    # the slow workers colder experts and leaving some of their slots empty (fewer experts)
    blind = plan(weight, num_slots, None, 1, num_workers, algorithm="deepseek")
    for algorithm, kwargs in [("deepseek", {}), ("movement_aware", {"previous_phy2log": blind})]:
        aware = plan(weight, num_slots, None, 1, num_workers, algorithm=algorithm,
                     worker_capacity=capacity, **kwargs)
        assert_valid(aware, num_layers, num_logical, num_slots, num_workers, capacity=capacity)
        held = aware.clamp(min=0)
        counts = torch.stack([torch.bincount(row[row >= 0], minlength=num_logical) for row in aware])
        slot_load = torch.where(aware >= 0, weight.gather(1, held) / counts.gather(1, held).clamp(min=1), 0)
        worker_load = slot_load.view(num_layers, num_workers, -1).sum(-1)
        fast, slow = worker_load[:, :4].sum(), worker_load[:, 4:].sum()
        assert fast > 3.5 * slow, (algorithm, float(fast), float(slow))
        if algorithm == "deepseek":     # movement_aware may meet the balance by swaps alone
            experts = (aware.view(num_layers, num_workers, -1) >= 0).sum(-1)
            assert bool((experts[:, 4:].sum(-1) < experts[:, :4].sum(-1)).all()), experts     # fewer experts
        assert balancedness(aware, weight, num_workers, capacity) > 0.97
        assert balancedness(aware, weight, num_workers, capacity) > \
            balancedness(blind, weight, num_workers, capacity) + 0.25


# -- CLI ---------------------------------------------------------------------------------------
def epserve(*args: str) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess (slow: imports torch each time)."""
    command = [str(EPSERVE)] if EPSERVE.exists() else [sys.executable, "-m", "epserve"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def epserve_here(capsys, *args: str) -> tuple[int, str, str]:
    """The same command line through ``epserve.cli.main`` in this process."""
    from epserve.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_simulate_json_with_previous_and_output(tmp_path, capsys):
    weight = zipf_load(6, 32, 1.0, seed=13)
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"logical_count": weight.round().to(torch.int64).tolist()}))
    common = ["eplb", "simulate", "--load-file", str(load), "--num-redundant-experts", "8",
              "--num-workers", "8", "--num-nodes", "2", "--num-groups", "4", "--json"]
    first = epserve(*common, "--algorithm", "deepseek", "--output", str(tmp_path / "prev.json"))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["algorithm"] == "deepseek"
    assert report["experts_moved"] == 0 and report["balancedness_before"] is None
    assert report["num_layers"] == 6 and report["num_physical_slots"] == 40
    assert 0.9 < report["balancedness"] <= 1.0 and report["plan_ms"] > 0

    drifted = tmp_path / "drift.pt"
    torch.save({"logical_count": drift(weight, 0.3, seed=14)}, drifted)
    args = ["eplb", "simulate", "--load-file", str(drifted), "--num-redundant-experts", "8",
            "--num-workers", "8", "--num-nodes", "2", "--previous", str(tmp_path / "prev.json"), "--json"]
    code, out, err = epserve_here(capsys, *args, "--algorithm", "movement_aware")
    assert code == 0, err
    moved = json.loads(out)
    code, out, err = epserve_here(capsys, *args, "--algorithm", "deepseek")
    scratch = json.loads(out)
    assert moved["balancedness_before"] < moved["balancedness"]
    assert moved["experts_moved"] < scratch["experts_moved"]

    code, out, err = epserve_here(capsys, *common)
    auto = json.loads(out)
    assert auto["algorithm"] == "deepseek_hierarchical" and auto["requested_algorithm"] == "auto"


def test_cli_simulate_table_and_errors(tmp_path, capsys):
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"logical_count": zipf_load(2, 16, 1.0, seed=15).tolist()}))
    code, out, err = epserve_here(capsys, "eplb", "simulate", "--load-file", str(load),
                                  "--num-redundant-experts", "4", "--num-workers", "4")
    assert code == 0, err
    assert "balancedness" in out and "experts moved" in out

    bad = epserve("eplb", "simulate", "--load-file", str(load), "--num-redundant-experts", "3",
                  "--num-workers", "4", "--json")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "19 physical slots do not split evenly over 4 workers" in bad.stderr
    code, out, err = epserve_here(capsys, "eplb", "simulate", "--load-file", str(tmp_path / "nope.json"),
                                  "--num-redundant-experts", "4", "--num-workers", "4")
    assert code == 2 and "does not exist" in err
    code, out, err = epserve_here(capsys, "eplb", "simulate", "--load-file", str(load),
                                  "--num-redundant-experts", "4", "--num-workers", "4", "--num-nodes", "3",
                                  "--num-groups", "4", "--algorithm", "deepseek_hierarchical")
    assert code == 2 and "4 expert groups do not split over 3 nodes" in err
    code, out, err = epserve_here(capsys, "eplb", "simulate", "--load-file", str(load),
                                  "--num-redundant-experts", "4", "--num-workers", "4",
                                  "--worker-capacity", "1,2")
    assert code == 2 and "--worker-capacity has 2 values, --num-workers is 4" in err


def test_random_small_cases_stay_valid():
    """Random shapes, loads (some all-zero), capacities, dead and revived workers."""
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(60):
        num_workers, per = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        num_slots = num_workers * per
        num_logical, num_layers = int(rng.integers(1, num_slots + 1)), int(rng.integers(1, 4))
        weight = torch.tensor(rng.pareto(rng.uniform(0.5, 3), size=(num_layers, num_logical)), dtype=torch.float64)
        if rng.random() < 0.2:
            weight[0] = 0.0
        capacity = torch.tensor(rng.choice([0.5, 1.0, 2.0], size=num_workers)) if rng.random() < 0.5 else None
        live, live_before = (torch.tensor(rng.random(num_workers) > 0.25) for _ in range(2))
        for mask in (live, live_before):
            if int(mask.sum()) * per < num_logical:
                mask[:] = True
        previous = plan(torch.rand(num_layers, num_logical, dtype=torch.float64), num_slots, None, 1,
                        num_workers, algorithm="elasticity_aware", live_workers=live_before)
        scratch = plan(weight, num_slots, None, 1, num_workers, algorithm="elasticity_aware",
                       live_workers=live, worker_capacity=capacity)
        kept = plan(weight, num_slots, None, 1, num_workers, algorithm="movement_aware",
                    previous_phy2log=previous, live_workers=live, worker_capacity=capacity)
        assert_valid(scratch, num_layers, num_logical, num_slots, num_workers, live, capacity)
        ExpertMap(kept, num_logical)
        assert (kept.view(num_layers, num_workers, per)[:, ~live] == -1).all()
        assert balancedness(kept, weight, num_workers, capacity, live) >= \
            0.99 * balancedness(scratch, weight, num_workers, capacity, live) - 1e-12
