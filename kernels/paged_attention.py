"""Batched decode attention over the paged KV cache, with split-KV.

Legend: B sequences (one query token each), H query heads, Hkv KV heads, G = H / Hkv query
heads per KV head, Dh head dim, N cache blocks, Bs tokens per block, M block-table width,
S splits of each sequence's context, C a sequence's context length.

Cache layout (attention_worker/kv_cache.py): ``k_cache, v_cache: [N, Bs, Hkv, Dh]``; token i of
sequence b lives in block ``block_tables[b, i // Bs]`` at offset ``i % Bs``. Table entries past
``cdiv(C, Bs)`` are never read. Query head h reads KV head ``h // G``.

``paged_decode_attention``: grid (B, Hkv, S). A program takes one KV head and all G query
heads that read it (padded to 16 rows for ``tl.dot``), so each K/V tile is loaded once per
group. Its share of the context is computed on the device from ``context_lens``: split s
covers ``[s * P, min((s + 1) * P, C))`` with ``P = cdiv(cdiv(C, S), BLOCK_N) * BLOCK_N``, so one
CUDA graph captured for a given S serves any context lengths (splits past C do nothing but
write an empty partial). Online softmax in float32 with exp2 (log2(e) folded into the
scale). With S > 1 each split writes its normalised partial output and log2-sum-exp to a
float32 ``DecodeWorkspace`` and a second kernel (grid (B, H)) merges the splits; with S = 1
the first kernel writes the output directly (one launch). A row with C = 0 (graph padding)
gets zeros. No host sync; on Hopper both kernels launch with PDL (kernels/pdl.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16               # tl.dot needs at least 16 rows
# decode_num_splits' thresholds: estimates, not yet measured (bench/gpu/attention_kernels.py times every S)
SPLIT_MIN_CONTEXT = 512         # below this one launch should beat splitting (latency-bound)
MIN_TOKENS_PER_SPLIT = 128      # two BLOCK_N tiles: fewer and the merge would cost more than it saves
MERGE_CHUNK = 16                # splits merged per step of the merge kernel


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64           # keys per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass
class DecodeWorkspace:
    """Float32 scratch for S > 1, allocated once and reused (static across graph replays).

    Rows past the batch are untouched, so one workspace sized for the largest batch serves
    every smaller one with the same (H, S, Dh)."""

    partial_out: torch.Tensor   # [B, H, S, Dh] each split's normalised output
    lse: torch.Tensor           # [B, H, S] each split's log2-sum-exp of the scaled scores

    @classmethod
    def allocate(cls, batch: int, num_heads: int, num_splits: int, head_dim: int,
                 device: torch.device | str) -> DecodeWorkspace:
        return cls(torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
                   torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device))


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """A split count S for ``paged_decode_attention``: enough (B, Hkv, S) programs for ~4 per SM,
    each split at least MIN_TOKENS_PER_SPLIT tokens of ``max_context``, and 1 for short contexts.

    For a CUDA graph pass the longest context it may serve: a split beyond a shorter context
    only writes an empty partial, so too many costs little, too few leaves SMs idle on long
    contexts."""
    assert batch > 0 and num_kv_heads > 0 and num_sms > 0
    if max_context < SPLIT_MIN_CONTEXT:
        return 1
    wanted = triton.cdiv(4 * num_sms, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT)))


@triton.jit
def _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, end, qk_scale,
                 stride_kn, stride_kt, stride_kh,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, G_P: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Online softmax of q [G_P, DH] over context positions [start, end) of one sequence.

    Returns (acc [G_P, DH] unnormalised output, m [G_P] running max, l [G_P] running sum),
    float32, scores in log2 units. With start >= end: acc 0, m -inf, l 0."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    head_off = kv_head.to(tl.int64) * stride_kh
    acc = tl.zeros([G_P, DH], dtype=tl.float32)
    m_i = tl.full([G_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                                   # [BLOCK_N]
        live = pos < end
        block = tl.load(table_ptr + pos // BS, mask=live, other=0).to(tl.int64)
        row = block * stride_kn + (pos % BS).to(tl.int64) * stride_kt + head_off
        kv_off = row[:, None] + offs_d[None, :]                             # [BLOCK_N, DH]
        k = tl.load(k_cache_ptr + kv_off, mask=live[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_P, BLOCK_N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))                          # finite: a live key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_group_q(q_ptr, b, kv_head, stride_qb, stride_qh,
                  G: tl.constexpr, G_P: tl.constexpr, DH: tl.constexpr):
    """q rows of the G heads reading ``kv_head`` → ([G_P, DH] with zero padding rows, heads [G_P])."""
    g = tl.arange(0, G_P)
    heads = kv_head * G + g
    ptrs = q_ptr + b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + tl.arange(0, DH)[None, :]
    return tl.load(ptrs, mask=(g < G)[:, None], other=0.0), heads


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr, out_ptr, qk_scale,
                   stride_qb, stride_qh, stride_kn, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                   G: tl.constexpr, G_P: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                   DH: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """S = 1: grid (B, Hkv); the whole context, output written directly."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens_ptr + b)
    q, heads = _load_group_q(q_ptr, b, kv_head, stride_qb, stride_qh, G, G_P, DH)
    acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr + b * stride_tb, kv_head, 0, context,
                                 qk_scale, stride_kn, stride_kt, stride_kh, BS, BLOCK_N, DH, G_P, DOT_PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]                     # C = 0: zeros
    ptrs = out_ptr + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + tl.arange(0, DH)[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(tl.arange(0, G_P) < G)[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr, part_ptr, lse_ptr,
                         qk_scale, num_splits, H,
                         stride_qb, stride_qh, stride_kn, stride_kt, stride_kh, stride_tb,
                         G: tl.constexpr, G_P: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                         DH: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """S > 1: grid (B, Hkv, S); split s's normalised output → part [B, H, S, Dh], lse → [B, H, S]."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(context, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)
    q, heads = _load_group_q(q_ptr, b, kv_head, stride_qb, stride_qh, G, G_P, DH)
    acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr + b * stride_tb, kv_head, start, end,
                                 qk_scale, stride_kn, stride_kt, stride_kh, BS, BLOCK_N, DH, G_P, DOT_PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    part = acc / l_safe[:, None]                                            # empty split: zeros
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    row = (b * H + heads.to(tl.int64)) * num_splits + split                 # [G_P] index into [B, H, S]
    head_ok = tl.arange(0, G_P) < G
    tl.store(part_ptr + row[:, None] * DH + tl.arange(0, DH)[None, :], part, mask=head_ok[:, None])
    tl.store(lse_ptr + row, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_splits, H, stride_ob, stride_oh,
                         S_P: tl.constexpr, CHUNK: tl.constexpr, DH: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, H): out = Σ_s 2^(lse_s - max) · part_s / Σ_s 2^(lse_s - max); all splits empty → 0."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    base = (b * H + h) * num_splits                                         # row of split 0
    offs_s = tl.arange(0, S_P)
    lse = tl.load(lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), axis=0)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DH)
    acc = tl.zeros([DH], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        live = s0 + offs_c < num_splits
        w = tl.exp2(tl.load(lse_ptr + base + s0 + offs_c, mask=live, other=float("-inf")) - m)
        part = tl.load(part_ptr + (base + s0 + offs_c)[:, None] * DH + offs_d[None, :],
                       mask=live[:, None], other=0.0)                       # [CHUNK, DH]
        acc += tl.sum(part * w[:, None], axis=0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4, f"k_cache must be [N, Bs, Hkv, Dh], got {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), \
        "k_cache and v_cache must have the same shape and strides"
    assert q.dtype == k_cache.dtype == v_cache.dtype, \
        f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    num_heads, head_dim = q.shape[-2:]
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"head dim: q {head_dim}, cache {k_cache.shape[3]}"
    assert num_heads % num_kv_heads == 0, f"H={num_heads} is not a multiple of Hkv={num_kv_heads}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"Dh={head_dim} must be a power of 2, >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "the head dim must be contiguous"


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact products (no TF32); 16-bit inputs: the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int, out: torch.Tensor | None = None,
                           workspace: DecodeWorkspace | None = None,
                           config: DecodeConfig = DecodeConfig()) -> torch.Tensor:
    """q [B, H, Dh], caches [N, Bs, Hkv, Dh], block_tables [B, M] int32, context_lens [B] int32
    (tokens in the cache, the current one included) → out [B, H, Dh] in q's dtype.

    ``num_splits`` (S) is a host int (static per captured graph); ``workspace`` (S > 1) is
    allocated here when not given: pass a preallocated one to keep addresses static."""
    check_paged_cache(q, k_cache, v_cache)
    assert q.dim() == 3, f"q must be [B, H, Dh], got {tuple(q.shape)}"
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32, \
        f"block_tables must be [B={batch}, M] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert context_lens.shape == (batch,) and context_lens.dtype == torch.int32, \
        f"context_lens must be [B={batch}] int32, got {tuple(context_lens.shape)} {context_lens.dtype}"
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    group_p = max(MIN_DOT_ROWS, triton.next_power_of_2(group))
    common = dict(G=group, G_P=group_p, BS=k_cache.shape[1], BLOCK_N=config.block_n, DH=head_dim,
                  DOT_PRECISION=dot_precision(q.dtype), num_warps=config.num_warps,
                  num_stages=config.num_stages, **launch_options(pdl_enabled(q.device)))
    qk_scale = scale * LOG2E
    if num_splits == 1:
        _decode_kernel[(batch, num_kv_heads)](
            q, k_cache, v_cache, block_tables, context_lens, out, qk_scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1), **common)
        return out
    if workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, num_splits, head_dim, q.device)
    part, lse = workspace.partial_out, workspace.lse
    assert part.shape[0] >= batch and part.shape[1:] == (num_heads, num_splits, head_dim) \
        and lse.shape == part.shape[:3] and part.is_contiguous() and lse.is_contiguous() \
        and part.dtype == lse.dtype == torch.float32, \
        f"workspace must be float32 [>={batch}, {num_heads}, {num_splits}, {head_dim}] and [..., {num_splits}]"
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, qk_scale, num_splits, num_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), **common)
    _merge_splits_kernel[(batch, num_heads)](
        part, lse, out, num_splits, num_heads, out.stride(0), out.stride(1),
        S_P=triton.next_power_of_2(num_splits), CHUNK=MERGE_CHUNK, DH=head_dim, num_warps=4,
        **launch_options(pdl_enabled(q.device)))
    return out


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                   context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, [C, Hkv, Dh] each (reads only its first cdiv(C, Bs) blocks)."""
    blocks = table[: -(-context // k_cache.shape[1])].long()
    keys = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:context]
    values = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:context]
    return keys, values


def attend_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [n, H, Dh] at ``positions`` [n], keys/values [C, Hkv, Dh]: query i sees keys 0..=positions[i]."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, keys) * scale                 # [H, n, C]
    causal = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hnc,chd->nhd", probs, values)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                     compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Same contract, sequence by sequence in ``compute_dtype`` (returned in it); host syncs."""
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for b, context in enumerate(context_lens.tolist()):
        if context == 0:
            continue
        keys, values = gather_context(k_cache, v_cache, block_tables[b], context)
        positions = torch.tensor([context - 1], device=q.device)
        out[b] = attend_reference(q[b:b + 1].to(compute_dtype), keys.to(compute_dtype),
                                  values.to(compute_dtype), positions, scale)[0]
    return out
