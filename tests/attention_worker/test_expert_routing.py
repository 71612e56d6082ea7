"""Replica choice never changes outputs: every replica holds the same expert."""

import pytest
import torch

from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.moe_executor import InProcessExperts
from epserve.expert_map import ExpertMap
from epserve.model_config import load_model_spec
from epserve.models.expert_side import load_expert_slots
from epserve.models.decoder import MoECall
from epserve.moe_runner import make_moe_runner
from epserve.weights import CheckpointReader


def test_static_and_dynamic_pick_replicas_of_the_chosen_expert():
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 2]])
    expert_map = ExpertMap(phy2log, 4)
    topk = torch.randint(0, 4, (64, 2), generator=torch.Generator().manual_seed(0))
    for algorithm in (DispatchAlgorithm.STATIC, DispatchAlgorithm.DYNAMIC):
        for rank in range(3):
            physical = ExpertRouter(algorithm, rank).to_physical(expert_map, 0, topk)
            assert torch.equal(phy2log[0][physical], topk)
    static = [ExpertRouter(DispatchAlgorithm.STATIC, r).to_physical(expert_map, 0, topk) for r in range(3)]
    assert len({tuple(s.flatten().tolist()) for s in static}) == 3          # ranks spread over replicas
    dynamic = ExpertRouter(DispatchAlgorithm.DYNAMIC, 0).to_physical(expert_map, 0, topk)
    assert len(set(dynamic[topk == 0].tolist())) == 3                        # expert 0's three replicas used


def test_fake_routing_ignores_the_router():
    expert_map = ExpertMap.trivial(1, 8)
    topk = torch.zeros(256, 2, dtype=torch.int64)
    physical = ExpertRouter(DispatchAlgorithm.FAKE, 0).to_physical(expert_map, 0, topk)
    assert len(set(physical.flatten().tolist())) > 4


@pytest.mark.parametrize("algorithm", [DispatchAlgorithm.STATIC, DispatchAlgorithm.DYNAMIC])
def test_redundant_placement_gives_identical_expert_outputs(tiny_model, algorithm):
    spec = load_model_spec(tiny_model)
    reader = CheckpointReader(tiny_model, show_progress=False)
    base = ExpertMap.trivial(spec.num_moe_layers, spec.num_experts)
    shuffled = torch.stack([torch.cat([torch.randperm(spec.num_experts, generator=torch.Generator().manual_seed(l)),
                                       torch.tensor([0, 3, 3, 5])]) for l in range(spec.num_moe_layers)])
    redundant = ExpertMap(shuffled, spec.num_experts)
    runner = make_moe_runner("torch")
    hidden = torch.randn(40, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    topk = torch.stack([torch.randperm(spec.num_experts)[: spec.num_experts_per_tok] for _ in range(40)])
    weights = torch.rand(40, spec.num_experts_per_tok, dtype=torch.float64)
    outs = []
    for expert_map, rank in ((base, 0), (redundant, 0), (redundant, 1)):
        executor = InProcessExperts(load_expert_slots(spec, reader, expert_map.phy2log, torch.float64), runner,
                                    ExpertRouter(algorithm, rank))
        call = MoECall(spec.num_moe_layers - 1, hidden, topk, weights)
        outs.append(executor.combine(executor.dispatch(call, expert_map, 0)))
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    assert torch.allclose(outs[0], outs[2], rtol=1e-12, atol=1e-14)
