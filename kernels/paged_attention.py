"""Batched decode attention over the paged KV cache, with split-KV adapted per row on the device.

Legend: B sequences (one query token each), H query heads, Hkv KV heads, G = H / Hkv query
heads per KV head, Dh head dim, N cache blocks, Bs tokens per block, M block-table width,
S the most splits of a sequence's context, C a sequence's context length.

Cache layout (attention_worker/kv_cache.py): ``k_cache, v_cache: [N, Bs, Hkv, Dh]``; token i of
sequence b lives in block ``block_tables[b, i // Bs]`` at offset ``i % Bs``. Table entries past
``cdiv(C, Bs)`` are never read. Query head h reads KV head ``h // G``.

``paged_decode_attention``: a program takes one KV head and all G query heads that read it
(padded to 16 rows for ``tl.dot``), so each K/V tile is loaded once per group. Online softmax
in float32 with exp2 (log2(e) folded into the scale). The block-table entries of the next key
tile are loaded a tile ahead, so the K/V loads do not wait on them and ``num_stages`` - 1 tiles
are in flight.

Split-KV: S is a host int (static per captured CUDA graph: the most any row may use, sized for
the longest context the graph serves). Row b uses ``S_b = clamp(cdiv(C_b, tokens_per_split), 1,
S)`` splits, computed on the device from ``context_lens``; split s of the row covers key tiles
``[s * T // S_b, (s + 1) * T // S_b)`` of its ``T = cdiv(C_b, BLOCK_N)`` tiles. Grid (B, Hkv, S):
programs with s >= S_b exit at once; a row with S_b = 1 is written straight to the output by its
split 0 (no workspace round trip); a row with S_b > 1 has each split write its normalised partial
output and log2-sum-exp to a float32 ``DecodeWorkspace``, and the splits are merged in one of two
ways (``DecodeConfig.merge``):
- ``fused`` (default): each split of (b, kv head) counts itself in at a per-(b, kv head) counter
  (an atomic with acquire-release ordering, after a barrier so that every thread's stores are
  released); the split that arrives last merges the row's S_b partials of its G heads and resets
  the counter, so graph replays need no memset. One launch per decode attention.
- ``kernel``: a merge kernel (grid (B, H / heads per program)) combines them afterwards, skipping
  rows with S_b = 1 (it computes S_b the same way). Spreads a long row's merge over more SMs.
So one graph captured with a generous S runs short contexts nearly as fast as S = 1. With S = 1
one kernel (grid (B, Hkv)), no merge. A row with C = 0 (graph padding) gets zeros. No host sync;
on Hopper the kernels launch with PDL (kernels/pdl.py).

Sinks and windows (GPT-OSS, windowed Mixtral), compile-time switches (``HAS_SINKS``, ``WINDOW``
constexpr, 0 = none) so that the default path compiles to the same code as without them:
``sinks`` [H] holds one logit per head (natural log) that joins the softmax's denominator only,
counted once per row (after the keys with S = 1, by split 0 with S > 1: its lse includes it, so
either merge adds it once); ``window`` W: the query at position C - 1 sees keys C - W ..= C - 1, so
the key loop starts at max(0, C - W) (not tile-aligned; no mask needed) and a row's splits divide
min(C, W) keys.

``tokens_per_split`` (``decode_tokens_per_split``) grows with B·Hkv: small batches split short
contexts to use the SMs, large ones keep rows whole (measured on H200, see
``DecodeConfig``); ``decode_num_splits`` gives the S to capture for a longest context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.counters import zeroed_counters
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16               # tl.dot needs at least 16 rows
MERGE_TILE = 4096               # float32 values per merge program tile (32 registers a thread at 4 warps)
MERGES = ("fused", "kernel")


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and the split policy.

    The policy comes from H200 timings at Qwen3-30B-A3B's shape (H=32, Hkv=4, Dh=128, bf16, 132
    SMs; bench/gpu/attention_kernels.py) of the earlier kernel (each K/V tile loaded only after
    the previous tile's MMAs; 39 KiB of shared memory, 5 programs per SM), µs per call with every
    row split S ways: B=1 C=256: S=1 9.3, S=4 5.6; B=1 C=2048: S=16 8.5, S=32 8.9; B=32 C=256:
    S=1 12.0, S=2 14.6; B=32 C=2048: S=1 71, S=4 49, S=8 52; B=128 C=2048: S=1 133, S=2 155;
    B=1 C=32768: S=64 35, S=132 33. I.e. splitting pays while the B·Hkv·S programs fit on the SMs at once and
    each keeps >= 64 keys; at B=32 the best split holds ~512 keys: ``sm_split_tokens``.
    ``max_programs_per_sm`` is the default tiles' occupancy (72 KiB of shared memory at
    num_stages 3: 3 programs per SM), so that the splits of long rows run in one wave.
    ``DECODE_SWEEP`` lists what --sweep tries beside these."""

    block_n: int = 64               # keys per tile
    num_warps: int = 4
    num_stages: int = 3             # K/V tiles in flight + 1 (the table entries are loaded a tile ahead)
    min_split_tokens: int = 64      # a split holds at least this many keys (rounded up to block_n)
    sm_split_tokens: int = 512      # tokens_per_split >= B·Hkv·this / SMs
    max_programs_per_sm: int = 3    # S <= this·SMs / (B·Hkv)
    merge_heads: int = 0            # heads per merge program (a power of 2); 0: by batch size
    merge: str = "fused"            # how splits are merged: "fused" (the last split) or "kernel" (MERGES)

    def __post_init__(self) -> None:
        assert self.merge in MERGES, f"merge={self.merge!r} must be one of {MERGES}"
        assert self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0, \
            f"block_n={self.block_n} must be a power of 2, >= 16"
        assert self.num_stages >= 1 and self.num_warps >= 1, "num_stages and num_warps must be >= 1"
        assert self.min_split_tokens >= 1 and self.sm_split_tokens >= 0 and self.max_programs_per_sm >= 1, \
            "min_split_tokens, max_programs_per_sm must be >= 1, sm_split_tokens >= 0"
        assert self.merge_heads >= 0 and self.merge_heads & (self.merge_heads - 1) == 0, \
            f"merge_heads={self.merge_heads} must be 0 or a power of 2"


# configs bench/gpu/attention_kernels.py --sweep times beside the default (tests run each at small shapes):
# pipeline depth and tiles (sm_90: num_stages 2: 39 KiB of shared memory, 5 programs per SM, no load
# ahead; 4: 104 KiB, 2 per SM; block_n 32 at 4 stages: 54 KiB, 4 per SM), then the split policy
DECODE_SWEEP = (DecodeConfig(num_stages=2, max_programs_per_sm=5), DecodeConfig(num_stages=4, max_programs_per_sm=2),
                DecodeConfig(block_n=32, num_stages=4, max_programs_per_sm=4), DecodeConfig(num_warps=8),
                DecodeConfig(min_split_tokens=128), DecodeConfig(sm_split_tokens=256),
                DecodeConfig(sm_split_tokens=1024), DecodeConfig(max_programs_per_sm=4), DecodeConfig(merge="kernel"))


@dataclass
class DecodeWorkspace:
    """Float32 scratch for S > 1, allocated once and reused (static across graph replays).

    Rows past the batch are untouched, and so are rows whose S_b is 1, so one workspace sized
    for the largest batch serves every smaller one with the same (H, S, Dh)."""

    partial_out: torch.Tensor   # [B, H, S, Dh] each split's normalised output
    lse: torch.Tensor           # [B, H, S] each split's log2-sum-exp of the scaled scores

    @classmethod
    def allocate(cls, batch: int, num_heads: int, num_splits: int, head_dim: int,
                 device: torch.device | str) -> DecodeWorkspace:
        return cls(torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
                   torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device))


def decode_tokens_per_split(batch: int, num_kv_heads: int, num_sms: int, config: DecodeConfig = DecodeConfig()) -> int:
    """Keys per split for a batch of B rows: max(min_split_tokens, B·Hkv·sm_split_tokens / SMs),
    rounded up to block_n. With every row at context C that makes ~C / sm_split_tokens programs
    per SM (H200, Hkv=4: 64 at B=1, 128 at B=8, 512 at B=32, 2048 at B=128)."""
    assert batch > 0 and num_kv_heads > 0 and num_sms > 0
    wanted = max(config.min_split_tokens, triton.cdiv(batch * num_kv_heads * config.sm_split_tokens, num_sms))
    return triton.cdiv(wanted, config.block_n) * config.block_n


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                      config: DecodeConfig = DecodeConfig()) -> int:
    """The S to pass to ``paged_decode_attention`` (and to capture a CUDA graph with) for contexts
    up to ``max_context``: enough splits for the longest row at ``decode_tokens_per_split``, at
    most ``max_programs_per_sm`` programs per SM. Rows with shorter contexts use fewer splits on
    the device, so a generous S costs little (H200, Hkv=4, max_context 4112: S=65 at B=1, 12 at
    B=8, 3 at B=25..33, 2 at B=34..49, 1 from B=50)."""
    assert max_context >= 0
    per_split = decode_tokens_per_split(batch, num_kv_heads, num_sms, config)
    most = max(1, config.max_programs_per_sm * num_sms // (batch * num_kv_heads))
    return max(1, min(triton.cdiv(max_context, per_split), most))


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    """Per-(sequence, KV head) arrival counters of the fused merge, zero between launches (the last
    split resets its own). Created by the first (eager) call, before any graph capture."""
    return zeroed_counters("paged_decode_merge", device, max(rows, 4096))


@functools.lru_cache(maxsize=16)
def _cuda_num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms_of(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the interpreter: nothing to fill)."""
    if device.type != "cuda":
        return 1
    return _cuda_num_sms(device.index if device.index is not None else torch.cuda.current_device())


def merge_heads(batch: int, num_heads: int, num_splits: int, head_dim: int, num_sms: int) -> int:
    """Heads per merge program: 1 while B·H programs are few (spread a long row's merge), more
    for large batches (most rows exit at once there; fewer, fuller programs), ~2 per SM."""
    wanted = max(1, batch * num_heads // (2 * num_sms))
    heads = 1 << (wanted.bit_length() - 1)                              # power of 2 <= wanted
    return max(1, min(heads, triton.next_power_of_2(num_heads), MERGE_TILE // triton.next_power_of_2(num_splits),
                      MERGE_TILE // head_dim))


@triton.jit
def _row_splits(context, tokens_per_split, num_splits):
    """S_b: splits of a row with ``context`` keys, clamp(cdiv(C, tokens_per_split), 1, S)."""
    return tl.minimum(tl.maximum(tl.cdiv(context, tokens_per_split), 1), num_splits)


@triton.jit
def _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, end, qk_scale,
                 stride_kn, stride_kt, stride_kh,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr, G_P: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Online softmax of q [G_P, DH] over context positions [start, end) of one sequence (tiles
    from ``start``: a multiple of BLOCK_N but with a window, where it is the window's first key).

    Returns (acc [G_P, DH] unnormalised output, m [G_P] running max, l [G_P] running sum),
    float32, scores in log2 units. With start >= end: acc 0, m -inf, l 0."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    head_off = kv_head.to(tl.int64) * stride_kh
    acc = tl.zeros([G_P, DH], dtype=tl.float32)
    m_i = tl.full([G_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P], dtype=tl.float32)
    block = tl.load(table_ptr + (start + offs_n) // BS, mask=start + offs_n < end, other=0)  # [BLOCK_N]
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                                   # [BLOCK_N]
        live = pos < end
        ahead = pos + BLOCK_N
        next_block = tl.load(table_ptr + ahead // BS, mask=ahead < end, other=0)
        row = block.to(tl.int64) * stride_kn + (pos % BS).to(tl.int64) * stride_kt + head_off
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
        block = next_block
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
def _store_group_out(out_ptr, b, heads, acc, l_i, stride_ob, stride_oh, G: tl.constexpr, G_P: tl.constexpr,
                     DH: tl.constexpr):
    """out[b, heads] = acc / l (0 where l = 0: a row with C = 0)."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    ptrs = out_ptr + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + tl.arange(0, DH)[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(tl.arange(0, G_P) < G)[:, None])


@triton.jit
def add_sink(acc, m_i, l_i, sinks_ptr, heads, head_ok):
    """The online softmax (acc [R, DH], m [R], l [R], log2 units) of rows reading query heads ``heads`` [R]
    gains each head's sink logit (natural-log units, at ``sinks_ptr``) as one more term of the
    denominator (a key whose value is zero): rescaled to max(m, sink), l += 2^(sink - max)."""
    sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634   # LOG2E
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_new)                    # 0 where m is -inf (no key seen)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.exp2(sink - m_new)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr, out_ptr, sinks_ptr, qk_scale,
                   stride_qb, stride_qh, stride_kn, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                   G: tl.constexpr, G_P: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                   DH: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr, WINDOW: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """S = 1: grid (B, Hkv); the whole context (its last WINDOW keys), output written directly."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    q, heads = _load_group_q(q_ptr, b, kv_head, stride_qb, stride_qh, G, G_P, DH)
    context = tl.load(context_lens_ptr + b)
    first = 0
    if WINDOW > 0:
        first = tl.maximum(context - WINDOW, 0)
    acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr + b * stride_tb, kv_head, first, context,
                                 qk_scale, stride_kn, stride_kt, stride_kh, BS, BLOCK_N, DH, G_P, DOT_PRECISION)
    if HAS_SINKS:
        acc, m_i, l_i = add_sink(acc, m_i, l_i, sinks_ptr, heads, tl.arange(0, G_P) < G)
    _store_group_out(out_ptr, b, heads, acc, l_i, stride_ob, stride_oh, G, G_P, DH)


@triton.jit
def _merge_group(part_ptr, lse_ptr, out_ptr, b, kv_head, row_splits, num_splits, H, stride_ob, stride_oh,
                 G: tl.constexpr, G_2: tl.constexpr, CHUNK: tl.constexpr, DH: tl.constexpr):
    """out[b, heads of kv_head] = Σ_s 2^(lse_s - max) · part_s / Σ_s 2^(lse_s - max) over the row's
    S_b splits, CHUNK splits a step; volatile loads: other programs wrote them during this launch."""
    g = tl.arange(0, G_2)
    heads = kv_head * G + g
    head_ok = g < G
    base = (b * H + heads.to(tl.int64)) * num_splits                        # [G_2] row of split 0
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DH)
    m = tl.full([G_2], float("-inf"), dtype=tl.float32)
    for s0 in range(0, row_splits, CHUNK):
        live = head_ok[:, None] & (s0 + offs_c < row_splits)[None, :]      # [G_2, CHUNK]
        lse = tl.load(lse_ptr + base[:, None] + s0 + offs_c[None, :], mask=live, other=float("-inf"),
                      volatile=True)
        m = tl.maximum(m, tl.max(lse, axis=1))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([G_2], dtype=tl.float32)
    acc = tl.zeros([G_2, DH], dtype=tl.float32)
    for s0 in range(0, row_splits, CHUNK):
        live = head_ok[:, None] & (s0 + offs_c < row_splits)[None, :]
        idx = base[:, None] + s0 + offs_c[None, :]
        w = tl.exp2(tl.load(lse_ptr + idx, mask=live, other=float("-inf"), volatile=True) - m[:, None])
        part = tl.load(part_ptr + idx[:, :, None] * DH + offs_d[None, None, :], mask=live[:, :, None],
                       other=0.0, volatile=True)                           # [G_2, CHUNK, DH]
        acc += tl.sum(part * w[:, :, None], axis=1)
        total += tl.sum(w, axis=1)
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr, out_ptr, part_ptr, lse_ptr,
                         counter_ptr, sinks_ptr, qk_scale, tokens_per_split, num_splits, H,
                         stride_qb, stride_qh, stride_kn, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                         G: tl.constexpr, G_P: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                         DH: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED_MERGE: tl.constexpr,
                         G_2: tl.constexpr, CHUNK: tl.constexpr, HAS_SINKS: tl.constexpr, WINDOW: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """S > 1: grid (B, Hkv, S); split s of row b's S_b: S_b = 1 → out [B, H, Dh] directly;
    otherwise its normalised output → part [B, H, S, Dh], log2-sum-exp → lse [B, H, S], and with
    FUSED_MERGE the last of the row's splits to arrive (counter [B, Hkv]) merges them into out.
    WINDOW > 0: the splits divide the last min(C, WINDOW) keys; HAS_SINKS: split 0 counts the sinks
    (its lse includes them), so either merge adds them once."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q, heads = _load_group_q(q_ptr, b, kv_head, stride_qb, stride_qh, G, G_P, DH)
    context = tl.load(context_lens_ptr + b)
    if WINDOW > 0:
        first = tl.maximum(context - WINDOW, 0)
        row_splits = _row_splits(context - first, tokens_per_split, num_splits)
        if split >= row_splits:
            return
        tiles = tl.cdiv(context - first, BLOCK_N)
        start = first + split * tiles // row_splits * BLOCK_N
        end = tl.minimum(first + (split + 1) * tiles // row_splits * BLOCK_N, context)
    else:
        row_splits = _row_splits(context, tokens_per_split, num_splits)
        if split >= row_splits:
            return
        tiles = tl.cdiv(context, BLOCK_N)
        start = split * tiles // row_splits * BLOCK_N
        end = tl.minimum((split + 1) * tiles // row_splits * BLOCK_N, context)
    acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, table_ptr + b * stride_tb, kv_head, start, end,
                                 qk_scale, stride_kn, stride_kt, stride_kh, BS, BLOCK_N, DH, G_P, DOT_PRECISION)
    if HAS_SINKS:
        if split == 0:
            acc, m_i, l_i = add_sink(acc, m_i, l_i, sinks_ptr, heads, tl.arange(0, G_P) < G)
    if row_splits == 1:
        _store_group_out(out_ptr, b, heads, acc, l_i, stride_ob, stride_oh, G, G_P, DH)
    else:
        empty = l_i == 0.0                              # only with tokens_per_split < BLOCK_N
        l_safe = tl.where(empty, 1.0, l_i)
        part = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        row = (b * H + heads.to(tl.int64)) * num_splits + split             # [G_P] index into [B, H, S]
        head_ok = tl.arange(0, G_P) < G
        tl.store(part_ptr + row[:, None] * DH + tl.arange(0, DH)[None, :], part, mask=head_ok[:, None])
        tl.store(lse_ptr + row, lse, mask=head_ok)
        if FUSED_MERGE:
            counter = counter_ptr + b * tl.num_programs(1) + kv_head
            tl.debug_barrier()                          # every thread's stores precede the release
            if tl.atomic_add(counter, 1, sem="acq_rel") == row_splits - 1:
                _merge_group(part_ptr, lse_ptr, out_ptr, b, kv_head, row_splits, num_splits, H, stride_ob,
                             stride_oh, G, G_2, CHUNK, DH)
                tl.store(counter, 0)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, context_lens_ptr, tokens_per_split, num_splits, H,
                         stride_ob, stride_oh, HEADS: tl.constexpr, S_P: tl.constexpr, CHUNK: tl.constexpr,
                         DH: tl.constexpr, WINDOW: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, cdiv(H, HEADS)), rows with S_b > 1 only: out = Σ_s 2^(lse_s - max) · part_s /
    Σ_s 2^(lse_s - max) over the row's S_b splits, for HEADS heads at once (S_b of the row's last
    min(C, WINDOW) keys with WINDOW > 0)."""
    pdl_wait(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    if WINDOW > 0:
        row_splits = _row_splits(tl.minimum(tl.load(context_lens_ptr + b), WINDOW), tokens_per_split, num_splits)
    else:
        row_splits = _row_splits(tl.load(context_lens_ptr + b), tokens_per_split, num_splits)
    if row_splits == 1:
        return                                                              # written by the split kernel
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    head_ok = heads < H
    base = (b * H + heads.to(tl.int64)) * num_splits                        # [HEADS] row of split 0
    offs_s = tl.arange(0, S_P)
    lse = tl.load(lse_ptr + base[:, None] + offs_s[None, :],
                  mask=head_ok[:, None] & (offs_s < row_splits)[None, :], other=float("-inf"))  # [HEADS, S_P]
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m[:, None]), axis=1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DH)
    acc = tl.zeros([HEADS, DH], dtype=tl.float32)
    for s0 in range(0, row_splits, CHUNK):
        live = head_ok[:, None] & (s0 + offs_c < row_splits)[None, :]      # [HEADS, CHUNK]
        idx = base[:, None] + s0 + offs_c[None, :]
        w = tl.exp2(tl.load(lse_ptr + idx, mask=live, other=float("-inf")) - m[:, None])
        part = tl.load(part_ptr + idx[:, :, None] * DH + offs_d[None, None, :], mask=live[:, :, None],
                       other=0.0)                                           # [HEADS, CHUNK, DH]
        acc += tl.sum(part * w[:, :, None], axis=1)
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


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


def check_sinks_window(sinks: torch.Tensor | None, window: int | None, q: torch.Tensor) -> None:
    """sinks: None or [H] float32 (or q's dtype), contiguous, on q's device; window: None or an int >= 1."""
    if sinks is not None:
        num_heads = q.shape[-2]
        assert sinks.shape == (num_heads,), f"sinks must be [H={num_heads}], got {tuple(sinks.shape)}"
        assert sinks.dtype in (torch.float32, q.dtype), \
            f"sinks must be torch.float32 or q's dtype ({q.dtype}), got {sinks.dtype}"
        assert sinks.is_contiguous() and sinks.device == q.device, f"sinks must be contiguous on {q.device}"
    assert window is None or (isinstance(window, int) and window >= 1), \
        f"window must be None (the whole context) or an int >= 1, got {window!r}"


def check_decode_batch(block_tables: torch.Tensor, context_lens: torch.Tensor, batch: int, num_splits: int) -> None:
    """A decode call's batch: block_tables [B, M] int32 with contiguous rows, context_lens [B] int32, S >= 1."""
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.dtype == torch.int32, \
        f"block_tables must be [B={batch}, M] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert context_lens.shape == (batch,) and context_lens.dtype == torch.int32, \
        f"context_lens must be [B={batch}] int32, got {tuple(context_lens.shape)} {context_lens.dtype}"
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact products (no TF32); 16-bit inputs: the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int, out: torch.Tensor | None = None,
                           workspace: DecodeWorkspace | None = None,
                           config: DecodeConfig = DecodeConfig(),
                           tokens_per_split: int | None = None, sinks: torch.Tensor | None = None,
                           window: int | None = None) -> torch.Tensor:
    """q [B, H, Dh], caches [N, Bs, Hkv, Dh], block_tables [B, M] int32, context_lens [B] int32
    (tokens in the cache, the current one included) → out [B, H, Dh] in q's dtype.

    ``num_splits`` (S) is a host int (static per captured graph): the most splits of any row;
    row b uses clamp(cdiv(C_b, tokens_per_split), 1, S). ``tokens_per_split`` (host int, >= 1;
    None: ``decode_tokens_per_split`` for this batch on q's device; 1 splits every row S ways);
    ``workspace`` (S > 1) is allocated here when not given: pass a preallocated one to keep
    addresses static. ``sinks`` [H] (float32 or q's dtype, natural-log units): each head's sink
    logit joins its softmax's denominator (GPT-OSS). ``window`` (host int W >= 1, None: no window):
    the query at position C - 1 sees only keys C - W ..= C - 1; rows split over min(C, W) keys."""
    check_paged_cache(q, k_cache, v_cache)
    assert q.dim() == 3, f"q must be [B, H, Dh], got {tuple(q.shape)}"
    check_sinks_window(sinks, window, q)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check_decode_batch(block_tables, context_lens, batch, num_splits)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    group_p = max(MIN_DOT_ROWS, triton.next_power_of_2(group))
    pdl = launch_options(pdl_enabled(q.device))
    window = window or 0
    common = dict(G=group, G_P=group_p, BS=k_cache.shape[1], BLOCK_N=config.block_n, DH=head_dim,
                  DOT_PRECISION=dot_precision(q.dtype), HAS_SINKS=sinks is not None, WINDOW=window,
                  num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
    qk_scale = scale * LOG2E
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               block_tables.stride(0), out.stride(0), out.stride(1))
    if num_splits == 1:
        _decode_kernel[(batch, num_kv_heads)](
            q, k_cache, v_cache, block_tables, context_lens, out, sinks, qk_scale, *strides, **common)
        return out
    num_sms = num_sms_of(q.device)
    if tokens_per_split is None:
        tokens_per_split = decode_tokens_per_split(batch, num_kv_heads, num_sms, config)
    assert tokens_per_split >= 1, f"tokens_per_split must be >= 1, got {tokens_per_split}"
    if workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, num_splits, head_dim, q.device)
    part, lse = workspace.partial_out, workspace.lse
    assert part.shape[0] >= batch and part.shape[1:] == (num_heads, num_splits, head_dim) \
        and lse.shape == part.shape[:3] and part.is_contiguous() and lse.is_contiguous() \
        and part.dtype == lse.dtype == torch.float32, \
        f"workspace must be float32 [>={batch}, {num_heads}, {num_splits}, {head_dim}] and [..., {num_splits}]"
    fused = config.merge == "fused"
    counters = _counters(q.device, batch * num_kv_heads) if fused else part
    group_2 = triton.next_power_of_2(group)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse, counters, sinks, qk_scale, tokens_per_split,
        num_splits, num_heads, *strides, FUSED_MERGE=fused, G_2=group_2,
        CHUNK=max(1, min(triton.next_power_of_2(num_splits), 2 * MERGE_TILE // (group_2 * head_dim))), **common)
    if fused:
        return out
    heads = config.merge_heads or merge_heads(batch, num_heads, num_splits, head_dim, num_sms)
    splits_p = triton.next_power_of_2(num_splits)
    _merge_splits_kernel[(batch, triton.cdiv(num_heads, heads))](
        part, lse, out, context_lens, tokens_per_split, num_splits, num_heads, out.stride(0), out.stride(1),
        HEADS=heads, S_P=splits_p, CHUNK=max(1, MERGE_TILE // (heads * head_dim)), DH=head_dim, WINDOW=window,
        num_warps=4, **pdl)
    return out


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                   context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, [C, Hkv, Dh] each (reads only its first cdiv(C, Bs) blocks)."""
    blocks = table[: -(-context // k_cache.shape[1])].long()
    keys = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:context]
    values = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:context]
    return keys, values


def attend_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scale: float, sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """q [n, H, Dh] at ``positions`` [n], keys/values [C, Hkv, Dh]: query i sees keys 0..=positions[i]
    (with a window W: positions[i] - W < key <= positions[i]); sinks [H]: one more logit per head in
    each softmax, dropped after it (attention_worker/attention_sinks.py, transformers' GPT-OSS)."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, keys) * scale                 # [H, n, C]
    key_pos = torch.arange(keys.shape[0], device=q.device)[None, :]
    visible = key_pos <= positions[:, None]                                 # [n, C]
    if window is not None:
        visible &= key_pos > positions[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        column = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hnc,chd->nhd", probs, values)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                     compute_dtype: torch.dtype = torch.float64, sinks: torch.Tensor | None = None,
                                     window: int | None = None) -> torch.Tensor:
    """Same contract, sequence by sequence in ``compute_dtype`` (returned in it); host syncs."""
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for b, context in enumerate(context_lens.tolist()):
        if context == 0:
            continue
        keys, values = gather_context(k_cache, v_cache, block_tables[b], context)
        positions = torch.tensor([context - 1], device=q.device)
        out[b] = attend_reference(q[b:b + 1].to(compute_dtype), keys.to(compute_dtype),
                                  values.to(compute_dtype), positions, scale, sinks, window)[0]
    return out
