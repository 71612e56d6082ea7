"""Per-head q/k RMSNorm + RoPE + paged KV-cache store, in one launch.

Legend: T tokens, H query heads, Hkv KV heads, Dh head dim, N cache blocks, Bs block size.

``q = qk_norm_rope_store(qkv [T, (H + 2 Hkv) Dh], ...)``: the fused QKV projection's q, k and v
heads of each token are read once. q and k heads get Qwen3's per-head RMSNorm (when the weights
are given; numerics of ``epserve.models.layers.rms_norm``, over the whole head) and rotate-half RoPE
on the head's leading R dims (R = Dh, or the model's rotary_dim with partial rotary: GLM-4-MoE; the
other Dh - R dims pass through) exactly as ``RotaryEmbedding``: ``freqs = float32(position) * inv_freq``, cos/sin of ``cat(freqs, freqs)``
in float32 (times YaRN's ``attention_factor`` when it is not 1: GPT-OSS, as ``models/rope_scaling.py``)
rounded to the model dtype, ``x * cos + rotate_half(x) * sin`` with each product and the sum
rounded to the dtype as torch rounds them. The rotated q is returned ``[T, H, Dh]``; the rotated k and the raw v go to ``k_cache/v_cache [N, Bs, Hkv, Dh]`` at flat slot
``slot_mapping[t]`` (block ``slot // Bs``, offset ``slot % Bs``); a slot < 0 marks a padding
token, for which nothing is stored.

Grid (T, H + Hkv): program (t, j) handles q head j (j < H) or KV head j - H (its k and its v).
No host sync; launched with PDL on Hopper (kernels/pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait
from epserve.models.layers import RotaryEmbedding, rms_norm


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x float32 rounded to the model dtype and back (where torch would materialise a tensor)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _norm_rope(x1, x2, x3, w_ptr, d, ok, d3, ok3, cos, sin, eps, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
               HAS_NORM: tl.constexpr):
    """Rotated halves x1, x2 [HALF] and the pass-through part x3 [PASS] of one head (model dtype) →
    (rotated halves, x3), float32 holding dtype values; the norm runs over the whole head."""
    dtype: tl.constexpr = x1.dtype
    f1, f2, f3 = x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0) + tl.sum(f3 * f3, axis=0)) / HEAD_DIM
                        + eps)
        w1 = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + ROT // 2 + d, mask=ok, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + ROT + d3, mask=ok3, other=0.0).to(tl.float32)
        h1 = _round(_round(f1 * rstd, dtype) * w1, dtype)
        h2 = _round(_round(f2 * rstd, dtype) * w2, dtype)
        f3 = _round(_round(f3 * rstd, dtype) * w3, dtype)
    else:
        h1, h2 = f1, f2
    out1 = _round(_round(h1 * cos, dtype) - _round(h2 * sin, dtype), dtype)
    out2 = _round(_round(h2 * cos, dtype) + _round(h1 * sin, dtype), dtype)
    return out1, out2, f3


@triton.jit
def _store_head(row_ptr, x1, x2, x3, d, ok, d3, ok3, half, dtype: tl.constexpr):
    """A head's rotated halves x1, x2 and pass-through part x3 stored in the model dtype at row_ptr."""
    tl.store(row_ptr + d, x1.to(dtype), mask=ok)
    tl.store(row_ptr + half + d, x2.to(dtype), mask=ok)
    tl.store(row_ptr + d3, x3.to(dtype), mask=ok3)


@triton.jit
def _cos_sin(pos_ptr, inv_freq_ptr, d, ok, dtype: tl.constexpr, ATTENTION_FACTOR: tl.constexpr):
    """cos and sin [HALF_P2] of one token's position, float32 holding dtype values."""
    freqs = tl.load(pos_ptr).to(tl.float32) * tl.load(inv_freq_ptr + d, mask=ok, other=0.0)
    if ATTENTION_FACTOR != 1.0:                 # YaRN: cos/sin scaled in float32 before the rounding
        return _round(tl.cos(freqs) * ATTENTION_FACTOR, dtype), _round(tl.sin(freqs) * ATTENTION_FACTOR, dtype)
    return _round(tl.cos(freqs), dtype), _round(tl.sin(freqs), dtype)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, q_w_ptr, k_w_ptr, q_out_ptr,
                               k_cache_ptr, v_cache_ptr, slot_ptr, H, HKV, block_size, eps,
                               stride_qkv, stride_qo_t, stride_qo_h,
                               stride_kc_n, stride_kc_b, stride_kc_h, stride_vc_n, stride_vc_b, stride_vc_h,
                               HEAD_DIM: tl.constexpr, ROT: tl.constexpr, HALF_P2: tl.constexpr,
                               PASS_P2: tl.constexpr, HAS_NORM: tl.constexpr, ATTENTION_FACTOR: tl.constexpr,
                               USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    half: tl.constexpr = ROT // 2
    d = tl.arange(0, HALF_P2)
    ok = d < half
    d3 = ROT + tl.arange(0, PASS_P2)            # the dims RoPE leaves alone (none without partial rotary)
    ok3 = d3 < HEAD_DIM
    head = qkv_ptr + t * stride_qkv + j * HEAD_DIM
    x1 = tl.load(head + d, mask=ok, other=0.0)
    x2 = tl.load(head + half + d, mask=ok, other=0.0)
    x3 = tl.load(head + d3, mask=ok3, other=0.0)
    dtype: tl.constexpr = x1.dtype
    cos, sin = _cos_sin(pos_ptr + t, inv_freq_ptr, d, ok, dtype, ATTENTION_FACTOR)
    if j < H:
        out1, out2, out3 = _norm_rope(x1, x2, x3, q_w_ptr, d, ok, d3 - ROT, ok3, cos, sin, eps, HEAD_DIM, ROT,
                                      HAS_NORM)
        _store_head(q_out_ptr + t * stride_qo_t + j * stride_qo_h, out1, out2, out3, d, ok, d3, ok3, half, dtype)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            kh = j - H
            out1, out2, out3 = _norm_rope(x1, x2, x3, k_w_ptr, d, ok, d3 - ROT, ok3, cos, sin, eps, HEAD_DIM, ROT,
                                          HAS_NORM)
            block, offset = slot // block_size, slot % block_size
            k_row = k_cache_ptr + block * stride_kc_n + offset * stride_kc_b + kh * stride_kc_h
            _store_head(k_row, out1, out2, out3, d, ok, d3, ok3, half, dtype)
            v_head = head + HKV * HEAD_DIM                       # v head kh sits Hkv heads after k head kh
            v_row = v_cache_ptr + block * stride_vc_n + offset * stride_vc_b + kh * stride_vc_h
            _store_head(v_row, tl.load(v_head + d, mask=ok), tl.load(v_head + half + d, mask=ok),
                        tl.load(v_head + d3, mask=ok3), d, ok, d3, ok3, half, dtype)


def _check(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
           inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
           q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None) -> None:
    num_tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    assert qkv.dim() == 2 and qkv.shape[1] == width, f"qkv must be [T, {width}], got {list(qkv.shape)}"
    assert qkv.stride(1) == 1, "qkv's rows must be contiguous"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert num_heads % num_kv_heads == 0, f"H={num_heads} must be a multiple of Hkv={num_kv_heads}"
    assert positions.shape == (num_tokens,) and not positions.dtype.is_floating_point, "positions must be [T] integers"
    assert slot_mapping.shape == (num_tokens,) and not slot_mapping.dtype.is_floating_point, \
        "slot_mapping must be [T] integers"
    assert inv_freq.dtype == torch.float32 and inv_freq.dim() == 1 and 0 < 2 * inv_freq.shape[0] <= head_dim, \
        "inv_freq must be [R/2] float32 (R = the rotated dims of a head, at most Dh)"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, head_dim), \
            f"{name} must be [N, Bs, {num_kv_heads}, {head_dim}], got {list(cache.shape)}"
        assert cache.dtype == qkv.dtype and cache.stride(3) == 1, f"{name} must be {qkv.dtype} with contiguous heads"
    assert k_cache.shape == v_cache.shape, "k_cache and v_cache disagree"
    assert (q_norm_weight is None) == (k_norm_weight is None), "give both q/k norm weights or neither"
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            assert w.shape == (head_dim,) and w.is_contiguous(), f"{name} must be [{head_dim}]"
            assert w.dtype == qkv.dtype, f"{name} must be {qkv.dtype}, got {w.dtype}"


def qk_norm_rope_store(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                       eps: float = 1e-6, q_out: torch.Tensor | None = None,
                       attention_factor: float = 1.0) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) Dh], positions/slot_mapping [T], inv_freq [R/2] float32 (R = 2 · its length:
    the leading dims of each head that RoPE rotates, Dh unless the model uses partial rotary),
    k_cache/v_cache [N, Bs, Hkv, Dh] (written at the token slots) → q [T, H, Dh] (into q_out if given).
    ``attention_factor``: YaRN's scale of cos and sin (host float; 1: none)."""
    _check(qkv, num_heads, num_kv_heads, head_dim, positions, inv_freq, k_cache, v_cache, slot_mapping,
           q_norm_weight, k_norm_weight)
    num_tokens = qkv.shape[0]
    rotary_dim = 2 * inv_freq.shape[0]
    if q_out is None:
        q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    assert q_out.shape == (num_tokens, num_heads, head_dim) and q_out.dtype == qkv.dtype and q_out.stride(2) == 1, \
        f"q_out must be [T, H, Dh] {qkv.dtype} with contiguous heads"
    if num_tokens == 0:
        return q_out
    has_norm = q_norm_weight is not None
    q_w = q_norm_weight if has_norm else inv_freq                 # never read without the norm
    k_w = k_norm_weight if has_norm else inv_freq
    _qk_norm_rope_store_kernel[(num_tokens, num_heads + num_kv_heads)](
        qkv, positions, inv_freq, q_w, k_w, q_out, k_cache, v_cache, slot_mapping,
        num_heads, num_kv_heads, k_cache.shape[1], eps,
        qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=head_dim, ROT=rotary_dim, HALF_P2=triton.next_power_of_2(rotary_dim // 2),
        PASS_P2=triton.next_power_of_2(max(head_dim - rotary_dim, 1)), HAS_NORM=has_norm,
        ATTENTION_FACTOR=float(attention_factor),
        num_warps=1 if head_dim <= 128 else 2, **launch_options(pdl_enabled(qkv.device)))
    return q_out


def qk_norm_rope_store_reference(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                                 positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                 q_norm_weight: torch.Tensor | None = None,
                                 k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                                 attention_factor: float = 1.0) -> torch.Tensor:
    """The layer ops composed (as attention_torch.py): returns q [T, H, Dh], writes the caches in place."""
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    rotary_dim = 2 * inv_freq.shape[0]
    rope = RotaryEmbedding(rotary_dim, theta=1.0)
    rope.inv_freq = inv_freq                                       # the given frequencies, not theta's
    if attention_factor == 1.0:
        cos, sin = rope.cos_sin(positions, qkv.dtype)
    else:
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)            # [T, R/2]
        freqs = torch.cat((freqs, freqs), dim=-1)
        cos, sin = ((f * attention_factor).to(qkv.dtype) for f in (freqs.cos(), freqs.sin()))
    q = torch.cat([rope.apply(q[..., :rotary_dim], cos, sin), q[..., rotary_dim:]], dim=-1)
    k = torch.cat([rope.apply(k[..., :rotary_dim], cos, sin), k[..., rotary_dim:]], dim=-1)
    stored = slot_mapping >= 0
    slots = slot_mapping[stored].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[stored].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[stored].to(v_cache.dtype)
    return q
