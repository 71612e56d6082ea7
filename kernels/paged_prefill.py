"""Batched causal attention for prefill and mixed steps over the paged KV cache.

Legend: T new tokens in the step (B sequences' runs concatenated), B sequences, H query heads,
Hkv KV heads, G = H / Hkv, Dh head dim, N cache blocks, Bs tokens per block, M block-table
width, n a sequence's new tokens (q_len), C its context length (new tokens included).

The new tokens' keys and values are already in the cache (layout: kernels/paged_attention.py).
Query token i of sequence b sits at position ``C - n + i`` and sees cache positions ``0 ..= C -
n + i``, so a chunk continuing a prompt and a decode row (n = 1) are the same case.

``paged_prefill_attention``: grid (cdiv(max n, TOKENS), B, Hkv). A program packs TOKENS query
tokens × the G heads of one KV head into BLOCK_M rows (row r: token r // G, head r % G), so a
K/V tile is loaded once per group and short runs (decode rows) fill rows with heads rather
than padding. Key tiles of BLOCK_N run from 0 to the program's last position: those wholly
before its first position without a mask, the rest with the causal mask; tiles past it are
skipped. Each tile's block-table entries are loaded a tile ahead, so the K/V loads of
``num_stages`` - 1 tiles overlap the MMAs. Programs with the most keys (last query blocks)
start first. Programs past a sequence's n exit at once; n = 0 contributes nothing. Online
softmax in float32 with exp2. With a window W (``WINDOW`` constexpr; 0: none) query position p sees
keys p - W < k <= p: tiles start at the first row's window, masked until every row's window holds
the whole tile; with ``sinks`` (``HAS_SINKS``) each head's sink logit joins the denominator after
the last tile. Without either, the same code as before they existed. No host sync; on Hopper the
kernel launches with PDL (kernels/pdl.py). Tile configs: ``PrefillConfig`` (``PREFILL_SWEEP``: the candidates the
benchmark times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.paged_attention import (LOG2E, MIN_DOT_ROWS, add_sink, attend_reference, check_paged_cache,
                                             check_sinks_window, dot_precision, gather_context)
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

MAX_GRID_Y = 65535


@dataclass(frozen=True)
class PrefillConfig:
    """H200, Qwen3-30B-A3B's shape, bf16, before the table entries were loaded a tile ahead: 1x4096
    tokens 497 µs = 276 TFLOP/s, 8x512 109 µs (torch SDPA, contiguous: 262 and 57 µs). Then
    Triton 3.6's pipeliner, seeing the K/V addresses come from a load in the same iteration,
    issued each K/V tile only after the previous tile's MMAs (one buffer at num_stages 2 to 4).
    With the entries a tile ahead, num_stages = 3 keeps two K/V tiles in flight (sm_90: 128 KiB
    of shared memory, 184 registers, no spills at 128x64, 8 warps). Not yet timed:
    PREFILL_SWEEP is what --sweep tries."""

    block_m: int = 128          # query rows (tokens × heads) per program, at most; fewer for short runs
    block_n: int = 64           # keys per tile
    num_warps: int = 8          # at block_m >= 128; 4 below
    num_stages: int = 3         # K/V tiles in flight + 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            assert value >= 16 and value & (value - 1) == 0, f"{name}={value} must be a power of 2, >= 16"
        assert self.num_stages >= 1 and self.num_warps >= 1, "num_stages and num_warps must be >= 1"


# configs bench/gpu/attention_kernels.py --sweep times beside the default (tests run each at small shapes);
# on sm_90 each compiles without spills and within the 227 KiB of shared memory a program may use
PREFILL_SWEEP = (PrefillConfig(num_stages=2), PrefillConfig(num_stages=4), PrefillConfig(block_n=128, num_stages=2),
                 PrefillConfig(block_n=128, num_stages=3), PrefillConfig(block_m=64, num_warps=4),
                 PrefillConfig(block_n=32, num_stages=4), PrefillConfig(block_m=256, block_n=32))


@triton.jit
def _table_tile(table_ptr, n0, kv_end, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block ids of key positions [n0, n0 + BLOCK_N) ([BLOCK_N] int32; 0 at and past kv_end)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    return tl.load(table_ptr + keys // BS, mask=keys < kv_end, other=0)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block, head_off, n0, pos, kv_end, qk_scale,
                 stride_kn, stride_kt,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile [n0, n0 + BLOCK_N) (its block ids ``block``) into the online softmax of
    q [BLOCK_M, DH] at positions pos [BLOCK_M]. CAUSAL: mask keys past each row's position and
    past kv_end (and with WINDOW > 0 keys at or before pos - WINDOW); otherwise every row sees
    every key of the tile."""
    keys = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    row = block.to(tl.int64) * stride_kn + (keys % BS).to(tl.int64) * stride_kt + head_off
    kv_off = row[:, None] + offs_d[None, :]                                  # [BLOCK_N, DH]
    if CAUSAL:
        live = keys < kv_end
        k = tl.load(k_cache_ptr + kv_off, mask=live[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=live[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale      # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        if WINDOW > 0:
            seen = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - WINDOW)
            s = tl.where(seen, s, float("-inf"))
        else:
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))      # finite without a window: key 0 was in every row's first tile
    if WINDOW > 0:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)   # no key of the row's window seen yet: p, alpha 0
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, block, start, end, q, k_cache_ptr, v_cache_ptr, table, head_off, pos, kv_end,
                  qk_scale, stride_kn, stride_kt, BS: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tiles [start, end) (``block``: the first one's block ids) → the online softmax state and the
    block ids of the tile at ``end``, each tile's ids loaded a tile ahead."""
    for n0 in range(start, end, BLOCK_N):
        next_block = _table_tile(table, n0 + BLOCK_N, kv_end, BS, BLOCK_N)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, block, head_off, n0, pos, kv_end,
                                     qk_scale, stride_kn, stride_kt, BS, BLOCK_N, DH, CAUSAL, WINDOW, DOT_PRECISION)
        block = next_block
    return acc, m_i, l_i, block


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, query_start_ptr, context_lens_ptr, out_ptr,
                    sinks_ptr, qk_scale, num_q_blocks,
                    stride_qt, stride_qh, stride_kn, stride_kt, stride_kh, stride_tb, stride_ot, stride_oh,
                    G: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BS: tl.constexpr, DH: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr,
                    WINDOW: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    q_block = num_q_blocks - 1 - tl.program_id(0)                           # most keys first
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    tok0 = q_block * TOKENS
    if tok0 >= q_len:
        return
    prefix = tl.load(context_lens_ptr + b) - q_len                          # cached before this step
    r = tl.arange(0, BLOCK_M)
    tok = tok0 + r // G
    heads = kv_head * G + r % G
    row_ok = (r < TOKENS * G) & (tok < q_len)
    pos = prefix + tl.where(row_ok, tok, tok0)                              # padding rows: a real position
    t_off = (q_start + tok).to(tl.int64)[:, None]
    h_off = heads.to(tl.int64)[:, None]
    offs_d = tl.arange(0, DH)[None, :]
    q = tl.load(q_ptr + t_off * stride_qt + h_off * stride_qh + offs_d, mask=row_ok[:, None], other=0.0)

    table = table_ptr + b.to(tl.int64) * stride_tb
    head_off = kv_head.to(tl.int64) * stride_kh
    kv_end = prefix + tl.minimum(tok0 + TOKENS, q_len)                      # past the last row's position
    unmasked_end = (prefix + tok0) // BLOCK_N * BLOCK_N                     # tiles before the first row's
    acc = tl.zeros([BLOCK_M, DH], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # each tile's block ids are loaded a tile ahead: the K/V loads then depend on no load of their own
    # iteration and the pipeliner keeps num_stages - 1 of them in flight
    if WINDOW > 0:
        # tiles from the first row's window start; masked until every row's window holds the whole tile
        first_tile = tl.maximum(prefix + tok0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        whole = tl.cdiv(tl.maximum(kv_end - WINDOW, 0), BLOCK_N) * BLOCK_N
        window_end = tl.minimum(tl.maximum(whole, first_tile), unmasked_end)
        block = _table_tile(table, first_tile, kv_end, BS, BLOCK_N)
        acc, m_i, l_i, block = _attend_range(acc, m_i, l_i, block, first_tile, window_end, q, k_cache_ptr, v_cache_ptr,
                                             table, head_off, pos, kv_end, qk_scale, stride_kn, stride_kt, BS,
                                             BLOCK_N, DH, True, WINDOW, DOT_PRECISION)
    else:
        window_end = 0
        block = _table_tile(table, 0, kv_end, BS, BLOCK_N)
    acc, m_i, l_i, block = _attend_range(acc, m_i, l_i, block, window_end, unmasked_end, q, k_cache_ptr, v_cache_ptr,
                                         table, head_off, pos, kv_end, qk_scale, stride_kn, stride_kt, BS, BLOCK_N,
                                         DH, False, WINDOW, DOT_PRECISION)
    acc, m_i, l_i, block = _attend_range(acc, m_i, l_i, block, unmasked_end, kv_end, q, k_cache_ptr, v_cache_ptr,
                                         table, head_off, pos, kv_end, qk_scale, stride_kn, stride_kt, BS, BLOCK_N,
                                         DH, True, WINDOW, DOT_PRECISION)
    if HAS_SINKS:
        acc, m_i, l_i = add_sink(acc, m_i, l_i, sinks_ptr, heads, row_ok)
    out = acc / l_i[:, None]
    tl.store(out_ptr + t_off * stride_ot + h_off * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def prefill_block_m(max_query_len: int, group: int, config: PrefillConfig) -> int:
    """Rows per program: config.block_m, or fewer (>= 16) when every run is short."""
    wanted = max(MIN_DOT_ROWS, triton.next_power_of_2(max_query_len * group))
    block_m = min(config.block_m, wanted)
    assert group <= block_m, f"G={group} query heads per KV head exceed block_m={block_m}"
    return block_m


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, max_query_len: int, scale: float,
                            out: torch.Tensor | None = None,
                            config: PrefillConfig = PrefillConfig(), sinks: torch.Tensor | None = None,
                            window: int | None = None) -> torch.Tensor:
    """q [T, H, Dh], caches [N, Bs, Hkv, Dh], block_tables [B, M] int32, query_start_loc [B + 1]
    int32 (cumulative n, [0] = 0), context_lens [B] int32 (this step's tokens included) →
    out [T, H, Dh] in q's dtype. ``max_query_len`` (host int, >= every n) sizes the grid.
    ``sinks`` [H] (float32 or q's dtype, natural-log units): each head's sink logit joins its softmax's
    denominator; ``window`` (host int W >= 1, None: none): a query at position p sees keys p - W < k <= p."""
    check_paged_cache(q, k_cache, v_cache)
    assert q.dim() == 3, f"q must be [T, H, Dh], got {tuple(q.shape)}"
    check_sinks_window(sinks, window, q)
    num_tokens, num_heads, head_dim = q.shape
    batch = context_lens.shape[0]
    assert context_lens.dim() == 1 and context_lens.dtype == torch.int32, "context_lens must be [B] int32"
    assert query_start_loc.shape == (batch + 1,) and query_start_loc.dtype == torch.int32, \
        f"query_start_loc must be [B + 1 = {batch + 1}] int32, got {tuple(query_start_loc.shape)}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32, \
        f"block_tables must be [B={batch}, M] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert batch <= MAX_GRID_Y, f"B={batch} sequences exceed the grid's {MAX_GRID_Y}"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = prefill_block_m(max_query_len, group, config)
    tokens = block_m // group
    num_q_blocks = triton.cdiv(max_query_len, tokens)
    _prefill_kernel[(num_q_blocks, batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out, sinks, scale * LOG2E, num_q_blocks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=group, TOKENS=tokens, BLOCK_M=block_m, BLOCK_N=config.block_n, BS=k_cache.shape[1], DH=head_dim,
        DOT_PRECISION=dot_precision(q.dtype), HAS_SINKS=sinks is not None, WINDOW=window or 0,
        num_warps=config.num_warps if block_m >= 128 else 4,
        num_stages=config.num_stages, **launch_options(pdl_enabled(q.device)))
    return out


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                      context_lens: torch.Tensor, scale: float,
                                      compute_dtype: torch.dtype = torch.float64, sinks: torch.Tensor | None = None,
                                      window: int | None = None) -> torch.Tensor:
    """Same contract, sequence by sequence in ``compute_dtype`` (returned in it); host syncs."""
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    starts = query_start_loc.tolist()
    for b, context in enumerate(context_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        keys, values = gather_context(k_cache, v_cache, block_tables[b], context)
        positions = torch.arange(context - (end - start), context, device=q.device)
        out[start:end] = attend_reference(q[start:end].to(compute_dtype), keys.to(compute_dtype),
                                          values.to(compute_dtype), positions, scale, sinks, window)
    return out
