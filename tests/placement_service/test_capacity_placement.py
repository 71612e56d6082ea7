"""Workers of unequal capacity through the placement service's real gRPC path: expert workers register
their capacities (PlacementClient), watch and ack every phase as the real worker does; the initial map
and a rebalance from reported load give the slow worker fewer and colder experts, the hot ones to the
fast workers. The model: 3 MoE layers, 8 experts (conftest.MODEL_CONFIG)."""

from __future__ import annotations

import queue

import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.expert_map_codec import expert_map_from_proto
from epserve.placement_client import PlacementClient
from epserve.placement_types import UpdatePhase, WorkerRole
from epserve.placement_service import eplb
from epserve.protos import placement_pb2

NUM_LAYERS, NUM_EXPERTS = 3, 8
HOT_LOAD = torch.tensor([400.0, 200, 120, 80, 40, 20, 10, 5])                  # [E] expert 0 hottest


@pytest.fixture
def cluster(start_server, fingerprint, connect):
    """cluster(capacities, num_redundant) → (server, admin stubs, attention client, expert clients)."""
    clients: list[PlacementClient] = []

    def start(capacities: list[float], num_redundant: int):
        server = start_server(dp_size=1, ep_size=len(capacities), ep_num_redundant_experts=num_redundant,
                              eplb_algorithm="deepseek")
        for i, capacity in enumerate(capacities):
            expert = PlacementClient(server.address, f"expert-{i}", WorkerRole.EXPERT, f"127.0.0.1:{5100 + i}",
                                     capacity=capacity, model_fingerprint=fingerprint, timeout_s=5)
            clients.append(expert)
            expert.register(deadline_s=5)
            expert.watch(lambda phase, expert_map, _plane, c=expert: c.ack(expert_map.version, phase))
        attention = PlacementClient(server.address, "attn-0", WorkerRole.ATTENTION, "127.0.0.1:5200",
                                    model_fingerprint=fingerprint, timeout_s=5)
        clients.append(attention)
        attention.register(deadline_s=5)
        commits: queue.Queue = queue.Queue()

        def on_update(phase, expert_map, _plane):
            if phase is UpdatePhase.COMMIT:
                attention.ack(expert_map.version, phase)
                commits.put(expert_map)
        attention.watch(on_update)
        return server, connect(server.address), attention, commits

    yield start
    for client in clients:
        client.close()


def _placement(stubs) -> ExpertMap:
    return expert_map_from_proto(stubs.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map)


def _experts_per_worker(expert_map: ExpertMap) -> list[list[set[int]]]:
    """[L][W] the logical experts worker w holds in layer l."""
    per = expert_map.num_physical_slots // expert_map.num_workers
    return [[{int(e) for e in expert_map.phy2log[layer, w * per:(w + 1) * per] if e >= 0}
             for w in range(expert_map.num_workers)] for layer in range(expert_map.num_layers)]


def _worker_tokens(expert_map: ExpertMap, load: torch.Tensor) -> torch.Tensor:
    """[L, W] tokens each worker computes under ``load`` [E] (spread evenly over replicas)."""
    phy = expert_map.phy2log
    held = phy.clamp(min=0)
    counts = torch.stack([torch.bincount(row[row >= 0], minlength=NUM_EXPERTS) for row in phy])      # [L, E]
    slot = torch.where(phy >= 0, load[held] / counts.gather(1, held).clamp(min=1), 0.0)             # [L, P]
    return slot.view(phy.shape[0], expert_map.num_workers, -1).sum(-1)


def test_initial_map_gives_the_slow_worker_fewer_experts(cluster):
    capacities = [1.0, 1.0, 0.1]
    server, stubs, _attention, commits = cluster(capacities, num_redundant=4)       # P = 12, S = 4
    first = commits.get(timeout=10)
    assert first.version == 1 and _placement(stubs).version == 1
    workers = {w.worker_id: w for w in stubs.workers().values()}
    assert [workers[f"expert-{i}"].capacity for i in range(3)] == pytest.approx(capacities)
    for layer in _experts_per_worker(first):
        fast, slow = layer[0] | layer[1], layer[2]
        assert len(slow) < min(len(layer[0]), len(layer[1])), layer                  # fewer experts
        assert fast | slow == set(range(NUM_EXPERTS))
    # under the uniform load placement plans with before any is reported, better than the trivial map
    uniform = torch.ones(NUM_LAYERS, NUM_EXPERTS, dtype=torch.float64)
    trivial = ExpertMap.trivial(NUM_LAYERS, NUM_EXPERTS, 4).phy2log
    capacity = torch.tensor(capacities, dtype=torch.float64)
    assert eplb.balancedness(first.phy2log, uniform, 3, capacity) > eplb.balancedness(trivial, uniform, 3, capacity)


def test_equal_capacities_keep_the_trivial_initial_map(cluster):
    _server, _stubs, _attention, commits = cluster([1.0, 1.0], num_redundant=0)
    first = commits.get(timeout=10)
    assert torch.equal(first.phy2log, ExpertMap.trivial(NUM_LAYERS, NUM_EXPERTS, 0).phy2log)


@pytest.mark.parametrize("num_redundant", [0, 4])
def test_rebalance_gives_hot_experts_to_fast_workers_and_cold_ones_to_the_slow(cluster, num_redundant):
    capacities = [1.0, 1.0, 0.1] if num_redundant else [1.0, 0.25]
    server, stubs, attention, commits = cluster(capacities, num_redundant=num_redundant)
    first = commits.get(timeout=10)
    load = HOT_LOAD[torch.randperm(NUM_EXPERTS, generator=torch.Generator().manual_seed(3))]   # hot ones anywhere
    slot_counts = _slot_counts(first, load)
    attention.report_load(first.version, slot_counts, num_passes=10)
    response = stubs.admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=30)
    assert response.version > first.version, response
    rebalanced = commits.get(timeout=10)
    while rebalanced.version < response.version:
        rebalanced = commits.get(timeout=10)
    assert _placement(stubs).version == rebalanced.version
    slow = len(capacities) - 1
    order = torch.argsort(load, descending=True).tolist()                            # hottest first
    for layer, held in enumerate(_experts_per_worker(rebalanced)):
        fast_experts = set().union(*held[:slow])
        assert set(order[:NUM_EXPERTS // 4]) <= fast_experts - held[slow], (layer, held)   # the hottest → fast only
        rank = {e: order.index(e) for e in range(NUM_EXPERTS)}                          # 0 = hottest
        slow_rank = sum(rank[e] for e in held[slow]) / len(held[slow])
        fast_rank = sum(rank[e] for e in fast_experts) / len(fast_experts)
        assert slow_rank > fast_rank + 1, (layer, held)                                    # slow: colder ones
        if num_redundant:                                                                # and fewer
            filled = (rebalanced.phy2log[layer].view(len(capacities), -1) >= 0).sum(1)
            per = rebalanced.num_physical_slots // len(capacities)
            assert int(filled[slow]) < per and int(filled[slow]) <= int(filled[:slow].min()), (layer, held)
    tokens = _worker_tokens(rebalanced, load)                                        # [L, W]
    share = tokens[:, slow] / tokens.sum(1)
    capacity_share = capacities[slow] / sum(capacities)
    assert bool((share <= 2 * capacity_share).all()), share
    capacity = torch.tensor(capacities, dtype=torch.float64)
    weight = load.expand(NUM_LAYERS, -1).to(torch.float64)
    blind = eplb.plan(weight, first.num_physical_slots, None, 1, len(capacities), algorithm="deepseek")
    assert eplb.balancedness(rebalanced.phy2log, weight, len(capacities), capacity) > \
        eplb.balancedness(blind, weight, len(capacities), capacity) + 0.2


def _slot_counts(expert_map: ExpertMap, load: torch.Tensor) -> torch.Tensor:
    """[L, P] tokens per slot an attention worker would report for ``load`` [E] under ``expert_map``."""
    phy = expert_map.phy2log
    held = phy.clamp(min=0)
    counts = torch.stack([torch.bincount(row[row >= 0], minlength=NUM_EXPERTS) for row in phy])
    return torch.where(phy >= 0, load[held] / counts.gather(1, held).clamp(min=1), 0.0).round().to(torch.int64)
