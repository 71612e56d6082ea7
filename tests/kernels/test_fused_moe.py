"""Fused MoE kernels against their torch references, at small odd shapes (CPU: interpreter)."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.fused_moe import fused_moe_aligned, fused_moe_gemv, fused_moe_reference
from epserve.kernels.moe_align import align_by_slot
from epserve.kernels.moe_configs import AlignedConfig
from epserve.kernels.moe_down import combine, combine_reference, down_weighted, down_weighted_reference
from epserve.kernels.moe_gate_up import GemmConfig, gate_up_silu, gate_up_silu_reference
from epserve.kernels.moe_gemv import (GemvConfig, down_combine_gemv, down_combine_gemv_reference,
                              gate_up_silu_gemv, gate_up_silu_gemv_reference)
from kernel_test_utils import TOLERANCE, make_problem, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
S, D, I, K = 9, 45, 27, 4          # odd sizes; slots 7 and 8 are never hit
ALIGNED = AlignedConfig(GemmConfig(16, 32, 32, group_m=2), GemmConfig(16, 32, 16, group_m=1))
GEMV = GemvConfig(block_n=16, block_k=32, down_block_n=32, down_block_k=16)
GEMV_PER_CHOICE = GemvConfig(block_n=16, block_k=32, down_block_n=16, down_block_k=16, down_variant="per_choice")
GEMV_AHEAD = GemvConfig(block_n=16, block_k=32, down_block_n=8, down_block_k=16, down_ahead=True)


def problem(num_tokens, dtype, seed=0):
    return make_problem(num_tokens, K, S, D, I, dtype, DEVICE, hit_slots=S - 2, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
def test_fused_moe_aligned(num_tokens, dtype):
    hidden, slot_ids, weights, w13, w2 = problem(num_tokens, dtype, seed=num_tokens)
    out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, ALIGNED)
    assert out.shape == hidden.shape and out.dtype == dtype
    assert rel_err(out, fused_moe_reference(hidden, slot_ids, weights, w13, w2)) < TOLERANCE[dtype]


@pytest.mark.parametrize("config", [GEMV, GEMV_PER_CHOICE, GEMV_AHEAD], ids=["all_choices", "per_choice", "ahead"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_fused_moe_gemv(num_tokens, dtype, config):
    hidden, slot_ids, weights, w13, w2 = problem(num_tokens, dtype, seed=100 + num_tokens)
    out = fused_moe_gemv(hidden, slot_ids, weights, w13, w2, config)
    assert rel_err(out, fused_moe_reference(hidden, slot_ids, weights, w13, w2)) < TOLERANCE[dtype]


@pytest.mark.parametrize("variant", ["aligned", "gemv"])
def test_tokens_with_no_local_choice_get_zeros(variant):
    hidden, slot_ids, weights, w13, w2 = problem(3, torch.float32)
    slot_ids[1] = -1
    if variant == "aligned":
        out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, ALIGNED)
    else:
        out = fused_moe_gemv(hidden, slot_ids, weights, w13, w2, GEMV)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    slot_ids[:] = -1
    out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, ALIGNED)
    assert torch.equal(out, torch.zeros_like(out))


def test_down_block_m_may_divide_gate_up_block_m():
    hidden, slot_ids, weights, w13, w2 = problem(17, torch.float32, seed=5)
    config = AlignedConfig(GemmConfig(32, 16, 16), GemmConfig(16, 16, 32))
    out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, config)
    assert rel_err(out, fused_moe_reference(hidden, slot_ids, weights, w13, w2)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_aligned_kernel_against_its_reference(dtype):
    hidden, slot_ids, weights, w13, w2 = problem(17, dtype, seed=7)
    align = align_by_slot(slot_ids, S, 16)
    act = gate_up_silu(hidden, w13, align, K, ALIGNED.gate_up)
    rows = down_weighted(act, w2, weights, align, ALIGNED.down)
    offsets, counts = align.slot_offsets.tolist(), align.slot_counts.tolist()
    for s in range(S):
        if counts[s] == 0:
            continue
        pos = torch.arange(offsets[s], offsets[s] + counts[s], device=DEVICE)
        aid = align.sorted_ids[pos].long()
        ref_act = gate_up_silu_reference(hidden[aid // K], w13[s])
        assert rel_err(act[pos], ref_act) < TOLERANCE[dtype]
        pad = torch.arange(offsets[s] + counts[s], offsets[s + 1], device=DEVICE)
        assert torch.equal(act[pad], torch.zeros_like(act[pad])), "padding rows must be zeros"
        ref_rows = down_weighted_reference(act[pos], w2[s], weights.reshape(-1)[aid])
        assert rel_err(rows[aid], ref_rows) < TOLERANCE[dtype]
    assert torch.equal(combine(rows, slot_ids), combine_reference(rows, slot_ids)) or (
        rel_err(combine(rows, slot_ids), combine_reference(rows, slot_ids)) < TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_gemv_kernel_against_its_reference(dtype):
    hidden, slot_ids, weights, w13, w2 = problem(3, dtype, seed=9)
    act = gate_up_silu_gemv(hidden, w13, slot_ids, GEMV)
    local = (slot_ids.reshape(-1) >= 0).nonzero().squeeze(1)
    ref_act = gate_up_silu_gemv_reference(hidden, w13, slot_ids)
    assert rel_err(act[local], ref_act[local]) < TOLERANCE[dtype]
    out = down_combine_gemv(act, w2, slot_ids, weights, GEMV)
    assert rel_err(out, down_combine_gemv_reference(act, w2, slot_ids, weights)) < TOLERANCE[dtype]


def _tma_configs():
    from epserve.kernels.moe_gate_up import SplitTmaGemmConfig, TmaGemmConfig
    return {
        "tma": AlignedConfig(TmaGemmConfig(16, 16, 16, group_m=2), TmaGemmConfig(16, 32, 16, group_m=1)),
        # segments padded to 16 rows; 32-row tiles, a 16-row tile for an odd last half-block
        "split": AlignedConfig(SplitTmaGemmConfig(32, 16, 16, group_m=2), SplitTmaGemmConfig(32, 32, 16)),
        "split_then_tma": AlignedConfig(SplitTmaGemmConfig(32, 16, 32), TmaGemmConfig(16, 16, 16)),
    }


@pytest.mark.parametrize("variant", ["tma", "split", "split_then_tma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [3, 64])        # 64: full and half tiles both occur
def test_fused_moe_aligned_tma(num_tokens, dtype, variant):
    # TMA needs 16-byte aligned rows: D and I multiples of 8 here (odd shapes use the pointer kernels)
    hidden, slot_ids, weights, w13, w2 = make_problem(num_tokens, K, S, 40, 24, dtype, DEVICE,
                                                      hit_slots=S - 2, seed=num_tokens)
    out = fused_moe_aligned(hidden, slot_ids, weights, w13, w2, _tma_configs()[variant])
    assert rel_err(out, fused_moe_reference(hidden, slot_ids, weights, w13, w2)) < TOLERANCE[dtype]


def test_config_round_trip():
    from epserve.kernels.moe_configs import config_from_dict, config_to_dict, default_config
    from epserve.kernels.moe_gate_up import TmaGemmConfig
    configs = [default_config(t, 8, 128) for t in (1, 64, 1024, 20000)]
    configs.append(AlignedConfig(TmaGemmConfig(64, 128, 64, 8, 4, 3), GemmConfig(32, 64, 64)))
    configs += list(_tma_configs().values())
    for config in configs:
        assert config_from_dict(config_to_dict(config)) == config


def test_a_card_without_tables_uses_its_architecture_siblings():
    """An H800 has no tuned tables of its own: it gets the H200's (same architecture), not the
    generic heuristic; a card with its own table (the H100 at Qwen3's shape) uses it; a card of no
    known family gets the heuristic."""
    from epserve.kernels.moe_configs import default_config, get_config, load_config_table, stand_in_device

    h800, h100 = "NVIDIA H800", "NVIDIA H100 80GB HBM3"
    assert stand_in_device(h800) == "NVIDIA H200" and stand_in_device("NVIDIA H200") is None
    h200_table = load_config_table(128, 2048, 768, "NVIDIA H200")
    assert h200_table is not None
    assert load_config_table(128, 2048, 768, h800) == h200_table
    assert get_config(1, 8, 128, 2048, 768, h800) == h200_table[1]
    h100_table = load_config_table(128, 2048, 768, h100)
    assert h100_table is not None and h100_table != h200_table                   # tuned on the H100 itself
    assert load_config_table(32, 7168, 2048, h100) == load_config_table(32, 7168, 2048, "NVIDIA H200")
    assert get_config(1, 8, 128, 2048, 768, "NVIDIA A100-SXM4-80GB") == default_config(1, 8, 128)
