"""EPLB fed with DeepSeek's expert groups: placement takes ``n_group`` from config.json."""

from __future__ import annotations

import torch

from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.eplb import EplbAlgorithm, plan, resolve_algorithm

# DeepSeek-V3's routing keys, at a small size: 4 decoder layers, the first dense → MoE layers 1..3
DEEPSEEK = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 4,
            "first_k_dense_replace": 1, "n_routed_experts": 32, "n_group": 8, "topk_group": 4,
            "num_experts_per_tok": 4, "hidden_size": 32, "moe_intermediate_size": 16}


def test_groups_come_from_the_model(write_model, tmp_path):
    config = PlacementConfig(model_path=str(write_model(tmp_path / "ds", **DEEPSEEK)), ep_size=4)
    assert config.model.moe_layers == (1, 2, 3) and config.model.num_expert_groups == 8
    assert config.num_groups == 8
    assert resolve_algorithm(config.eplb_algorithm, config.num_groups, config.num_nodes) \
        is EplbAlgorithm.deepseek_hierarchical
    explicit = PlacementConfig(model_path=str(write_model(tmp_path / "ds2", **DEEPSEEK)), ep_size=4, num_groups=4)
    assert explicit.num_groups == 4
    missing = {k: v for k, v in DEEPSEEK.items() if k != "n_group"}       # transformers' default: 8
    assert PlacementConfig(model_path=str(write_model(tmp_path / "ds3", **missing)), ep_size=4).num_groups == 8


def test_qwen_models_have_no_groups(model_dir):
    config = PlacementConfig(model_path=str(model_dir), ep_size=2)
    assert config.num_groups == 0
    chosen = resolve_algorithm(config.eplb_algorithm, config.num_groups or None, config.num_nodes)
    assert chosen is EplbAlgorithm.deepseek


def test_hierarchical_plan_keeps_each_group_on_one_node(write_model, tmp_path):
    config = PlacementConfig(model_path=str(write_model(tmp_path / "ds", **DEEPSEEK)), ep_size=4, num_nodes=2,
                             ep_num_redundant_experts=8)
    load = torch.rand(config.model.num_moe_layers, config.model.num_experts, generator=torch.Generator().manual_seed(0))
    phy2log = plan(load, config.num_physical_slots, config.num_groups, config.num_nodes, config.ep_size)
    group_size = config.model.num_experts // config.num_groups
    half = config.num_physical_slots // config.num_nodes
    for layer in phy2log:
        for node_slots in (layer[:half], layer[half:]):
            groups = set((node_slots // group_size).tolist())
            assert len(groups) == config.num_groups // config.num_nodes        # whole groups, 4 per node


def test_deepseek_v2_groups_only_with_group_limited_routing(write_model, tmp_path):
    v2 = {**{k: v for k, v in DEEPSEEK.items() if k != "topk_group"}, "architectures": ["DeepseekV2ForCausalLM"],
          "model_type": "deepseek_v2", "first_k_dense_replace": 1}
    greedy = PlacementConfig(model_path=str(write_model(tmp_path / "lite", **v2, topk_method="greedy")), ep_size=4)
    assert greedy.num_groups == 0
    limited = PlacementConfig(model_path=str(write_model(tmp_path / "v2", **v2, topk_method="group_limited_greedy")),
                              ep_size=4)
    assert limited.num_groups == 8
