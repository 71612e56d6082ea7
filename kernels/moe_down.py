"""Grouped GEMM for down with the top-k weights applied, and the combine (gather-sum).

Legend: T tokens, K top-k, A = T*K assignments, D hidden, I intermediate, S local slots.

``down_weighted``: for every real padded position p of slot s (assignment a),
``rows[a] = weights[a] * (act[p] @ w2[s].T)``, written to row a of ``rows [A, D]``.
Rows of assignments served elsewhere (-1) are never written.

``down_weighted_tma``: the same, with the act and weight tiles loaded through TMA;
``down_weighted_tma_split``: on segments padded to BM/2, with a half-height tile for a
segment's odd last half-block (see ``moe_gate_up``). With ``config.tma_store`` both write
the weighted rows in slot-sorted padded order instead, ``rows [cap, D]`` (padding rows are
zeros), through TMA stores: the scattered store by assignment needs a [BM, BN] tensor of
64-bit pointers, which spilled ~1 KB per thread at BM=128, BN=256 (sm_90, Triton 3.6) and
kept 128x128 tiles at 230 registers (90 with the TMA store: 2 CTAs per SM fit). Measured on
an H200: down −11% at 16384 Qwen3 tokens, −1.5% at 4096.

``combine``: ``out[t] = Σ_k rows[t*K + k]`` over the k with ``slot_ids[t, k] >= 0``, summed
in float32 in k order (deterministic, no atomics); tokens with no local choice get zeros.
``combine_sorted``: the same over rows in sorted order, ``rows[positions[t*K + k]]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from epserve.kernels.moe_align import SlotAlignment
from epserve.kernels.moe_tiles import (GemmConfig, PersistentSplitTmaGemmConfig, block_slot, dot_acc, grouped_pid,
                                       persistent_full_tile, persistent_half_tile, persistent_half_tiles,
                                       persistent_layout, programs_for, slot_block, split_tile, split_tiles_bound)
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait


@triton.jit(do_not_specialize=["num_slots", "num_pid_m"])
def _down_kernel(act_ptr, w_ptr, rows_ptr, topk_w_ptr, sorted_ids_ptr, offsets_ptr, counts_ptr,
                 num_slots, D, I, num_pid_m,
                 stride_ap, stride_ws, stride_wn, stride_ra,
                 S_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_m, pid_n = grouped_pid(num_pid_m, tl.cdiv(D, BN), GROUP_M)
    m_start = pid_m * BM
    slot, seg_start, seg_count = block_slot(offsets_ptr, counts_ptr, m_start, num_slots, S_P2)
    if slot < 0:
        return
    rows = m_start + tl.arange(0, BM)
    real = (rows - seg_start) < seg_count
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < D
    a_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_ap + offs_k[None, :]
    b_ptrs = (w_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn
              + offs_k[:, None])
    aid = tl.load(sorted_ids_ptr + rows, mask=real, other=0)                   # before the K loop
    scale = tl.load(topk_w_ptr + aid, mask=real, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot_acc(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    acc = acc * scale[:, None]
    out_ptrs = rows_ptr + aid[:, None].to(tl.int64) * stride_ra + offs_n[None, :]
    tl.store(out_ptrs, acc.to(rows_ptr.dtype.element_ty), mask=real[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(rows_ptr, slot_ids_ptr, out_ptr, top_k: tl.constexpr, D, stride_ra, stride_ot,
                    BD: tl.constexpr, USE_PDL: tl.constexpr):
    # Walking k with 1-D loads measured 3-7x faster on an H200 than one masked [K, BD] tile load.
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(top_k):               # unrolled: the K row loads are in flight at once
        s = tl.load(slot_ids_ptr + t * top_k + k)
        keep = d_ok & ((offs * 0 + s) >= 0)
        v = tl.load(rows_ptr + (t * top_k + k) * stride_ra + offs, mask=keep, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_sorted_kernel(rows_ptr, positions_ptr, out_ptr, top_k: tl.constexpr, D, stride_r, stride_ot,
                           BD: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(top_k):
        p = tl.load(positions_ptr + t * top_k + k)                  # -1: served elsewhere
        keep = d_ok & ((offs * 0 + p) >= 0)
        v = tl.load(rows_ptr + p.to(tl.int64) * stride_r + offs, mask=keep, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def down_weighted(act: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  align: SlotAlignment, config: GemmConfig) -> torch.Tensor:
    """act [cap, I] (slot-sorted), w2 [S, D, I], weights [T, K] → rows [A, D] (assignment order)."""
    assert act.dim() == 2 and w2.dim() == 3, "act [cap, I], w2 [S, D, I]"
    num_slots, dim, inter = w2.shape
    assert act.shape == (align.sorted_ids.numel(), inter), f"act shape {tuple(act.shape)}"
    assert act.dtype == w2.dtype, f"dtype mismatch {act.dtype} vs {w2.dtype}"
    assert align.block_m % config.block_m == 0, "down BLOCK_M must divide the alignment's"
    assert act.stride(1) == 1 and w2.stride(2) == 1, "inner dimension must be contiguous"
    weights = weights.contiguous()
    rows = torch.empty(weights.numel(), dim, dtype=act.dtype, device=act.device)
    num_pid_m = act.shape[0] // config.block_m
    grid = (num_pid_m * triton.cdiv(dim, config.block_n),)
    _down_kernel[grid](
        act, w2, rows, weights, align.sorted_ids, align.slot_offsets, align.slot_counts,
        num_slots, dim, inter, num_pid_m,
        act.stride(0), w2.stride(0), w2.stride(1), rows.stride(0),
        S_P2=slot_block(num_slots), BM=config.block_m, BN=config.block_n,
        BK=config.block_k, GROUP_M=config.group_m, EVEN_K=inter % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl_enabled(act.device)))
    return rows


@triton.jit
def _down_tma_tile(a_desc, w_desc, out_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start, seg_start,
                   seg_count, slot, pid_n, D, I, stride_ra, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, TMA_STORE: tl.constexpr):
    row_w = slot * D + pid_n * BN                  # rows past D read the next slot: masked at the store
    # the rows' top-k weights (two dependent gathers) are loaded before the K loop, so their
    # latency hides behind it instead of stalling the epilogue of every tile
    rows = m_start + tl.arange(0, BM)
    real = (rows - seg_start) < seg_count
    aid = tl.load(sorted_ids_ptr + rows, mask=real, other=0)
    scale = tl.load(topk_w_ptr + aid, mask=real, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        a = a_desc.load([m_start, k0])                                          # [BM, BK]
        b = w_desc.load([row_w, k0])                                            # [BN, BK]
        acc = dot_acc(a, b.T, acc)
    acc = acc * scale[:, None]                     # padding rows: scale 0
    if TMA_STORE:
        out_desc.store([m_start, pid_n * BN], acc.to(out_desc.dtype))     # columns past D clip
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
        out_ptrs = rows_ptr + aid[:, None].to(tl.int64) * stride_ra + offs_n[None, :]
        tl.store(out_ptrs, acc.to(rows_ptr.dtype.element_ty), mask=real[:, None] & (offs_n < D)[None, :])


@triton.jit(do_not_specialize=["num_slots", "num_pid_m"])
def _down_tma_kernel(a_desc, a_half_desc, w_desc, out_desc, out_half_desc, rows_ptr, topk_w_ptr,
                     sorted_ids_ptr, offsets_ptr, counts_ptr, num_slots, D, I, num_pid_m, stride_ra,
                     S_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, TMA_STORE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_m, pid_n = grouped_pid(num_pid_m, tl.cdiv(D, BN), GROUP_M)
    m_start = pid_m * BM
    slot, seg_start, seg_count = block_slot(offsets_ptr, counts_ptr, m_start, num_slots, S_P2)
    if slot < 0:
        return
    _down_tma_tile(a_desc, w_desc, out_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start, seg_start,
                   seg_count, slot, pid_n, D, I, stride_ra, BM, BN, BK, TMA_STORE)


@triton.jit(do_not_specialize=["num_slots", "num_pid_m"])
def _down_tma_split_kernel(a_desc, a_half_desc, w_desc, out_desc, out_half_desc, rows_ptr, topk_w_ptr,
                           sorted_ids_ptr, offsets_ptr, counts_ptr, num_slots, D, I, num_pid_m, stride_ra,
                           S_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           GROUP_M: tl.constexpr, TMA_STORE: tl.constexpr, USE_PDL: tl.constexpr):
    """Segments padded to BM/2: even half-blocks run a BM tile, a lone last one a BM/2 tile."""
    HALF: tl.constexpr = BM // 2
    pdl_wait(USE_PDL)
    pid_m, pid_n = grouped_pid(num_pid_m, tl.cdiv(D, BN), GROUP_M)
    slot, m_start, seg_start, seg_count, full = split_tile(offsets_ptr, counts_ptr, pid_m, num_slots,
                                                            S_P2, HALF)
    if slot < 0:
        return
    if full:
        _down_tma_tile(a_desc, w_desc, out_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start, seg_start,
                       seg_count, slot, pid_n, D, I, stride_ra, BM, BN, BK, TMA_STORE)
    else:
        _down_tma_tile(a_half_desc, w_desc, out_half_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start,
                       seg_start, seg_count, slot, pid_n, D, I, stride_ra, HALF, BN, BK, TMA_STORE)


@triton.jit(do_not_specialize=["num_slots"])
def _down_tma_persistent_kernel(a_desc, a_half_desc, w_desc, out_desc, out_half_desc, rows_ptr, topk_w_ptr,
                                sorted_ids_ptr, offsets_ptr, counts_ptr, num_slots, D, I, num_pid_m, stride_ra,
                                S_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                GROUP_M: tl.constexpr, TMA_STORE: tl.constexpr, USE_PDL: tl.constexpr,
                                NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr):
    """The split tiles, NUM_PROGS programs each looping over them (``num_pid_m`` unused)."""
    HALF: tl.constexpr = BM // 2
    pdl_wait(USE_PDL)
    layout, num_full = persistent_layout(offsets_ptr, counts_ptr, num_slots, S_P2, HALF)
    num_pid_n = tl.cdiv(D, BN)
    for tile in tl.range(tl.program_id(0), num_full * num_pid_n, NUM_PROGS, flatten=FLATTEN):
        slot, m_start, seg_start, seg_count, pid_n = persistent_full_tile(tile, layout, num_full, num_pid_n, S_P2,
                                                                          HALF, GROUP_M)
        _down_tma_tile(a_desc, w_desc, out_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start, seg_start,
                       seg_count, slot, pid_n, D, I, stride_ra, BM, BN, BK, TMA_STORE)
    first, num_half = persistent_half_tiles(layout, num_full, num_pid_n, NUM_PROGS)
    for tile in tl.range(first, num_half, NUM_PROGS, flatten=FLATTEN):
        slot, m_start, seg_start, seg_count, pid_n = persistent_half_tile(tile, layout, num_pid_n, S_P2, HALF)
        _down_tma_tile(a_half_desc, w_desc, out_half_desc, rows_ptr, topk_w_ptr, sorted_ids_ptr, m_start,
                       seg_start, seg_count, slot, pid_n, D, I, stride_ra, HALF, BN, BK, TMA_STORE)


def _launch_down_tma(kernel, rows_per_pid: int, act, w2, weights, align, config,
                     num_pid_m: int | None = None) -> torch.Tensor:
    assert act.dim() == 2 and w2.dim() == 3, "act [cap, I], w2 [S, D, I]"
    num_slots, dim, inter = w2.shape
    assert act.shape == (align.sorted_ids.numel(), inter) and act.dtype == w2.dtype
    assert align.block_m % rows_per_pid == 0, "the down tiles must divide the alignment's BLOCK_M"
    assert act.is_contiguous() and w2.is_contiguous(), "TMA needs contiguous act and w2"
    assert inter * w2.element_size() % 16 == 0, "TMA needs 16-byte aligned rows"
    weights = weights.contiguous()
    tma_store = getattr(config, "tma_store", False)
    half_m = max(config.block_m // 2, 16)
    a_desc = TensorDescriptor.from_tensor(act, [config.block_m, config.block_k])
    a_half_desc = TensorDescriptor.from_tensor(act, [half_m, config.block_k])
    w_desc = TensorDescriptor.from_tensor(w2.view(num_slots * dim, inter), [config.block_n, config.block_k])
    out_desc = out_half_desc = None
    if tma_store:                                  # rows in sorted padded order
        assert dim * act.element_size() % 16 == 0, "a TMA store needs 16-byte aligned rows"
        rows = torch.empty(act.shape[0], dim, dtype=act.dtype, device=act.device)
        out_desc = TensorDescriptor.from_tensor(rows, [config.block_m, config.block_n])
        out_half_desc = TensorDescriptor.from_tensor(rows, [half_m, config.block_n])
    else:                                          # rows in assignment order
        rows = torch.empty(weights.numel(), dim, dtype=act.dtype, device=act.device)
    num_pid_m = act.shape[0] // rows_per_pid if num_pid_m is None else num_pid_m
    grid = (num_pid_m * triton.cdiv(dim, config.block_n),)
    extra = launch_options(pdl_enabled(act.device))
    if isinstance(config, PersistentSplitTmaGemmConfig):
        extra.update(NUM_PROGS=programs_for(config, act.device, grid[0]), FLATTEN=config.flatten)
        grid = (extra["NUM_PROGS"],)
    kernel[grid](
        a_desc, a_half_desc, w_desc, out_desc, out_half_desc, rows, weights, align.sorted_ids,
        align.slot_offsets, align.slot_counts, num_slots, dim, inter, num_pid_m, rows.stride(0),
        S_P2=slot_block(num_slots), BM=config.block_m, BN=config.block_n, BK=config.block_k,
        GROUP_M=config.group_m, TMA_STORE=tma_store, num_warps=config.num_warps,
        num_stages=config.num_stages, **extra)
    return rows


def down_weighted_tma(act: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      align: SlotAlignment, config: GemmConfig) -> torch.Tensor:
    """Like ``down_weighted``, act and weight tiles through TMA → rows [A, D]
    (``config.tma_store``: rows [cap, D] in sorted order, for ``combine_sorted``)."""
    return _launch_down_tma(_down_tma_kernel, config.block_m, act, w2, weights, align, config)


def down_weighted_tma_split(act: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                            align: SlotAlignment, config: GemmConfig) -> torch.Tensor:
    """TMA variant on segments padded to BLOCK_M/2, a half-height tile for an odd last half-block."""
    assert config.block_m % 32 == 0, "split tiles need BLOCK_M/2 >= 16"
    kernel = (_down_tma_persistent_kernel if isinstance(config, PersistentSplitTmaGemmConfig)
              else _down_tma_split_kernel)
    return _launch_down_tma(kernel, config.block_m // 2, act, w2, weights, align, config,
                            split_tiles_bound(align, config.block_m))


def combine(rows: torch.Tensor, slot_ids: torch.Tensor, block_d: int = 1024) -> torch.Tensor:
    """rows [T*K, D], slot_ids [T, K] → out [T, D] = Σ_k rows of local choices."""
    num_tokens, top_k = slot_ids.shape
    assert rows.dim() == 2 and rows.shape[0] == num_tokens * top_k, f"rows shape {tuple(rows.shape)}"
    dim = rows.shape[1]
    slot_ids = slot_ids.contiguous()
    out = torch.empty(num_tokens, dim, dtype=rows.dtype, device=rows.device)
    if num_tokens == 0:
        return out
    block_d = min(block_d, triton.next_power_of_2(dim))
    _combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        rows, slot_ids, out, top_k, dim, rows.stride(0), out.stride(0), BD=block_d, num_warps=4,
        **launch_options(pdl_enabled(rows.device)))
    return out


def combine_sorted(rows: torch.Tensor, positions: torch.Tensor, num_tokens: int, top_k: int,
                   block_d: int = 1024) -> torch.Tensor:
    """rows [cap, D] in sorted order, positions [T*K] (-1 = elsewhere) → out [T, D] = Σ_k rows[pos]."""
    assert rows.dim() == 2 and positions.numel() == num_tokens * top_k, "positions must be [T*K]"
    dim = rows.shape[1]
    out = torch.empty(num_tokens, dim, dtype=rows.dtype, device=rows.device)
    if num_tokens == 0:
        return out
    block_d = min(block_d, triton.next_power_of_2(dim))
    _combine_sorted_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        rows, positions, out, top_k, dim, rows.stride(0), out.stride(0), BD=block_d, num_warps=4,
        **launch_options(pdl_enabled(rows.device)))
    return out


def down_weighted_reference(act: torch.Tensor, w2_slot: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """act [n, I], w2_slot [D, I], weights [n] → weights[:, None] * (act @ w2_slot.T), float32."""
    return weights.float()[:, None] * (act.float() @ w2_slot.float().T)


def combine_reference(rows: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """rows [T*K, D] (rows of -1 choices may hold garbage), slot_ids [T, K] → [T, D]."""
    num_tokens, top_k = slot_ids.shape
    keep = (slot_ids >= 0).reshape(num_tokens, top_k, 1)
    summed = torch.where(keep, rows.float().reshape(num_tokens, top_k, -1), 0.0).sum(1)
    return summed.to(rows.dtype)
