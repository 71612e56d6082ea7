"""Decode kernels: MoE as GEMVs per assignment, with no alignment step.

Legend: T tokens, K top-k, A = T*K assignments (a = t*K + k), D hidden, I intermediate,
S local slots, BN rows of weights per program, BK columns per step.

At a handful of tokens every assignment reads a different expert, so sorting by slot buys
nothing and costs a launch. Weight rows are the long dimension here (the swap-AB view):
each program streams BN rows of one expert's weights against one token's vector.

``gate_up_silu_gemv``: grid (I / BN, A); ``act[a] = silu(x[t] @ gate.T) * (x[t] @ up.T)``
for the expert in slot ``slot_ids[a]``; programs of -1 assignments exit at once.
``down_combine_gemv``: grid (D / BN, T); ``out[t] = Σ_k weights[t, k] · act[a] @ w2[s].T``
over local choices, so the weighting and the combine are fused and deterministic. Two
kernels, named by ``GemvConfig.down_variant``: ``all_choices`` streams BN rows of all K
experts at once (most bytes in flight when most choices are local: Qwen3, 9 us vs 13 on an
H200); ``per_choice`` walks the choices and skips -1 ones (an EP shard, where 7 of 8 are
elsewhere: 11 us vs 35). ``down_ahead`` has ``all_choices`` load its weights a tile ahead, the first
before its PDL wait (they depend on nothing gate_up writes). Two launches, no host sync, graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

DOWN_VARIANTS = ("all_choices", "per_choice")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    down_block_n: int = 0       # 0: same as block_n
    down_block_k: int = 0       # 0: same as block_k
    down_num_warps: int = 0     # 0: same as num_warps
    down_variant: str = "all_choices"   # which down kernel: "all_choices" or "per_choice"
    down_ahead: bool = False            # all_choices: weight tiles loaded a step ahead, the first before the PDL wait

    def __post_init__(self) -> None:
        assert self.down_variant in DOWN_VARIANTS, f"down_variant must be one of {DOWN_VARIANTS}"


@triton.jit(do_not_specialize=["top_k"])
def _gate_up_gemv_kernel(x_ptr, w_ptr, act_ptr, slot_ids_ptr, top_k, D, I,
                         stride_xt, stride_ws, stride_wn, stride_aa,
                         BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    a = tl.program_id(1)
    s = tl.load(slot_ids_ptr + a)
    if s < 0:
        return
    t = a // top_k
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < I
    g_ptrs = (w_ptr + s.to(tl.int64) * stride_ws + offs_n[:, None].to(tl.int64) * stride_wn
              + offs_k[None, :])
    u_ptrs = g_ptrs + I * stride_wn
    x_ptrs = x_ptr + t.to(tl.int64) * stride_xt + offs_k
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_ok = offs_k < D - k0
        x = tl.load(x_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)
        wg = tl.load(g_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + a.to(tl.int64) * stride_aa + offs_n, act.to(act_ptr.dtype.element_ty),
             mask=n_ok)


@triton.jit(do_not_specialize=["top_k"])
def _down_combine_gemv_kernel(act_ptr, w_ptr, out_ptr, slot_ids_ptr, topk_w_ptr, top_k, D, I,
                              stride_aa, stride_ws, stride_wn, stride_ot,
                              K_P2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, AHEAD: tl.constexpr,
                              USE_PDL: tl.constexpr):
    """Rows r = (k, n) of all K choices at once: K times the bytes in flight of a per-k loop.

    AHEAD: the first weight tile is loaded before the PDL wait and each later one a step ahead. Only
    ``act`` comes from the kernel before (gate_up); slot ids and weights come from the one before that,
    which has finished before this kernel can be launched (gate_up's programs let it launch only after
    their own wait), so they and the expert rows they select can be read before the wait."""
    if not AHEAD:
        pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, K_P2 * BN)
    kk = r // BN
    nn = pid_n * BN + r % BN
    a = t * top_k + kk                                                        # assignment of row r
    s = tl.load(slot_ids_ptr + a, mask=kk < top_k, other=-1)
    live = (kk < top_k) & (s >= 0)
    wk = tl.load(topk_w_ptr + a, mask=live, other=0.0).to(tl.float32)
    row_ok = live & (nn < D)
    w_rows = w_ptr + tl.maximum(s, 0).to(tl.int64) * stride_ws + nn.to(tl.int64) * stride_wn
    a_rows = act_ptr + a * stride_aa
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([K_P2 * BN, BK], dtype=tl.float32)
    if AHEAD:
        w_tile = tl.load(w_rows[:, None] + offs_k[None, :], mask=row_ok[:, None] & (offs_k < I)[None, :], other=0.0)
        pdl_wait(USE_PDL)
        for i_next in range(BK, I + BK, BK):
            w_next = tl.load(w_rows[:, None] + i_next + offs_k[None, :],
                             mask=row_ok[:, None] & (offs_k < I - i_next)[None, :], other=0.0)
            m = row_ok[:, None] & (offs_k < I - (i_next - BK))[None, :]
            av = tl.load(a_rows[:, None] + (i_next - BK) + offs_k[None, :], mask=m, other=0.0)
            acc += w_tile.to(tl.float32) * av.to(tl.float32)
            w_tile = w_next
    else:
        for i0 in range(0, I, BK):
            m = row_ok[:, None] & (offs_k < I - i0)[None, :]
            wv = tl.load(w_rows[:, None] + i0 + offs_k[None, :], mask=m, other=0.0)
            av = tl.load(a_rows[:, None] + i0 + offs_k[None, :], mask=m, other=0.0)
            acc += wv.to(tl.float32) * av.to(tl.float32)
    part = tl.sum(acc, axis=1) * wk                                           # [K_P2 * BN]
    out = tl.sum(tl.reshape(part, [K_P2, BN]), axis=0)                        # fixed order over k
    offs_n = pid_n * BN + tl.arange(0, BN)
    tl.store(out_ptr + t * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < D)


@triton.jit(do_not_specialize=["top_k"])
def _down_combine_gemv_per_choice_kernel(act_ptr, w_ptr, out_ptr, slot_ids_ptr, topk_w_ptr, top_k, D, I,
                                         stride_aa, stride_ws, stride_wn, stride_ot,
                                         BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
    """Walks the K choices, skipping those served elsewhere: no lanes wasted on -1 choices."""
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < D
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(top_k):
        a = t * top_k + k
        s = tl.load(slot_ids_ptr + a)
        if s >= 0:
            wk = tl.load(topk_w_ptr + a).to(tl.float32)
            w_ptrs = (w_ptr + s.to(tl.int64) * stride_ws + offs_n[:, None].to(tl.int64) * stride_wn
                      + offs_k[None, :])
            for i0 in range(0, I, BK):
                k_ok = offs_k < I - i0
                av = tl.load(act_ptr + a * stride_aa + i0 + offs_k, mask=k_ok, other=0.0)
                wv = tl.load(w_ptrs + i0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += wv.to(tl.float32) * (av.to(tl.float32) * wk)[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + t * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def _check(hidden: torch.Tensor, slot_ids: torch.Tensor, w: torch.Tensor) -> None:
    assert hidden.dim() == 2 and slot_ids.dim() == 2 and w.dim() == 3, "hidden [T, D], slot_ids [T, K], w [S, *, *]"
    assert hidden.shape[0] == slot_ids.shape[0], "hidden and slot_ids disagree on T"
    assert not slot_ids.dtype.is_floating_point, "slot_ids must be integers"
    assert hidden.dtype == w.dtype, f"dtype mismatch {hidden.dtype} vs {w.dtype}"
    assert hidden.stride(1) == 1 and w.stride(2) == 1, "inner dimension must be contiguous"
    assert slot_ids.numel() < 65536, "the GEMV path is for decode batches"


def gate_up_silu_gemv(hidden: torch.Tensor, w13: torch.Tensor, slot_ids: torch.Tensor,
                      config: GemvConfig) -> torch.Tensor:
    """hidden [T, D], w13 [S, 2I, D], slot_ids [T, K] → act [T*K, I] (rows of -1 unwritten)."""
    _check(hidden, slot_ids, w13)
    _, two_i, dim = w13.shape
    assert hidden.shape[1] == dim, f"hidden size {hidden.shape[1]} != w13's {dim}"
    inter = two_i // 2
    slot_ids = slot_ids.contiguous()
    act = torch.empty(slot_ids.numel(), inter, dtype=hidden.dtype, device=hidden.device)
    if slot_ids.numel() == 0:
        return act
    grid = (triton.cdiv(inter, config.block_n), slot_ids.numel())
    _gate_up_gemv_kernel[grid](hidden, w13, act, slot_ids, slot_ids.shape[1], dim, inter,
                               hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
                               BN=config.block_n, BK=config.block_k, num_warps=config.num_warps,
                               **launch_options(pdl_enabled(hidden.device)))
    return act


def down_combine_gemv(act: torch.Tensor, w2: torch.Tensor, slot_ids: torch.Tensor,
                      weights: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """act [T*K, I], w2 [S, D, I], slot_ids [T, K], weights [T, K] → out [T, D]."""
    num_tokens, top_k = slot_ids.shape
    _, dim, inter = w2.shape
    assert act.shape == (num_tokens * top_k, inter), f"act shape {tuple(act.shape)}"
    assert act.dtype == w2.dtype and act.stride(1) == 1 and w2.stride(2) == 1
    assert weights.shape == slot_ids.shape, "weights and slot_ids must both be [T, K]"
    slot_ids, weights = slot_ids.contiguous(), weights.contiguous()
    out = torch.empty(num_tokens, dim, dtype=act.dtype, device=act.device)
    if num_tokens == 0:
        return out
    bn = config.down_block_n or config.block_n
    bk = config.down_block_k or config.block_k
    grid = (triton.cdiv(dim, bn), num_tokens)
    args = (act, w2, out, slot_ids, weights, top_k, dim, inter,
            act.stride(0), w2.stride(0), w2.stride(1), out.stride(0))
    warps = config.down_num_warps or config.num_warps
    pdl = launch_options(pdl_enabled(act.device))
    if config.down_variant == "per_choice":
        _down_combine_gemv_per_choice_kernel[grid](*args, BN=bn, BK=bk, num_warps=warps, **pdl)
    else:
        _down_combine_gemv_kernel[grid](*args, K_P2=triton.next_power_of_2(top_k), BN=bn, BK=bk,
                                        AHEAD=config.down_ahead, num_warps=warps, **pdl)
    return out


def gate_up_silu_gemv_reference(hidden: torch.Tensor, w13: torch.Tensor,
                                slot_ids: torch.Tensor) -> torch.Tensor:
    """float32 act [T*K, I]; rows of -1 assignments are zero."""
    inter = w13.shape[1] // 2
    flat = slot_ids.reshape(-1).long()
    act = torch.zeros(flat.numel(), inter, dtype=torch.float32, device=hidden.device)
    for a, s in enumerate(flat.tolist()):
        if s >= 0:
            gu = hidden[a // slot_ids.shape[1]].float() @ w13[s].float().T
            act[a] = F.silu(gu[:inter]) * gu[inter:]
    return act


def down_combine_gemv_reference(act: torch.Tensor, w2: torch.Tensor, slot_ids: torch.Tensor,
                                weights: torch.Tensor) -> torch.Tensor:
    """float32 out [T, D] = Σ_k weights[t, k] · act[t*K + k] @ w2[s].T over local choices."""
    num_tokens, top_k = slot_ids.shape
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=act.device)
    for a, s in enumerate(slot_ids.reshape(-1).tolist()):
        if s >= 0:
            t = a // top_k
            out[t] += weights.reshape(-1)[a].float() * (act[a].float() @ w2[s].float().T)
    return out
