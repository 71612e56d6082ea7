"""Multi-head latent attention (MLA) in the absorbed form over the paged latent cache: decode and prefill.

Legend: B sequences, T new tokens in the step (B sequences' runs concatenated), H heads,
C kv_lora_rank (a power of 2, >= 16: 512 in DeepSeek-V2/V3), Dr qk_rope_head_dim (any even width:
64), W = C + Dr, N cache blocks, Bs tokens per block, M block-table width, S the most splits of a
sequence's context, n a sequence's new tokens, L its context (new tokens included).

Cache layout (attention_worker/mla_kv_cache.py): ``cache: [N, Bs, W]``, one row per token and
layer: the normed latent (C values) then the rotated shared key (Dr values); token i of sequence b
lives in block ``block_tables[b, i // Bs]`` at offset ``i % Bs``. Table entries past ``cdiv(L, Bs)``
are never read.

Absorbed form: the key half of ``kv_b_proj`` is folded into the query, so every head's query is
``q [.., H, W] = (q_nope · W_UK) ++ q_rope`` and its key and value are the cached row itself:
``score = q[:C] · row[:C] + q[C:] · row[C:]`` (two dots, C and Dr apart: W is not a power of 2),
``out [.., H, C] = softmax(scores) · rows[:, :C]``; the caller applies the value half of
``kv_b_proj`` to ``out``. Every head reads the same row, so a program takes a block of heads (rows
of the dot) and streams each latent tile once for all of them. Online softmax in float32 with exp2
(log2(e) folded into the scale); the block-table entries of the next key tile are loaded a tile
ahead, as in kernels/paged_attention.py.

- ``mla_decode_attention`` (one new token per sequence): grid (B, cdiv(H, BLOCK_H), S). Split-KV
  as ``paged_decode_attention`` does it: row b uses ``S_b = clamp(cdiv(L_b, tokens_per_split), 1,
  S)`` splits, computed on the device; a row of one split is written straight to ``out``, the
  others through a float32 ``DecodeWorkspace`` and paged_attention's merge kernel. A row with
  L = 0 (CUDA-graph padding) gets zeros.
- ``mla_prefill_attention`` (prefill and mixed steps, causal, variable query lengths): grid
  (cdiv(max n, TOKENS), B, cdiv(H, HEADS)); a program packs TOKENS query tokens × HEADS heads into
  BLOCK_M rows (row r: token r // HEADS, head r % HEADS). New token i of sequence b sits at position
  ``L - n + i`` and sees cache positions ``0 ..= L - n + i`` (the new rows are already stored).
The step's latents and rotated keys go into the cache first (``kernels/mla_store.py``).

No host syncs: lengths and tables are device tensors, shapes and S are host ints, so each launch
can be captured in a CUDA graph; on Hopper the kernels launch with PDL (kernels/pdl.py). Each
kernel has its float64 torch reference below it. Tiles: ``MlaDecodeConfig``, ``MlaPrefillConfig``
(not yet timed on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.paged_attention import (LOG2E, MERGE_TILE, MIN_DOT_ROWS, DecodeConfig, DecodeWorkspace,
                                             _merge_splits_kernel, _row_splits, check_decode_batch, decode_num_splits,
                                             decode_tokens_per_split, dot_precision, merge_heads, num_sms_of)
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

MAX_GRID_Y = 65535


@dataclass(frozen=True)
class MlaDecodeConfig:
    """Tiles of the decode kernel; the split policy is paged_attention's (``DecodeConfig``), with a
    head block in place of a KV head. At DeepSeek-V3's C = 512: acc [16, 512] float32 is 64
    registers a thread at 4 warps; a [32, 576] bf16 key tile is 36 KiB of shared memory a stage."""

    block_h: int = 16               # heads per program (the rows of the dots)
    block_n: int = 32               # keys per tile
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_h", "block_n"):
            value = getattr(self, name)
            assert value >= 16 and value & (value - 1) == 0, f"{name}={value} must be a power of 2, >= 16"
        assert self.num_stages >= 1 and self.num_warps >= 1, "num_stages and num_warps must be >= 1"

    @property
    def split_policy(self) -> DecodeConfig:
        return DecodeConfig(block_n=self.block_n)


@dataclass(frozen=True)
class MlaPrefillConfig:
    """Tiles of the prefill kernel. acc [BLOCK_M, C] float32 lives in registers: at C = 512 and
    block_m 32, 64 registers a thread at 8 warps."""

    block_m: int = 32               # query rows (tokens × heads) per program, at most
    block_n: int = 32               # keys per tile
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            assert value >= 16 and value & (value - 1) == 0, f"{name}={value} must be a power of 2, >= 16"
        assert self.num_stages >= 1 and self.num_warps >= 1, "num_stages and num_warps must be >= 1"


# ---- shared tile code ---------------------------------------------------------------------------

@triton.jit
def _table_tile(table_ptr, n0, kv_end, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block ids of key positions [n0, n0 + BLOCK_N) ([BLOCK_N] int32; 0 at and past kv_end)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    return tl.load(table_ptr + keys // BS, mask=keys < kv_end, other=0)


@triton.jit
def _load_query(q_ptr, tok, heads, row_ok, stride_qt, stride_qh, C: tl.constexpr, DR: tl.constexpr,
                DR_P: tl.constexpr):
    """Rows (tok, heads) of q [.., H, C + Dr] → (latent part [R, C], rotary part [R, DR_P]), 0 off row_ok."""
    row = q_ptr + tok.to(tl.int64)[:, None] * stride_qt + heads.to(tl.int64)[:, None] * stride_qh
    offs_r = tl.arange(0, DR_P)[None, :]
    q_c = tl.load(row + tl.arange(0, C)[None, :], mask=row_ok[:, None], other=0.0)
    q_r = tl.load(row + C + offs_r, mask=row_ok[:, None] & (offs_r < DR), other=0.0)
    return q_c, q_r


@triton.jit
def _attend_latent_tile(acc, m_i, l_i, q_c, q_r, cache_ptr, block, n0, kv_end, last_pos, qk_scale,
                        stride_cn, stride_ct,
                        BS: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr, DR: tl.constexpr,
                        DR_P: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tile [n0, n0 + BLOCK_N) (its block ids ``block``) into the online softmax of the rows
    (q_c [R, C], q_r [R, DR_P]). MASKED: keys at or past kv_end are not loaded and row i sees keys
    <= last_pos[i]; otherwise every key of the tile is visible to every row."""
    keys = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, DR_P)
    row = block.to(tl.int64) * stride_cn + (keys % BS).to(tl.int64) * stride_ct        # [BLOCK_N]
    latent_off = row[:, None] + tl.arange(0, C)[None, :]                                 # [BLOCK_N, C]
    rope_off = row[:, None] + C + offs_r[None, :]                                        # [BLOCK_N, DR_P]
    if MASKED:
        live = keys < kv_end
        kv = tl.load(cache_ptr + latent_off, mask=live[:, None], other=0.0)
        k_r = tl.load(cache_ptr + rope_off, mask=live[:, None] & (offs_r < DR)[None, :], other=0.0)
    else:
        kv = tl.load(cache_ptr + latent_off)
        k_r = tl.load(cache_ptr + rope_off, mask=(offs_r < DR)[None, :], other=0.0)
    s = tl.dot(q_c, tl.trans(kv), input_precision=DOT_PRECISION)
    s = (s + tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)) * qk_scale     # [R, BLOCK_N]
    if MASKED:
        s = tl.where((keys[None, :] <= last_pos[:, None]) & live[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))          # finite: every row sees a key of its first tile
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_latents(q_c, q_r, cache_ptr, table_ptr, start, unmasked_end, kv_end, last_pos, qk_scale,
                    stride_cn, stride_ct,
                    ROWS: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr,
                    DR: tl.constexpr, DR_P: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of ROWS query rows over key positions [start, kv_end) of one sequence (start a
    multiple of BLOCK_N): tiles before ``unmasked_end`` (a multiple of BLOCK_N) unmasked, the rest
    masked by kv_end and each row's ``last_pos``. Returns (acc [ROWS, C] unnormalised, m [ROWS], l
    [ROWS]), float32, scores in log2 units; with start >= kv_end: acc 0, m -inf, l 0."""
    acc = tl.zeros([ROWS, C], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    # each tile's block ids a tile ahead: the latent loads then depend on no load of their own iteration
    block = _table_tile(table_ptr, start, kv_end, BS, BLOCK_N)
    for n0 in range(start, unmasked_end, BLOCK_N):
        next_block = _table_tile(table_ptr, n0 + BLOCK_N, kv_end, BS, BLOCK_N)
        acc, m_i, l_i = _attend_latent_tile(acc, m_i, l_i, q_c, q_r, cache_ptr, block, n0, kv_end, last_pos,
                                            qk_scale, stride_cn, stride_ct, BS, BLOCK_N, C, DR, DR_P, False,
                                            DOT_PRECISION)
        block = next_block
    for n0 in range(unmasked_end, kv_end, BLOCK_N):
        next_block = _table_tile(table_ptr, n0 + BLOCK_N, kv_end, BS, BLOCK_N)
        acc, m_i, l_i = _attend_latent_tile(acc, m_i, l_i, q_c, q_r, cache_ptr, block, n0, kv_end, last_pos,
                                            qk_scale, stride_cn, stride_ct, BS, BLOCK_N, C, DR, DR_P, True,
                                            DOT_PRECISION)
        block = next_block
    return acc, m_i, l_i


@triton.jit
def _store_rows(out_ptr, tok, heads, row_ok, acc, l_i, stride_ot, stride_oh, C: tl.constexpr):
    """out[tok, heads] = acc / l (0 where l = 0: nothing to attend to)."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    ptrs = out_ptr + tok.to(tl.int64)[:, None] * stride_ot + heads.to(tl.int64)[:, None] * stride_oh \
        + tl.arange(0, C)[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---- decode -------------------------------------------------------------------------------------

@triton.jit
def _mla_decode_kernel(q_ptr, cache_ptr, table_ptr, context_lens_ptr, out_ptr, part_ptr, lse_ptr,
                       qk_scale, tokens_per_split, num_splits, H,
                       stride_qb, stride_qh, stride_cn, stride_ct, stride_tb, stride_ob, stride_oh,
                       BLOCK_H: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr,
                       DR: tl.constexpr, DR_P: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, cdiv(H, BLOCK_H), S): split s of row b's S_b; S_b = 1 → out [B, H, C] directly;
    otherwise its normalised output → part [B, H, S, C], log2-sum-exp → lse [B, H, S]."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    head_ok = heads < H
    context = tl.load(context_lens_ptr + b)
    row_splits = _row_splits(context, tokens_per_split, num_splits)
    if split >= row_splits:
        return
    tiles = tl.cdiv(context, BLOCK_N)
    start = split * tiles // row_splits * BLOCK_N
    end = tl.minimum((split + 1) * tiles // row_splits * BLOCK_N, context)
    tok = tl.zeros([BLOCK_H], dtype=tl.int64) + b
    q_c, q_r = _load_query(q_ptr, tok, heads, head_ok, stride_qb, stride_qh, C, DR, DR_P)
    last_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + end - 1
    acc, m_i, l_i = _attend_latents(q_c, q_r, cache_ptr, table_ptr + b * stride_tb, start,
                                    tl.maximum(end // BLOCK_N * BLOCK_N, start), end, last_pos, qk_scale,
                                    stride_cn, stride_ct, BLOCK_H, BS, BLOCK_N, C, DR, DR_P, DOT_PRECISION)
    if row_splits == 1:
        _store_rows(out_ptr, tok, heads, head_ok, acc, l_i, stride_ob, stride_oh, C)
    else:
        empty = l_i == 0.0                              # only with tokens_per_split < BLOCK_N
        l_safe = tl.where(empty, 1.0, l_i)
        part = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        row = (b * H + heads.to(tl.int64)) * num_splits + split             # [BLOCK_H] index into [B, H, S]
        tl.store(part_ptr + row[:, None] * C + tl.arange(0, C)[None, :], part, mask=head_ok[:, None])
        tl.store(lse_ptr + row, lse, mask=head_ok)


def check_latent_cache(q: torch.Tensor, cache: torch.Tensor, out_width: int) -> tuple[int, int]:
    """(C, Dr) of q [.., H, C + Dr] against cache [N, Bs, C + Dr]; C = ``out_width``."""
    assert cache.dim() == 3, f"cache must be [N, Bs, C + Dr], got {tuple(cache.shape)}"
    assert q.dtype == cache.dtype, f"q and cache dtypes differ: {q.dtype}, {cache.dtype}"
    width = cache.shape[2]
    assert q.shape[-1] == width, f"q is {q.shape[-1]} wide, cache rows {width}"
    latent = out_width
    assert latent >= 16 and latent & (latent - 1) == 0, f"C={latent} must be a power of 2, >= 16"
    assert 0 < width - latent, f"the cache rows ({width}) must be wider than C={latent}"
    assert q.stride(-1) == 1 and cache.stride(-1) == 1, "the last dim of q and cache must be contiguous"
    return latent, width - latent


def mla_decode_num_splits(batch: int, num_heads: int, max_context: int, num_sms: int,
                          config: MlaDecodeConfig = MlaDecodeConfig()) -> int:
    """The S to capture a CUDA graph with for contexts up to ``max_context`` (``decode_num_splits``
    with a block of ``config.block_h`` heads in place of a KV head)."""
    return decode_num_splits(batch, triton.cdiv(num_heads, config.block_h), max_context, num_sms,
                             config.split_policy)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, scale: float, num_splits: int, latent_dim: int,
                         out: torch.Tensor | None = None, workspace: DecodeWorkspace | None = None,
                         config: MlaDecodeConfig = MlaDecodeConfig(),
                         tokens_per_split: int | None = None) -> torch.Tensor:
    """q [B, H, C + Dr], cache [N, Bs, C + Dr], block_tables [B, M] int32, context_lens [B] int32
    (tokens in the cache, the current one included), C = ``latent_dim`` → out [B, H, C] in q's dtype.

    ``num_splits`` (S, a host int, static per captured graph): the most splits of any row;
    ``tokens_per_split`` (None: ``decode_tokens_per_split`` for this batch), ``workspace`` (S > 1;
    allocated here when not given: pass one to keep addresses static) as in
    ``paged_decode_attention``."""
    latent_dim, rope_dim = check_latent_cache(q, cache, latent_dim)
    assert q.dim() == 3, f"q must be [B, H, C + Dr], got {tuple(q.shape)}"
    batch, num_heads, _ = q.shape
    check_decode_batch(block_tables, context_lens, batch, num_splits)
    if out is None:
        out = q.new_empty(batch, num_heads, latent_dim)
    assert out.shape == (batch, num_heads, latent_dim) and out.dtype == q.dtype and out.stride(-1) == 1, \
        f"out must be [B, H, C={latent_dim}] in q's dtype"
    if batch == 0:
        return out
    head_blocks = triton.cdiv(num_heads, config.block_h)
    num_sms = num_sms_of(q.device)
    if tokens_per_split is None:
        tokens_per_split = decode_tokens_per_split(batch, head_blocks, num_sms, config.split_policy)
    assert tokens_per_split >= 1, f"tokens_per_split must be >= 1, got {tokens_per_split}"
    if num_splits > 1 and workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, num_splits, latent_dim, q.device)
    if num_splits > 1:
        part, lse = workspace.partial_out, workspace.lse
        assert part.shape[0] >= batch and part.shape[1:] == (num_heads, num_splits, latent_dim) \
            and lse.shape == part.shape[:3] and part.is_contiguous() and lse.is_contiguous() \
            and part.dtype == lse.dtype == torch.float32, \
            f"workspace must be float32 [>={batch}, {num_heads}, {num_splits}, {latent_dim}] and [..., {num_splits}]"
    else:
        part = lse = out                                # never written with S = 1
    pdl = launch_options(pdl_enabled(q.device))
    _mla_decode_kernel[(batch, head_blocks, num_splits)](
        q, cache, block_tables, context_lens, out, part, lse, scale * LOG2E, tokens_per_split, num_splits,
        num_heads, q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_H=config.block_h, BS=cache.shape[1], BLOCK_N=config.block_n, C=latent_dim, DR=rope_dim,
        DR_P=max(MIN_DOT_ROWS, triton.next_power_of_2(rope_dim)), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
    if num_splits > 1:
        heads = merge_heads(batch, num_heads, num_splits, latent_dim, num_sms)
        _merge_splits_kernel[(batch, triton.cdiv(num_heads, heads))](
            part, lse, out, context_lens, tokens_per_split, num_splits, num_heads, out.stride(0), out.stride(1),
            HEADS=heads, S_P=triton.next_power_of_2(num_splits), CHUNK=max(1, MERGE_TILE // (heads * latent_dim)),
            DH=latent_dim, WINDOW=0, num_warps=4, **pdl)
    return out


def gather_latents(cache: torch.Tensor, table: torch.Tensor, context: int) -> torch.Tensor:
    """One sequence's cached rows [L, C + Dr] (reads only its first cdiv(L, Bs) blocks)."""
    blocks = table[: -(-context // cache.shape[1])].long()
    return cache[blocks].reshape(-1, cache.shape[2])[:context]


def attend_latents_reference(q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, latent_dim: int,
                             scale: float) -> torch.Tensor:
    """q [n, H, C + Dr] at ``positions`` [n], rows [L, C + Dr]: query i sees rows 0..=positions[i] → [n, H, C]."""
    scores = torch.einsum("nhw,lw->hnl", q, rows) * scale                   # [H, n, L]
    causal = torch.arange(rows.shape[0], device=q.device)[None, :] <= positions[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hnl,lc->nhc", probs, rows[:, :latent_dim])


def mla_decode_attention_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                   context_lens: torch.Tensor, scale: float, latent_dim: int,
                                   compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Same contract, sequence by sequence in ``compute_dtype`` (returned in it); host syncs."""
    out = torch.zeros(*q.shape[:2], latent_dim, dtype=compute_dtype, device=q.device)
    for b, context in enumerate(context_lens.tolist()):
        if context == 0:
            continue
        rows = gather_latents(cache, block_tables[b], context).to(compute_dtype)
        positions = torch.tensor([context - 1], device=q.device)
        out[b] = attend_latents_reference(q[b:b + 1].to(compute_dtype), rows, positions, latent_dim, scale)[0]
    return out


# ---- prefill ------------------------------------------------------------------------------------

@triton.jit
def _mla_prefill_kernel(q_ptr, cache_ptr, table_ptr, query_start_ptr, context_lens_ptr, out_ptr,
                        qk_scale, num_q_blocks, H,
                        stride_qt, stride_qh, stride_cn, stride_ct, stride_tb, stride_ot, stride_oh,
                        HEADS: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BS: tl.constexpr, C: tl.constexpr, DR: tl.constexpr, DR_P: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    q_block = num_q_blocks - 1 - tl.program_id(0)                           # most keys first
    b = tl.program_id(1)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    tok0 = q_block * TOKENS
    if tok0 >= q_len:
        return
    prefix = tl.load(context_lens_ptr + b) - q_len                          # cached before this step
    r = tl.arange(0, BLOCK_M)
    tok = tok0 + r // HEADS
    heads = tl.program_id(2) * HEADS + r % HEADS
    row_ok = (tok < q_len) & (heads < H)
    pos = prefix + tl.where(row_ok, tok, tok0)                              # padding rows: a real position
    q_c, q_r = _load_query(q_ptr, q_start + tok, heads, row_ok, stride_qt, stride_qh, C, DR, DR_P)
    kv_end = prefix + tl.minimum(tok0 + TOKENS, q_len)                      # past the last row's position
    unmasked_end = (prefix + tok0) // BLOCK_N * BLOCK_N                     # tiles before the first row's
    acc, m_i, l_i = _attend_latents(q_c, q_r, cache_ptr, table_ptr + b.to(tl.int64) * stride_tb, 0, unmasked_end,
                                    kv_end, pos, qk_scale, stride_cn, stride_ct, BLOCK_M, BS, BLOCK_N, C, DR, DR_P,
                                    DOT_PRECISION)
    _store_rows(out_ptr, q_start + tok, heads, row_ok, acc, l_i, stride_ot, stride_oh, C)


def prefill_rows(max_query_len: int, num_heads: int, config: MlaPrefillConfig) -> tuple[int, int]:
    """(BLOCK_M, HEADS): a program's rows (config.block_m, or fewer when every run is short) and the
    heads among them (all H when they fit, else a power-of-2 block)."""
    heads = min(triton.next_power_of_2(num_heads), config.block_m)
    block_m = min(config.block_m, max(MIN_DOT_ROWS, triton.next_power_of_2(max_query_len) * heads))
    return block_m, heads


def mla_prefill_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                          query_start_loc: torch.Tensor, context_lens: torch.Tensor, max_query_len: int,
                          scale: float, latent_dim: int, out: torch.Tensor | None = None,
                          config: MlaPrefillConfig = MlaPrefillConfig()) -> torch.Tensor:
    """q [T, H, C + Dr], cache [N, Bs, C + Dr], block_tables [B, M] int32, query_start_loc [B + 1]
    int32 (cumulative n, [0] = 0), context_lens [B] int32 (this step's tokens included), C =
    ``latent_dim`` → out [T, H, C] in q's dtype. ``max_query_len`` (host int, >= every n) sizes the grid."""
    latent_dim, rope_dim = check_latent_cache(q, cache, latent_dim)
    assert q.dim() == 3, f"q must be [T, H, C + Dr], got {tuple(q.shape)}"
    num_tokens, num_heads, _ = q.shape
    batch = context_lens.shape[0]
    assert context_lens.dim() == 1 and context_lens.dtype == torch.int32, "context_lens must be [B] int32"
    assert query_start_loc.shape == (batch + 1,) and query_start_loc.dtype == torch.int32, \
        f"query_start_loc must be [B + 1 = {batch + 1}] int32, got {tuple(query_start_loc.shape)}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32, \
        f"block_tables must be [B={batch}, M] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert batch <= MAX_GRID_Y, f"B={batch} sequences exceed the grid's {MAX_GRID_Y}"
    if out is None:
        out = q.new_empty(num_tokens, num_heads, latent_dim)
    assert out.shape == (num_tokens, num_heads, latent_dim) and out.dtype == q.dtype and out.stride(-1) == 1, \
        f"out must be [T, H, C={latent_dim}] in q's dtype"
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    block_m, heads = prefill_rows(max_query_len, num_heads, config)
    tokens = block_m // heads
    num_q_blocks = triton.cdiv(max_query_len, tokens)
    _mla_prefill_kernel[(num_q_blocks, batch, triton.cdiv(num_heads, heads))](
        q, cache, block_tables, query_start_loc, context_lens, out, scale * LOG2E, num_q_blocks, num_heads,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEADS=heads, TOKENS=tokens, BLOCK_M=block_m, BLOCK_N=config.block_n, BS=cache.shape[1], C=latent_dim,
        DR=rope_dim, DR_P=max(MIN_DOT_ROWS, triton.next_power_of_2(rope_dim)), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps if block_m >= 32 else 4, num_stages=config.num_stages,
        **launch_options(pdl_enabled(q.device)))
    return out


def mla_prefill_attention_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                    query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                    latent_dim: int, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Same contract, sequence by sequence in ``compute_dtype`` (returned in it); host syncs."""
    out = torch.zeros(*q.shape[:2], latent_dim, dtype=compute_dtype, device=q.device)
    starts = query_start_loc.tolist()
    for b, context in enumerate(context_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        rows = gather_latents(cache, block_tables[b], context).to(compute_dtype)
        positions = torch.arange(context - (end - start), context, device=q.device)
        out[start:end] = attend_latents_reference(q[start:end].to(compute_dtype), rows, positions, latent_dim, scale)
    return out
