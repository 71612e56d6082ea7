"""TMA-store epilogues: down rows written in sorted order and gathered by position.

CPU: the interpreter at small shapes (float32 / float16); GPU: bf16 at the benchmark's shapes.
"""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.fused_moe import fused_moe_aligned, fused_moe_reference
from epserve.kernels.moe_align import SINGLE_PROGRAM_MAX_ASSIGNMENTS, align_by_slot
from epserve.kernels.moe_configs import AlignedConfig, config_from_dict, config_to_dict
from epserve.kernels.moe_down import combine_reference, combine_sorted, down_weighted_tma_split
from epserve.kernels.moe_gate_up import (PersistentSplitTmaGemmConfig, SplitTmaGemmConfig, TmaGemmConfig,
                                 gate_up_silu_tma_split)
from kernel_test_utils import TOLERANCE, make_problem, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
S, K = 9, 4


def _configs():
    return {
        "tma": AlignedConfig(TmaGemmConfig(16, 16, 16, group_m=2, tma_store=True),
                             TmaGemmConfig(16, 32, 16, group_m=1, tma_store=True)),
        "split": AlignedConfig(SplitTmaGemmConfig(32, 16, 16, group_m=2, tma_store=True),
                               SplitTmaGemmConfig(32, 32, 16, tma_store=True)),
        "down_only": AlignedConfig(SplitTmaGemmConfig(32, 16, 32), SplitTmaGemmConfig(32, 16, 16, tma_store=True)),
        # 4 programs in the interpreter walk many full and half tiles each
        "persistent": AlignedConfig(PersistentSplitTmaGemmConfig(32, 16, 16, group_m=2, tma_store=True),
                                    PersistentSplitTmaGemmConfig(32, 32, 16, tma_store=True, flatten=False)),
        "persistent_gate_up_pointer_store": AlignedConfig(PersistentSplitTmaGemmConfig(32, 16, 32, ctas_per_sm=2),
                                                          SplitTmaGemmConfig(32, 16, 16, tma_store=True)),
    }


@pytest.mark.parametrize("num_tokens", [1, 17, SINGLE_PROGRAM_MAX_ASSIGNMENTS // K + 5])
def test_positions_invert_sorted_ids(num_tokens):
    _, slot_ids, *_ = make_problem(num_tokens, K, S, 8, 8, torch.float32, DEVICE, hit_slots=S - 2,
                                   seed=num_tokens)
    align = align_by_slot(slot_ids, S, 16)
    pos = align.positions.cpu().long()
    flat = slot_ids.reshape(-1).cpu()
    assert torch.equal(pos < 0, flat < 0)
    local = (flat >= 0).nonzero().squeeze(1)
    assert torch.equal(align.sorted_ids.cpu().long()[pos[local]], local)


@pytest.mark.parametrize("variant", ["tma", "split", "down_only", "persistent", "persistent_gate_up_pointer_store"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [3, 64, 90])    # 90: full and half tiles both occur
def test_fused_moe_tma_store(num_tokens, dtype, variant):
    hidden, slot_ids, weights, w13, w2 = make_problem(num_tokens, K, S, 40, 24, dtype, DEVICE,
                                                      hit_slots=S - 2, seed=num_tokens)
    out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, _configs()[variant])
    assert rel_err(out, fused_moe_reference(hidden, slot_ids, weights, w13, w2)) < TOLERANCE[dtype]


def test_sorted_rows_and_combine():
    hidden, slot_ids, weights, w13, w2 = make_problem(64, K, S, 40, 24, torch.float32, DEVICE,
                                                      hit_slots=S - 2, seed=3)
    config = _configs()["split"]
    align = align_by_slot(slot_ids, S, config.align_block_m)
    act = gate_up_silu_tma_split(hidden, w13, align, K, config.gate_up)
    rows = down_weighted_tma_split(act, w2, weights, align, config.down)
    assert rows.shape == (align.sorted_ids.numel(), w2.shape[1])
    pos = align.positions.long()
    local = pos >= 0
    by_assignment = torch.zeros(slot_ids.numel(), w2.shape[1], device=DEVICE)
    by_assignment[local] = rows[pos[local]]
    out = combine_sorted(rows, align.positions, *slot_ids.shape)
    assert rel_err(out, combine_reference(by_assignment, slot_ids)) < 1e-6


def test_tma_store_config_round_trip():
    for config in _configs().values():
        assert config_from_dict(config_to_dict(config)) == config
    plain = config_to_dict(AlignedConfig(TmaGemmConfig(16, 16, 16), TmaGemmConfig(16, 16, 16)))
    assert "tma_store" not in plain["down"], "older tables keep their keys"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,num_tokens", [((128, 2048, 768, 128), 300), ((128, 2048, 768, 128), 4096),
                                              ((32, 7168, 2048, 256), 1024)])
def test_tma_store_bf16_real_shapes(shape, num_tokens):
    num_slots, dim, inter, num_experts = shape
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, dim, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(num_slots, 2 * inter, dim, device="cuda", generator=g) / dim ** 0.5).bfloat16()
    w2 = (torch.randn(num_slots, dim, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    weights, experts = torch.rand(num_tokens, num_experts, device="cuda", generator=g).topk(8, dim=-1)
    slot_ids = torch.where(experts < num_slots, experts, -1).to(torch.int32)
    ref = fused_moe_reference(hidden, slot_ids, weights, w13, w2, compute_dtype=torch.float32)
    for cfg in (AlignedConfig(SplitTmaGemmConfig(128, 128, 64, 8, 8, 4, tma_store=True),
                              SplitTmaGemmConfig(128, 256, 64, 8, 8, 4, tma_store=True)),
                AlignedConfig(SplitTmaGemmConfig(128, 128, 64, 8, 8, 4),
                              SplitTmaGemmConfig(128, 128, 64, 8, 8, 3, tma_store=True)),
                AlignedConfig(TmaGemmConfig(64, 128, 64, 8, 4, 3, tma_store=True),
                              TmaGemmConfig(64, 128, 64, 8, 4, 3, tma_store=True)),
                AlignedConfig(PersistentSplitTmaGemmConfig(128, 128, 64, 8, 8, 4, tma_store=True),
                              PersistentSplitTmaGemmConfig(128, 256, 64, 8, 8, 3, tma_store=True)),
                AlignedConfig(PersistentSplitTmaGemmConfig(128, 128, 64, 8, 8, 3, tma_store=True, flatten=False),
                              PersistentSplitTmaGemmConfig(128, 128, 64, 8, 8, 3, tma_store=True, ctas_per_sm=2))):
        out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, cfg)
        assert rel_err(out, ref) <= 1e-2, cfg


@pytest.mark.parametrize("seed", range(4))
def test_split_tiles_bound_covers_every_tile(seed):
    from epserve.kernels.moe_gate_up import split_tiles_bound
    g = torch.Generator().manual_seed(seed)
    num_slots, top_k, tile_rows = 13, 4, 32
    for num_tokens in (1, 5, 40, 300):
        slot_ids = torch.randint(-1, num_slots, (num_tokens, top_k), generator=g, dtype=torch.int32)
        align = align_by_slot(slot_ids.to(DEVICE), num_slots, tile_rows // 2)
        counts = align.slot_counts.cpu()
        tiles = int(((counts + tile_rows - 1) // tile_rows).sum())
        assert tiles <= split_tiles_bound(align, tile_rows) <= align.sorted_ids.numel() // (tile_rows // 2)
