"""The fused MoE over an expert side's local slots: two variants and their torch reference.

Legend: T tokens, K top-k, D hidden, I intermediate, S local slots.

``out[t] = Σ_k weights[t, k] · down_s(silu(gate_s x_t) · up_s x_t)`` with ``s = slot_ids[t, k]``;
choices with ``s == -1`` are served by another shard and cost nothing here.

- ``fused_moe_gemv`` (decode, a few tokens): gate_up GEMV with SiLU·mul, then down GEMV with
  the weighted combine fused. 2 launches.
- ``fused_moe_aligned`` (everything else): align by slot (1 or 2 launches), grouped
  gate_up GEMM with SiLU·mul, grouped down GEMM with the top-k weights applied, gather-sum
  combine. Each GEMM's config type picks its pointer, TMA or split-TMA kernel; a down config
  with ``tma_store`` writes rows in sorted order and the combine gathers them by position.
Neither syncs with the host: both are CUDA-graph capturable at any size. On Hopper every
kernel is launched with programmatic dependent launch (kernels/pdl.py). Prefill could size
the GEMM grids exactly with one host sync on the padded total; instead the grid covers the
worst case and blocks past the total exit at once (a few microseconds at 16k tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.kernels.moe_align import SlotAlignment, align_by_slot
from epserve.kernels.moe_configs import AlignedConfig, MoEConfig
from epserve.kernels.moe_down import (combine, combine_sorted, down_weighted, down_weighted_tma,
                              down_weighted_tma_split)
from epserve.kernels.moe_gate_up import (GemmConfig, SplitTmaGemmConfig, TmaGemmConfig, gate_up_silu,
                                 gate_up_silu_tma, gate_up_silu_tma_split)
from epserve.kernels.moe_gemv import GemvConfig, down_combine_gemv, gate_up_silu_gemv


def _check(hidden, slot_ids, weights, w13, w2) -> None:
    assert hidden.dim() == 2, f"hidden must be [T, D], got {tuple(hidden.shape)}"
    assert slot_ids.dim() == 2 and slot_ids.shape[0] == hidden.shape[0], "slot_ids must be [T, K]"
    assert weights.shape == slot_ids.shape, "weights must be [T, K] like slot_ids"
    assert w13.dim() == 3 and w2.dim() == 3 and w13.shape[0] == w2.shape[0], "w13 [S, 2I, D], w2 [S, D, I]"
    assert w13.shape[1] == 2 * w2.shape[2] and w13.shape[2] == w2.shape[1] == hidden.shape[1], (
        f"inconsistent shapes: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    assert hidden.dtype == w13.dtype == w2.dtype, "hidden, w13 and w2 must share a dtype"
    assert hidden.device == slot_ids.device == w13.device == w2.device, "all tensors on one device"


def fused_moe_gemv(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    _check(hidden, slot_ids, weights, w13, w2)
    hidden = hidden.contiguous()
    act = gate_up_silu_gemv(hidden, w13, slot_ids, config)                  # [T*K, I]
    return down_combine_gemv(act, w2, slot_ids, weights, config)


def fused_moe_aligned(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor, config: AlignedConfig) -> torch.Tensor:
    _check(hidden, slot_ids, weights, w13, w2)
    align = align_by_slot(slot_ids, w13.shape[0], config.align_block_m)
    return experts_aligned(hidden.contiguous(), slot_ids, weights, w13, w2, align, config)


def experts_aligned(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, align: SlotAlignment,
                    config: AlignedConfig) -> torch.Tensor:
    """The aligned variant after the alignment step: gate_up, down, combine → [T, D]."""
    act = gate_up_kernel(config.gate_up)(hidden, w13, align, slot_ids.shape[1], config.gate_up)
    rows = down_kernel(config.down)(act, w2, weights, align, config.down)
    if getattr(config.down, "tma_store", False):                            # [cap, D], sorted
        return combine_sorted(rows, align.positions, *slot_ids.shape)
    return combine(rows, slot_ids)                                          # [T*K, D]


def gate_up_kernel(config: GemmConfig):
    """The gate_up wrapper a GEMM config names (by its type)."""
    if isinstance(config, SplitTmaGemmConfig):
        return gate_up_silu_tma_split
    return gate_up_silu_tma if isinstance(config, TmaGemmConfig) else gate_up_silu


def down_kernel(config: GemmConfig):
    """The down wrapper a GEMM config names (by its type)."""
    if isinstance(config, SplitTmaGemmConfig):
        return down_weighted_tma_split
    return down_weighted_tma if isinstance(config, TmaGemmConfig) else down_weighted


def fused_moe(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
              w13: torch.Tensor, w2: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """hidden [T, D], slot_ids [T, K], weights [T, K], w13 [S, 2I, D], w2 [S, D, I] → [T, D]."""
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden)
    if isinstance(config, GemvConfig):
        return fused_moe_gemv(hidden, slot_ids, weights, w13, w2, config)
    return fused_moe_aligned(hidden, slot_ids, weights, w13, w2, config)


def fused_moe_reference(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pure torch, one pass per hit slot, in ``compute_dtype``; returns that dtype."""
    inter = w2.shape[2]
    x = hidden.to(compute_dtype)
    out = torch.zeros_like(x)
    flat = slot_ids.reshape(-1).long()
    top_k = slot_ids.shape[1]
    for s in torch.unique(flat[flat >= 0]).tolist():
        assignments = (flat == s).nonzero().squeeze(1)                      # [n]
        tokens = assignments // top_k
        gu = x[tokens] @ w13[s].to(compute_dtype).T                         # [n, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = act @ w2[s].to(compute_dtype).T                                 # [n, D]
        out.index_add_(0, tokens, weights.reshape(-1)[assignments].to(compute_dtype)[:, None] * y)
    return out
