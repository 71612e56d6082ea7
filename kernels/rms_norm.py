"""RMSNorm, alone or fused with the residual add before it: one launch, one program per row.

Legend: T rows (tokens), N normalised width.

``rms_norm(x [T, N], weight [N], eps)`` computes exactly what ``epserve.models.layers.rms_norm``
does: the mean of squares in float32 over the row, ``h = x * rsqrt(mean + eps)`` in float32, h
rounded to x's dtype, then ``weight * h`` with one rounding of the product (torch's same-dtype
multiply). ``add_rms_norm(x, residual, weight, eps)`` first forms ``summed = x + residual``
rounded to the dtype (the new residual stream, as torch's ``residual + x``), then normalises it;
``add_rms_norm_inplace`` writes summed into ``residual`` and the normed rows into ``out`` so a
CUDA graph can run it on static buffers. Each program holds its whole row in registers (N up to
``MAX_WIDTH``), so ``out`` may alias ``x`` and the summed rows may overwrite ``residual``.
No host sync; launched with PDL on Hopper (kernels/pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait
from epserve.models.layers import rms_norm as layers_rms_norm

MAX_WIDTH = 32768          # a row is one register block


@triton.jit
def _normalize_row(x, w_ptr, out_row, offs, ok, N, eps):
    """x [BLOCK_N] in the model dtype → weight * (x * rsqrt(mean(x²) + eps)) stored at out_row."""
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / N
    h = (xf * tl.rsqrt(mean_sq + eps)).to(x.dtype)          # the reference casts h back first
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    out = h.to(tl.float32) * w.to(tl.float32)
    tl.store(out_row + offs, out.to(out_row.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, stride_x, stride_o,
                     BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < N
    x = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0)
    _normalize_row(x, w_ptr, out_ptr + t * stride_o, offs, ok, N, eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, N, eps,
                         stride_x, stride_r, stride_o, stride_s,
                         BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < N
    x = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0)
    r = tl.load(res_ptr + t * stride_r + offs, mask=ok, other=0.0)
    summed = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)      # rounded as torch's add
    tl.store(sum_ptr + t * stride_s + offs, summed, mask=ok)
    _normalize_row(summed, w_ptr, out_ptr + t * stride_o, offs, ok, N, eps)


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    assert t.shape == shape, f"{name} must be {list(shape)}, got {list(t.shape)}"
    assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert t.stride(1) == 1 or shape[1] <= 1, f"{name}'s rows must be contiguous"


def _launch_config(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, dict]:
    assert x.dim() == 2, f"x must be [T, N], got {list(x.shape)}"
    width = x.shape[1]
    assert weight.shape == (width,), f"weight must be [{width}], got {list(weight.shape)}"
    assert weight.is_contiguous(), "weight must be contiguous"
    assert 0 < width <= MAX_WIDTH, f"N={width} must be in [1, {MAX_WIDTH}]"
    block_n = triton.next_power_of_2(width)
    num_warps = min(max(block_n // 256, 1), 8)
    options = dict(BLOCK_N=block_n, num_warps=num_warps, **launch_options(pdl_enabled(x.device)))
    return torch.promote_types(x.dtype, weight.dtype), options


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, N], weight [N] → [T, N] (into ``out`` when given; it may be x itself)."""
    out_dtype, options = _launch_config(x, weight)
    _check_rows("x", x, tuple(x.shape), x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _check_rows("out", out, tuple(x.shape), out_dtype)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.shape[1], eps, x.stride(0), out.stride(0), **options)
    return out


def add_rms_norm_inplace(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                         out: torch.Tensor) -> torch.Tensor:
    """x, residual [T, N], weight [N]: residual ← x + residual, out ← rms_norm(residual); returns out."""
    out_dtype, options = _launch_config(x, weight)
    shape = tuple(x.shape)
    _check_rows("x", x, shape, x.dtype)
    _check_rows("residual", residual, shape, x.dtype)
    _check_rows("out", out, shape, out_dtype)
    if shape[0]:
        _add_rms_norm_kernel[(shape[0],)](x, residual, weight, out, residual, shape[1], eps,
                                          x.stride(0), residual.stride(0), out.stride(0), residual.stride(0),
                                          **options)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, N], weight [N] → (normed [T, N], summed [T, N]); the inputs are not modified."""
    out_dtype, options = _launch_config(x, weight)
    shape = tuple(x.shape)
    _check_rows("x", x, shape, x.dtype)
    _check_rows("residual", residual, shape, x.dtype)
    normed = torch.empty(shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(shape, dtype=x.dtype, device=x.device)
    if shape[0]:
        _add_rms_norm_kernel[(shape[0],)](x, residual, weight, normed, summed, shape[1], eps,
                                          x.stride(0), residual.stride(0), normed.stride(0), summed.stride(0),
                                          **options)
    return normed, summed


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return layers_rms_norm(x, weight, eps)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = residual + x
    return layers_rms_norm(summed, weight, eps), summed
