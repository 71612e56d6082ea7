"""A decode layer's attention input in one launch: residual add + RMSNorm + QKV GEMV + q/k norm + RoPE +
KV-cache store.

Legend: T tokens (a few: decode), D hidden, H query heads, Hkv KV heads, Dh head dim, N = (H + 2 Hkv) Dh
rows of the fused QKV projection, BN rows per program.

At a few tokens these are three launches (``add_rms_norm``, the QKV GEMM, ``qk_norm_rope_store``), and on
a GPU each kernel boundary costs a few microseconds even under PDL: more than the norm and the RoPE
themselves. ``add_norm_qkv_rope_store`` runs them as one grid (T, N / BN):

1. every program forms token t's ``summed = delta + residual`` (rounded to the model dtype, the new
   residual stream) and its RMSNorm scale (D elements, cheap to redo per program); program 0 of the token
   stores ``summed``;
2. the program's BN rows of the projection against the normed row, float32 accumulation, the result
   rounded to the model dtype (what a GEMM writes) into a scratch ``qkv`` row. The first weight tile is
   loaded before the PDL wait (weights depend on no kernel), so it streams while the previous layer's
   last kernel finishes; each later tile is loaded a step ahead;
3. the last of a head's Dh / BN programs to finish (a per-(token, head) counter, atomic with
   acquire-release ordering, that resets itself: graph replays need no memset) reads the head back and
   finishes it as ``kernels/rope.py`` does: a q head gets its norm and RoPE and goes to ``q_out``; a k head
   its norm and RoPE and goes to the cache at ``slot_mapping[t]``; a v head goes to the cache as it is.
   A slot < 0 (a padding row) stores nothing.

Numerics are the composition's (``add_norm_qkv_rope_store_reference``): ``kernels/rms_norm.py``'s
rounding for the norm, float32 accumulation of the projection in another order than the GEMM library's,
``kernels/rope.py``'s for the rest. The counters are per device: the kernel must not run on two streams
of one device at once (the engine runs one). No host sync; launched with PDL on Hopper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from epserve.kernels.counters import zeroed_counters
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait
from epserve.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
from epserve.kernels.rope import _cos_sin, _norm_rope, _store_head, qk_norm_rope_store_reference

MAX_TOKENS = 8              # what the kernel computes
# what callers use it for: on an H100 (bench/results/engine_ab_h100_fused.json) it is 2.3% faster than the
# three launches at one token and 1.6-11% slower at 2-8 (every token's programs stream the weights again)
FUSED_MAX_TOKENS = 1


@dataclass(frozen=True)
class NormQkvConfig:
    block_n: int = 8        # rows per program; divides Dh
    block_k: int = 512      # columns per step of the GEMV loop (1024: 3.445 ms a step against 3.360, H100)
    num_warps: int = 4


DEFAULT_CONFIG = NormQkvConfig()


MAX_HIDDEN = 16384          # each program holds a token's residual row in registers


def fits(residual: torch.Tensor, qkv_weight: torch.Tensor, k_cache: torch.Tensor, head_dim: int,
         config: NormQkvConfig = DEFAULT_CONFIG) -> bool:
    """Whether ``add_norm_qkv_rope_store`` serves this step faster than the three steps composed (callers
    compose them otherwise): one token, a hidden row that fits in registers, heads of whole tiles, one dtype."""
    return (0 < residual.shape[0] <= FUSED_MAX_TOKENS and residual.shape[1] <= MAX_HIDDEN
            and head_dim % config.block_n == 0 and residual.stride(1) == 1 and qkv_weight.stride(1) == 1
            and qkv_weight.dtype == residual.dtype == k_cache.dtype)


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Per-(token, head) arrival counters, zero between launches (the last program resets its own)."""
    return zeroed_counters("norm_qkv_rope", device, size)


@triton.jit
def _summed(delta_row, res_row, offs, ok, HAS_DELTA: tl.constexpr, dtype: tl.constexpr):
    """residual (+ delta) at offs, rounded to the model dtype as torch's add rounds it."""
    r = tl.load(res_row + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        return (tl.load(delta_row + offs, mask=ok, other=0.0).to(tl.float32) + r.to(tl.float32)).to(dtype)
    return r


@triton.jit
def _add_norm_qkv_rope_kernel(delta_ptr, res_ptr, norm_w_ptr, w_ptr, res_out_ptr, qkv_ptr, counter_ptr,
                              pos_ptr, inv_freq_ptr, q_w_ptr, k_w_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                              slot_ptr, D, H, HKV, block_size, eps,
                              stride_dt, stride_rt, stride_ot, stride_wn, stride_qkv, stride_qo_t, stride_qo_h,
                              stride_kc_n, stride_kc_b, stride_kc_h, stride_vc_n, stride_vc_b, stride_vc_h,
                              HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
                              HALF_P2: tl.constexpr, PASS_P2: tl.constexpr, HAS_QK_NORM: tl.constexpr,
                              ATTENTION_FACTOR: tl.constexpr, USE_PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    dtype: tl.constexpr = res_out_ptr.dtype.element_ty
    rows = nb * BN + tl.arange(0, BN)           # N is a multiple of BN: no row mask
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    offs_k = tl.arange(0, BK)
    w_tile = tl.load(w_rows + offs_k[None, :], mask=(offs_k < D)[None, :], other=0.0)   # weights: before the wait
    pdl_wait(USE_PDL)
    delta_row = delta_ptr + t * stride_dt
    res_row = res_ptr + t * stride_rt
    # 1. the residual add and the norm's scale
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    s32 = _summed(delta_row, res_row, offs, ok, HAS_DELTA, dtype).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s32 * s32, axis=0) / D + eps)
    if nb == 0:
        tl.store(res_out_ptr + t * stride_ot + offs, s32.to(dtype), mask=ok)
    # 2. BN rows of the projection against the normed row, the next weight tile loaded a step ahead
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k_next in range(BK, D + BK, BK):
        w_next = tl.load(w_rows + (k_next + offs_k)[None, :], mask=(k_next + offs_k < D)[None, :], other=0.0)
        kk = k_next - BK + offs_k
        k_ok = kk < D
        s = _summed(delta_row, res_row, kk, k_ok, HAS_DELTA, dtype).to(tl.float32)
        nw = tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = ((s * rstd).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)
        acc += w_tile.to(tl.float32) * x[None, :]
        w_tile = w_next
    qkv_row = qkv_ptr + t * stride_qkv
    tl.store(qkv_row + rows, tl.sum(acc, axis=1).to(dtype))
    # 3. the head's last program: q/k norm, RoPE, the cache store
    tl.debug_barrier()                          # every thread's stores precede the release below
    head = (nb * BN) // HEAD_DIM
    counter = counter_ptr + t * (H + 2 * HKV) + head
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    if done == HEAD_DIM // BN - 1:
        half: tl.constexpr = ROT // 2
        d = tl.arange(0, HALF_P2)
        hok = d < half
        d3 = ROT + tl.arange(0, PASS_P2)
        ok3 = d3 < HEAD_DIM
        head_row = qkv_row + head * HEAD_DIM
        x1 = tl.load(head_row + d, mask=hok, other=0.0, volatile=True)
        x2 = tl.load(head_row + half + d, mask=hok, other=0.0, volatile=True)
        x3 = tl.load(head_row + d3, mask=ok3, other=0.0, volatile=True)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        block, offset = slot // block_size, slot % block_size
        if head < H:
            cos, sin = _cos_sin(pos_ptr + t, inv_freq_ptr, d, hok, dtype, ATTENTION_FACTOR)
            out1, out2, out3 = _norm_rope(x1, x2, x3, q_w_ptr, d, hok, d3 - ROT, ok3, cos, sin, eps, HEAD_DIM,
                                          ROT, HAS_QK_NORM)
            _store_head(q_out_ptr + t * stride_qo_t + head * stride_qo_h, out1, out2, out3, d, hok, d3, ok3,
                        half, dtype)
        elif head < H + HKV:
            if slot >= 0:
                cos, sin = _cos_sin(pos_ptr + t, inv_freq_ptr, d, hok, dtype, ATTENTION_FACTOR)
                out1, out2, out3 = _norm_rope(x1, x2, x3, k_w_ptr, d, hok, d3 - ROT, ok3, cos, sin, eps,
                                              HEAD_DIM, ROT, HAS_QK_NORM)
                k_row = k_cache_ptr + block * stride_kc_n + offset * stride_kc_b + (head - H) * stride_kc_h
                _store_head(k_row, out1, out2, out3, d, hok, d3, ok3, half, dtype)
        elif slot >= 0:
            v_row = v_cache_ptr + block * stride_vc_n + offset * stride_vc_b + (head - H - HKV) * stride_vc_h
            _store_head(v_row, x1, x2, x3, d, hok, d3, ok3, half, dtype)
        tl.store(counter, 0)


def add_norm_qkv_rope_store(delta: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                            qkv_weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                            positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                            eps: float = 1e-6, attention_factor: float = 1.0,
                            config: NormQkvConfig = DEFAULT_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [T, D] (None: the first layer, nothing to add), residual [T, D], norm_weight [D], qkv_weight
    [N, D], positions/slot_mapping [T], inv_freq [R/2] float32, k_cache/v_cache [blocks, Bs, Hkv, Dh]
    (written at the token slots) → (q [T, H, Dh] normed and rotated, summed [T, D] the new residual).
    ``eps`` serves the input norm and the q/k norms (one model eps)."""
    num_tokens, dim = residual.shape
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    assert 0 < num_tokens <= MAX_TOKENS, f"{num_tokens} tokens: the fused path takes 1 to {MAX_TOKENS}"
    assert delta is None or (delta.shape == residual.shape and delta.dtype == residual.dtype
                             and delta.stride(1) == 1), "delta must be [T, D] like residual"
    assert residual.stride(1) == 1 and norm_weight.shape == (dim,) and norm_weight.is_contiguous(), \
        "residual [T, D] with contiguous rows, norm_weight [D]"
    assert qkv_weight.shape == (rows, dim) and qkv_weight.stride(1) == 1, f"qkv_weight must be [{rows}, {dim}]"
    assert qkv_weight.dtype == residual.dtype == k_cache.dtype == v_cache.dtype, "one model dtype throughout"
    assert head_dim % config.block_n == 0, f"block_n {config.block_n} must divide head_dim {head_dim}"
    assert positions.shape == slot_mapping.shape == (num_tokens,), "positions and slot_mapping must be [T]"
    assert inv_freq.dtype == torch.float32 and 0 < 2 * inv_freq.shape[0] <= head_dim, "inv_freq [R/2] float32"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, head_dim) and cache.stride(3) == 1, \
            f"{name} must be [N, Bs, {num_kv_heads}, {head_dim}] with contiguous heads"
    assert (q_norm_weight is None) == (k_norm_weight is None), "give both q/k norm weights or neither"
    device = residual.device
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=residual.dtype, device=device)
    summed = torch.empty_like(residual)             # not residual itself: other programs still read it
    qkv = torch.empty(num_tokens, rows, dtype=residual.dtype, device=device)   # scratch, read back per head
    rotary_dim = 2 * inv_freq.shape[0]
    has_norm = q_norm_weight is not None
    total_heads = num_heads + 2 * num_kv_heads
    _add_norm_qkv_rope_kernel[(num_tokens, rows // config.block_n)](
        residual if delta is None else delta, residual, norm_weight, qkv_weight, summed, qkv,
        _counters(device, MAX_TOKENS * total_heads), positions, inv_freq,
        q_norm_weight if has_norm else inv_freq, k_norm_weight if has_norm else inv_freq,
        q_out, k_cache, v_cache, slot_mapping, dim, num_heads, num_kv_heads, k_cache.shape[1], eps,
        0 if delta is None else delta.stride(0), residual.stride(0), summed.stride(0), qkv_weight.stride(0),
        qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(dim), BN=config.block_n,
        BK=min(config.block_k, triton.next_power_of_2(dim)), HEAD_DIM=head_dim, ROT=rotary_dim,
        HALF_P2=triton.next_power_of_2(rotary_dim // 2),
        PASS_P2=triton.next_power_of_2(max(head_dim - rotary_dim, 1)), HAS_QK_NORM=has_norm,
        ATTENTION_FACTOR=float(attention_factor), num_warps=config.num_warps,
        **launch_options(pdl_enabled(device)))
    return q_out, summed


def add_norm_qkv_rope_store_reference(delta: torch.Tensor | None, residual: torch.Tensor,
                                      norm_weight: torch.Tensor, qkv_weight: torch.Tensor, num_heads: int,
                                      num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                                      inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                                      k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                                      attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The three operations composed (the model's unfused path); writes the caches in place."""
    if delta is None:
        x, summed = rms_norm_reference(residual, norm_weight, eps), residual
    else:
        x, summed = add_rms_norm_reference(delta, residual, norm_weight, eps)
    q = qk_norm_rope_store_reference(F.linear(x, qkv_weight), num_heads, num_kv_heads, head_dim, positions,
                                     inv_freq, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight,
                                     eps, attention_factor)
    return q, summed
