"""Batched token sampling on the device: no host sync, CUDA-graph capturable, one or two launches.

Legend: B rows (sequences), V vocab, NC thresholds tried per pass, C candidates sorted per row.

``sample(logits [B, V], params, seen [B, V] | None) -> tokens [B] int64`` follows
``attention_worker/sampler.py::sample_one`` row by row: the repetition penalty (CTRL rule) on the
tokens marked in ``seen``; greedy (argmax, first index on ties) when temperature == 0 or
top_k == 1; otherwise temperature, top-k (keep logits >= the k-th largest), softmax, min-p (drop
probs < min_p * max prob), top-p (drop a token when the mass sorted before it exceeds top_p), and a
draw by the exponential race ``argmax(probs / E)``, ``E = -log(U)``. U is Philox noise
``tl.rand(seed, position * 2**32 + token)``: every (seed, position) pair has its own stream, so
a seeded request draws the same token whichever row it occupies and whatever shares the batch.

Robust numerics: NaN logits count as -inf, +inf (or a penalty's overflow) as the largest float;
temperature and penalty are clamped to [FLT_MIN, FLT_MAX]; the row max is subtracted before the
division by the temperature, so every token has ``u = (max - x) / T`` in [0, inf] and an
unnormalised probability ``e = exp(-u)`` in [0, 1], the max having e = 1. A tiny temperature is
then greedy-ish sampling (e = 0 below the max) and no parameter makes a NaN.

One program per row walks the vocabulary in tiles, several times (``_greedy_kernel``: step 1;
``_sample_kernel``: steps 1 and 3; with filters, ``_thresholds_kernel``: steps 1 and 2, then
``_race_kernel``: step 3):
1. the penalised max and its index (greedy rows stop here);
2. filters without sorting the vocabulary: every filter keeps an upper set of tokens, so it is
   a threshold on the monotone key ``bits(u)``. The k-th key (a count) and the top-p key (a mass:
   the smallest key whose mass at or below it exceeds top_p * Z, Z the top-k set's mass) are
   bracketed by passes that count (and weigh) the tokens at or below NC candidate keys (a fixed
   grid in u, then even splits of the bracket), until at most C tokens lie in the bracket; those
   are gathered into ``scratch`` and sorted in registers to find the exact key;
3. the race over the kept tokens. Noise is drawn only for tiles that can still win: q = e / E is
   at most e * 2**25 (U <= 1 - 2**-24 gives E > 2**-25), and the race starts from the max token.
Ties between equal probabilities at the top-p boundary keep all of them (the reference's sort
order decides there); otherwise the kept sets and tokens equal ``sample_reference``'s given the
same uniforms, up to float rounding at a boundary. Launched with PDL on Hopper (kernels/pdl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38          # smallest normal float32: no subnormal reaches a division
# Tiles: every kernel compiles for sm_90 (Triton 3.6 and 3.9) to at most 128 registers at 8 warps
# (2 programs per SM) without spills; the streaming loops keep STAGES - 1 tiles of loads in flight
# (cp.async pipelining).
MAX_BLOCK = 1024                          # tokens per tile of the streaming passes
STAGES = 4
MAX_COUNT_BLOCK = 512                     # tokens per tile of the counting passes ([tile, NC] compares)
NUM_CANDIDATES = 16                       # NC
GATHER = 4096                             # C

_FLT_MAX = tl.constexpr(FLT_MAX)
_FLT_MIN = tl.constexpr(FLT_MIN)
_KEY_INF = tl.constexpr(0x7F800000)       # bits of u = +inf: the key of a -inf logit, above every other
_KEY_PAD = tl.constexpr(0x7FFFFFFF)       # above every key: padding of the sorted candidates
_RACE_BOUND = tl.constexpr(2.0 ** 25)     # q = e / E <= e * 2**25 for every U that tl.rand returns


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, all [B]."""

    temperature: torch.Tensor          # float32; 0: greedy
    top_k: torch.Tensor                # int32; 0 (or >= V): off, 1: greedy
    top_p: torch.Tensor                # float32 in (0, 1]; 1: off
    min_p: torch.Tensor                # float32 in [0, 1); 0: off
    repetition_penalty: torch.Tensor   # float32 > 0; 1: off
    seed: torch.Tensor                 # int64: the Philox key
    position: torch.Tensor             # int64: the sampled token's position (in the Philox counter)

    def __post_init__(self) -> None:
        dtypes = dict(top_k=torch.int32, seed=torch.int64, position=torch.int64)
        first = self.temperature
        for f in fields(self):
            t = getattr(self, f.name)
            want = dtypes.get(f.name, torch.float32)
            assert t.dim() == 1 and t.shape == first.shape, f"{f.name} must be [B], got {list(t.shape)}"
            assert t.dtype == want, f"{f.name} must be {want}, got {t.dtype}"
            assert t.device == first.device and t.is_contiguous(), f"{f.name} must be contiguous on {first.device}"

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


# ---- kernel building blocks ----

@triton.jit
def _logits_tile(logits_row, seen_row, offs, V, penalty, HAS_SEEN: tl.constexpr):
    """x [BLOCK] float32: penalised logits, NaN → -inf, capped at FLT_MAX; -inf past V."""
    ok = offs < V
    x = tl.load(logits_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    if HAS_SEEN:
        if penalty != 1.0:
            hit = tl.load(seen_row + offs, mask=ok, other=0) != 0
            x = tl.where(hit, tl.where(x > 0, tl.div_rn(x, penalty), x * penalty), x)
    return tl.minimum(x, _FLT_MAX)


@triton.jit
def _scaled(x, m, temperature):
    """u = (max - x) / T in [0, inf]: how far below the max, in temperature units (IEEE division,
    as torch's: the approximate one flushes 1 / T to zero for T near FLT_MAX and makes inf * 0)."""
    return tl.where(x == m, 0.0, tl.div_rn(m - x, temperature))


@triton.jit
def _row_max(logits_row, seen_row, V, penalty, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """(max, first index of the max) of the penalised row; (-inf, 0) for a row of -inf."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = offs
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):
        x = _logits_tile(logits_row, seen_row, start + offs, V, penalty, HAS_SEEN)
        better = x > best                                  # strict: each lane keeps its first max
        best = tl.where(better, x, best)
        best_i = tl.where(better, start + offs, best_i)
    m = tl.max(best, axis=0)
    return m, tl.min(tl.where(best == m, best_i, V), axis=0)


@triton.jit
def _noise(seed, stream, offs):
    """U [BLOCK] in [0, 1): Philox keyed by the seed, counter (token, position)."""
    return tl.rand(seed, stream + offs)


@triton.jit
def _race(logits_row, seen_row, V, penalty, m, m_idx, temperature, theta, min_p, seed, stream,
          HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """argmax of e / E over the kept tokens (key <= theta, e >= min_p, e > 0); first index on ties."""
    offs = tl.arange(0, BLOCK)
    best_q = 1.0 / -tl.log(_noise(seed, stream, m_idx))       # the max is always kept, e = 1
    best_i = m_idx
    for start in tl.range(0, V, BLOCK, num_stages=STAGES):
        x = _logits_tile(logits_row, seen_row, start + offs, V, penalty, HAS_SEEN)
        u = _scaled(x, m, temperature)
        e = tl.exp(-u)
        kept = (start + offs < V) & (u.to(tl.int32, bitcast=True) <= theta) & (e >= min_p) & (e > 0.0)
        e = tl.where(kept, e, 0.0)
        if tl.max(e, axis=0) * _RACE_BOUND >= best_q:          # else no token of this tile can win
            q = tl.where(kept, e / -tl.log(_noise(seed, stream, start + offs)), -1.0)
            tile_q, tile_i = tl.max(q, axis=0, return_indices=True)
            tile_i += start
            better = (tile_q > best_q) | ((tile_q == best_q) & (tile_i < best_i))
            best_q = tl.where(better, tile_q, best_q)
            best_i = tl.where(better, tile_i, best_i)
    return best_i


@triton.jit
def _domain_tile(logits_row, seen_row, offs, V, penalty, m, temperature, theta_k, min_p, HAS_SEEN: tl.constexpr):
    """(key, e, in_top_k, in_domain) [BLOCK] of a tile: the domain is the top-k set after min-p."""
    x = _logits_tile(logits_row, seen_row, offs, V, penalty, HAS_SEEN)
    u = _scaled(x, m, temperature)
    key = u.to(tl.int32, bitcast=True)
    e = tl.exp(-u)
    in_k = (offs < V) & (key <= theta_k)
    return key, e, in_k, in_k & (e >= min_p)


@triton.jit
def _count_below(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, cand, lo, hi,
                 MASS: tl.constexpr, HAS_SEEN: tl.constexpr, CBLOCK: tl.constexpr, NC: tl.constexpr):
    """For each candidate key c [NC]: the count and weight (e if MASS, else 1) of domain tokens with
    lo < key <= c; and Z, the mass of the top-k set."""
    offs = tl.arange(0, CBLOCK)
    cnt = tl.zeros([NC], tl.float32)
    w = tl.zeros([NC], tl.float32)
    z = tl.zeros([CBLOCK], tl.float32)
    for start in range(0, V, CBLOCK):            # compute-bound: not pipelined
        key, e, in_k, dom = _domain_tile(logits_row, seen_row, start + offs, V, penalty, m, temperature,
                                         theta_k, min_p, HAS_SEEN)
        dom = dom & (key > lo) & (key <= hi)
        below = dom[:, None] & (key[:, None] <= cand[None, :])        # [BLOCK, NC]
        cnt += tl.sum(below.to(tl.float32), axis=0)
        if MASS:
            w += tl.sum(tl.where(below, e[:, None], 0.0), axis=0)
            z += tl.where(in_k, e, 0.0)
    if not MASS:
        w = cnt
    return cnt, w, tl.sum(z, axis=0)


@triton.jit
def _pick(values, i, NC: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, NC) == i, values, 0), axis=0)


@triton.jit
def _narrow(cand, cnt, w, target, lo, hi, cnt_lo, w_lo, NC: tl.constexpr):
    """New bracket from the candidates' totals: W(<= lo) <= target < W(<= hi). If no candidate
    exceeds the target (only at the last grid point: the whole domain stays within it), the
    bracket becomes (hi - 1, hi], which ends the search at hi."""
    first = tl.min(tl.where(w > target, tl.arange(0, NC), NC), axis=0)
    found = first < NC
    has_prev = found & (first > 0)
    new_lo = tl.where(has_prev, _pick(cand, first - 1, NC), tl.where(found, lo, hi - 1))
    new_cnt_lo = tl.where(has_prev, _pick(cnt, first - 1, NC), cnt_lo)
    new_w_lo = tl.where(has_prev, _pick(w, first - 1, NC), w_lo)
    new_hi = tl.where(found, _pick(cand, first, NC), hi)
    new_cnt_hi = tl.where(found, _pick(cnt, first, NC), new_cnt_lo)
    return new_lo, new_hi, new_cnt_lo, new_w_lo, new_cnt_hi


@triton.jit
def _finish(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, lo, hi, w_lo, target,
            scratch_row, MASS: tl.constexpr, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, C: tl.constexpr):
    """The exact threshold key in (lo, hi], which holds at most C domain tokens: gather, sort, scan."""
    offs = tl.arange(0, BLOCK)
    n = tl.full([], 0, tl.int32)
    tl.debug_barrier()                                   # every thread is done reading an earlier gather
    for start in range(0, V, BLOCK):
        key, e, in_k, dom = _domain_tile(logits_row, seen_row, start + offs, V, penalty, m, temperature,
                                         theta_k, min_p, HAS_SEEN)
        sel = (dom & (key > lo) & (key <= hi)).to(tl.int32)
        pos = n + tl.cumsum(sel, axis=0) - 1
        tl.store(scratch_row + pos, key, mask=(sel != 0) & (pos < C))
        n += tl.sum(sel, axis=0)
    tl.debug_barrier()                                   # the gathered keys, visible to every thread
    j = tl.arange(0, C)
    valid = j < n
    keys = tl.sort(tl.load(scratch_row + j, mask=valid, other=_KEY_PAD))
    if MASS:
        wts = tl.where(valid, tl.exp(-keys.to(tl.float32, bitcast=True)), 0.0)
    else:
        wts = valid.to(tl.float32)
    cum = w_lo + tl.cumsum(wts, axis=0)
    first = tl.min(tl.where(valid & (cum > target), j, C), axis=0)
    return tl.where(first < C, _pick(keys, first, C), hi)


@triton.jit
def _threshold(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, frac, count_target,
               scratch_row, MASS: tl.constexpr, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr,
               CBLOCK: tl.constexpr, NC: tl.constexpr, C: tl.constexpr):
    """The smallest key K with W(key <= K) > target over the domain: W a count with target k - 1
    (top-k), or a mass with target frac * Z (top-p). _KEY_INF when the domain stays within it."""
    i = tl.arange(0, NC)
    grid_u = tl.where(i == 0, 0.0, 0.25 * tl.exp2((i - 1).to(tl.float32) * 0.5))     # 0, 1/4 ... 22.6
    cand = tl.where(i == NC - 1, float("inf"), grid_u).to(tl.int32, bitcast=True)
    lo = tl.full([], -1, tl.int32)
    hi = tl.full([], _KEY_INF, tl.int32)
    zero = tl.full([], 0.0, tl.float32)
    cnt, w, z = _count_below(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, cand, lo, hi,
                             MASS, HAS_SEEN, CBLOCK, NC)
    if MASS:
        target = frac * z
    else:
        target = count_target
    lo, hi, cnt_lo, w_lo, cnt_hi = _narrow(cand, cnt, w, target, lo, hi, zero, zero, NC)
    while (hi - lo > 1) & (cnt_hi - cnt_lo > C):
        cand = lo + (((hi - lo).to(tl.int64) * (i + 1)) // NC).to(tl.int32)       # even splits, last = hi
        cnt, w, z = _count_below(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, cand, lo, hi,
                                 MASS, HAS_SEEN, CBLOCK, NC)
        lo, hi, cnt_lo, w_lo, cnt_hi = _narrow(cand, cnt + cnt_lo, w + w_lo, target, lo, hi, cnt_lo, w_lo, NC)
    result = hi
    if hi - lo > 1:
        result = _finish(logits_row, seen_row, V, penalty, m, temperature, theta_k, min_p, lo, hi, w_lo, target,
                         scratch_row, MASS, HAS_SEEN, BLOCK, C)
    return result


# ---- kernels ----

@triton.jit
def _greedy_kernel(logits_ptr, seen_ptr, out_ptr, penalty_ptr, V, stride_l, stride_s,
                   HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    penalty = tl.minimum(tl.maximum(tl.load(penalty_ptr + row), _FLT_MIN), _FLT_MAX)
    _, idx = _row_max(logits_ptr + row * stride_l, seen_ptr + row * stride_s, V, penalty, HAS_SEEN, BLOCK, STAGES)
    tl.store(out_ptr + row, idx.to(tl.int64))


@triton.jit
def _sample_kernel(logits_ptr, seen_ptr, out_ptr, temp_ptr, top_k_ptr, penalty_ptr, seed_ptr, pos_ptr,
                   V, stride_l, stride_s, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Greedy rows and plain temperature sampling (no row uses top-k, top-p or min-p): max + race."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    logits_row, seen_row = logits_ptr + row * stride_l, seen_ptr + row * stride_s
    temperature = tl.load(temp_ptr + row)
    penalty = tl.minimum(tl.maximum(tl.load(penalty_ptr + row), _FLT_MIN), _FLT_MAX)
    m, token = _row_max(logits_row, seen_row, V, penalty, HAS_SEEN, BLOCK, STAGES)
    if (temperature != 0.0) & (tl.load(top_k_ptr + row) != 1):
        temperature = tl.minimum(tl.maximum(temperature, _FLT_MIN), _FLT_MAX)
        stream = tl.load(pos_ptr + row).to(tl.int64) << 32
        token = _race(logits_row, seen_row, V, penalty, m, token, temperature, _KEY_INF, 0.0,
                      tl.load(seed_ptr + row), stream, HAS_SEEN, BLOCK, STAGES)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _thresholds_kernel(logits_ptr, seen_ptr, max_ptr, argmax_ptr, theta_ptr, scratch_ptr, temp_ptr, top_k_ptr,
                       top_p_ptr, min_p_ptr, penalty_ptr, V, stride_l, stride_s,
                       HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, CBLOCK: tl.constexpr,
                       NC: tl.constexpr, C: tl.constexpr, USE_PDL: tl.constexpr):
    """Per row: the penalised max and its index, and the key threshold theta of top-k and top-p."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    logits_row, seen_row = logits_ptr + row * stride_l, seen_ptr + row * stride_s
    temperature = tl.load(temp_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    penalty = tl.minimum(tl.maximum(tl.load(penalty_ptr + row), _FLT_MIN), _FLT_MAX)
    m, m_idx = _row_max(logits_row, seen_row, V, penalty, HAS_SEEN, BLOCK, STAGES)
    theta = tl.full([], _KEY_INF, tl.int32)
    if (temperature != 0.0) & (top_k != 1):
        temperature = tl.minimum(tl.maximum(temperature, _FLT_MIN), _FLT_MAX)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.maximum(tl.load(min_p_ptr + row), 0.0)
        scratch_row = scratch_ptr + row * C
        if (top_k > 1) & (top_k < V):
            theta = _threshold(logits_row, seen_row, V, penalty, m, temperature, theta, 0.0, 0.0,
                               (top_k - 1).to(tl.float32), scratch_row, False, HAS_SEEN, BLOCK, CBLOCK, NC, C)
        if top_p < 1.0:
            theta_p = _threshold(logits_row, seen_row, V, penalty, m, temperature, theta, min_p, top_p, 0.0,
                                 scratch_row, True, HAS_SEEN, BLOCK, CBLOCK, NC, C)
            theta = tl.minimum(theta, theta_p)
    tl.store(max_ptr + row, m)
    tl.store(argmax_ptr + row, m_idx)
    tl.store(theta_ptr + row, theta)


@triton.jit
def _race_kernel(logits_ptr, seen_ptr, out_ptr, max_ptr, argmax_ptr, theta_ptr, temp_ptr, top_k_ptr, min_p_ptr,
                 penalty_ptr, seed_ptr, pos_ptr, V, stride_l, stride_s,
                 HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    """The race over each row's kept tokens, given its max, argmax and theta (_thresholds_kernel)."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temp_ptr + row)
    token = tl.load(argmax_ptr + row)
    if (temperature != 0.0) & (tl.load(top_k_ptr + row) != 1):
        temperature = tl.minimum(tl.maximum(temperature, _FLT_MIN), _FLT_MAX)
        penalty = tl.minimum(tl.maximum(tl.load(penalty_ptr + row), _FLT_MIN), _FLT_MAX)
        min_p = tl.maximum(tl.load(min_p_ptr + row), 0.0)
        stream = tl.load(pos_ptr + row).to(tl.int64) << 32
        token = _race(logits_ptr + row * stride_l, seen_ptr + row * stride_s, V, penalty, tl.load(max_ptr + row),
                      token, temperature, tl.load(theta_ptr + row), min_p, tl.load(seed_ptr + row), stream,
                      HAS_SEEN, BLOCK, STAGES)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _uniforms_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = _noise(tl.load(seed_ptr + row), tl.load(pos_ptr + row).to(tl.int64) << 32, offs)
    tl.store(out_ptr + row * V + offs, u, mask=offs < V)


# ---- wrappers ----

def _block(vocab_size: int, most: int) -> int:
    return min(most, max(16, triton.next_power_of_2(vocab_size)))


def sample(logits: torch.Tensor, params: SamplingTensors, seen: torch.Tensor | None = None, *,
           greedy_only: bool = False, use_filters: bool = True) -> torch.Tensor:
    """logits [B, V] (float32), seen [B, V] bool or None → tokens [B] int64.

    ``greedy_only``: argmax of the penalised logits for every row, whatever its parameters (the
    caller knows every row is greedy). ``use_filters=False``: top-k, top-p and min-p are ignored
    (the caller knows no row uses them); greedy rows and temperature sampling are unchanged."""
    assert logits.dim() == 2 and logits.is_floating_point(), f"logits must be [B, V] floats, got {list(logits.shape)}"
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits' rows must be contiguous"
    assert 0 < vocab < 2 ** 31, f"vocab size {vocab}"
    assert params.num_rows == num_rows, f"params have {params.num_rows} rows, logits {num_rows}"
    assert params.temperature.device == logits.device, "params must be on the logits' device"
    if seen is not None:
        assert seen.shape == logits.shape and seen.dtype == torch.bool, "seen must be [B, V] bool"
        assert seen.stride(1) == 1 and seen.device == logits.device, "seen's rows must be contiguous"
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return tokens
    has_seen = seen is not None
    seen_arg, stride_s = (seen, seen.stride(0)) if has_seen else (logits, 0)     # never read without seen
    options = dict(HAS_SEEN=has_seen, BLOCK=_block(vocab, MAX_BLOCK), STAGES=STAGES, num_warps=8,
                   **launch_options(pdl_enabled(logits.device)))
    p = params
    rows = (num_rows,)
    if greedy_only:
        _greedy_kernel[rows](logits, seen_arg, tokens, p.repetition_penalty, vocab, logits.stride(0), stride_s,
                             **options)
    elif use_filters:
        gather = _block(vocab, GATHER)
        row_max = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
        argmax_theta = torch.empty(2, num_rows, dtype=torch.int32, device=logits.device)
        scratch = torch.empty(num_rows, gather, dtype=torch.int32, device=logits.device)
        _thresholds_kernel[rows](logits, seen_arg, row_max, argmax_theta[0], argmax_theta[1], scratch, p.temperature,
                                 p.top_k, p.top_p, p.min_p, p.repetition_penalty, vocab, logits.stride(0), stride_s,
                                 CBLOCK=_block(vocab, MAX_COUNT_BLOCK), NC=NUM_CANDIDATES, C=gather, **options)
        _race_kernel[rows](logits, seen_arg, tokens, row_max, argmax_theta[0], argmax_theta[1], p.temperature, p.top_k,
                           p.min_p, p.repetition_penalty, p.seed, p.position, vocab, logits.stride(0), stride_s,
                           **options)
    else:
        _sample_kernel[rows](logits, seen_arg, tokens, p.temperature, p.top_k, p.repetition_penalty, p.seed,
                             p.position, vocab, logits.stride(0), stride_s, **options)
    return tokens


def philox_uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, positions [B] int64 → the race's uniforms [B, V] float32, as the kernels draw them."""
    assert seeds.shape == positions.shape and seeds.dim() == 1, "seeds and positions must both be [B]"
    assert seeds.dtype == positions.dtype == torch.int64, "seeds and positions must be int64"
    out = torch.empty(seeds.shape[0], vocab_size, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        block = _block(vocab_size, MAX_BLOCK)
        _uniforms_kernel[(seeds.shape[0], triton.cdiv(vocab_size, block))](seeds.contiguous(), positions.contiguous(),
                                                                           out, vocab_size, BLOCK=block)
    return out


# ---- reference ----

def _filtered_row_reference(logits: torch.Tensor, params: SamplingTensors, row: int,
                            seen: torch.Tensor | None) -> torch.Tensor:
    """sample_one's steps on one row up to the draw → probs [V] (one-hot at the argmax for a greedy
    row); float32 0-dim parameters, as the kernel reads them."""
    temperature, top_k = params.temperature[row], int(params.top_k[row])
    top_p, min_p = params.top_p[row], params.min_p[row]
    x = logits.float().nan_to_num(nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))
    penalty = params.repetition_penalty[row].clamp(FLT_MIN, FLT_MAX)
    if seen is not None and penalty != 1.0:
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x).clamp_max(FLT_MAX)
    if temperature == 0 or top_k == 1:
        return torch.zeros_like(x).index_fill_(0, torch.argmax(x), 1.0)
    m = x.max()
    scaled = torch.where(x == m, 0.0, (x - m) / temperature.clamp(FLT_MIN, FLT_MAX))    # <= 0, the max at 0
    if 1 < top_k < x.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()


def filtered_probs_reference(logits: torch.Tensor, params: SamplingTensors,
                             seen: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool or None → the distribution each row draws from [B, V]."""
    return torch.stack([_filtered_row_reference(logits[b], params, b, None if seen is None else seen[b])
                        for b in range(logits.shape[0])]) if logits.shape[0] else torch.zeros_like(logits)


def race_reference(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs, uniforms [..., V] → argmax(probs / E), E = -log(U), over tokens of nonzero probability."""
    return torch.argmax(torch.where(probs > 0, probs / -torch.log(uniforms), -1.0), dim=-1)


def sample_reference(logits: torch.Tensor, params: SamplingTensors, seen: torch.Tensor | None,
                     uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool or None, uniforms [B, V] (``philox_uniforms``) → tokens [B] int64."""
    return race_reference(filtered_probs_reference(logits, params, seen), uniforms)
