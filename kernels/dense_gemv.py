"""Dense projections of a few tokens (decode): ``x @ w.T (+ b)`` as a GEMV that streams ``w`` once.

Legend: M rows of x (tokens, 1..8), N output features, K input features, BN weight rows per
program, BK columns per step, BM = M rounded up to a power of two.

At M ≤ 8 a projection is a read of its weight matrix; cuBLAS picks split-K GEMMs for these shapes
(a second reduce kernel) and cannot overlap its weight reads with the previous kernel. Here each
program owns BN rows of ``w`` and all M rows of x, and issues its first weight tile *before* the
programmatic-dependent-launch wait (weights never depend on an earlier kernel), so the weight
stream starts while the previous kernel drains. The K reduction is one fixed-order sum per
program: deterministic, with no atomics and no second kernel.

``dense_gemv(x [M, K], w [N, K], b [N] | None) → [M, N]`` in x's dtype, float32 accumulation;
graph capturable (no host sync). ``dense_gemv_reference`` is the float32 torch result.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

MAX_ROWS = 8


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_m = tl.arange(0, BM)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]            # [BN, BK]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]            # [BM, BK]
    k_ok = offs_k < K
    w = tl.load(w_rows, mask=n_ok[:, None] & k_ok[None, :], other=0.0)    # before the wait: weights only
    pdl_wait(USE_PDL)
    x = tl.load(x_rows, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    acc = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]                       # [BM, BN, BK]
    for k0 in range(BK, K, BK):
        k_ok = offs_k < K - k0
        w = tl.load(w_rows + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    out = tl.sum(acc, axis=2)                                                               # [BM, BN]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=64)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_blocks(rows: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(BN, BK, num_warps): at least two programs per SM where N allows it; fewer columns per step as
    M grows (the [BM, BN, BK] accumulator lives in registers)."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    block_n = 16
    while block_n > 4 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    block_k = 256 if rows <= 2 else 128 if rows <= 4 else 64
    return block_n, block_k, 4


def dense_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M ≤ 8), w [N, K], b [N] or None → [M, N] in x's dtype."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], "x [M, K], w [N, K]"
    assert x.shape[0] <= MAX_ROWS, f"dense_gemv is for at most {MAX_ROWS} rows, got {x.shape[0]}"
    assert x.dtype == w.dtype and x.stride(1) == 1 and w.stride(1) == 1, "same dtype, contiguous rows"
    rows, k = x.shape
    n = w.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_n, block_k, warps = gemv_blocks(rows, n, x.device)
    grid = (triton.cdiv(n, block_n),)
    _dense_gemv_kernel[grid](x, w, b if b is not None else w, out, rows, n, k, x.stride(0), w.stride(0),
                             out.stride(0), HAS_BIAS=b is not None, BM=triton.next_power_of_2(rows), BN=block_n,
                             BK=block_k, num_warps=warps, **launch_options(pdl_enabled(x.device)))
    return out


def dense_gemv_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ w.float().T
    return out if b is None else out + b.float()
