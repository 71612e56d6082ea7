"""A dense projection at decode sizes whose weights stream before its inputs exist.

Legend: T tokens (a few), K input features, N output features, BN rows per program.

``linear_prefetched(x [T, K], w [N, K]) -> [T, N]`` is ``F.linear`` for T <= ``MAX_TOKENS``. Each program
loads its BN rows of ``w`` whole into registers *before* its PDL wait: the weights depend on no kernel,
so under programmatic dependent launch they stream while the previous kernel (the decode attention,
latency-bound at a few tokens and using few SMs) still runs, and only the dot products with ``x`` wait for
it. The GEMM library's kernels launch without PDL and, at one token, as a split-K GEMV plus a reduce
kernel: two kernel boundaries where this has one, overlapped. Every program serves all T tokens from
its tile (weights read once). float32 accumulation; the result rounded to the dtype as a GEMM rounds.
No host sync; graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

MAX_TOKENS = 8                      # what the kernel computes
# what ``fits`` serves: on an H100 (bench/results/engine_ab_h100_fused.json) 2.4% faster a step than cuBLAS at
# one token, 0.7% at two, slower at 4 and 8 (each program's dot products are serial in the tokens)
FAST_MAX_TOKENS = 2
TILE_ELEMENTS_PER_WARP = 4096       # a program's [BN, K] tile is held in registers: 128 values a thread


@dataclass(frozen=True)
class LinearConfig:
    block_n: int = 4                # rows per program
    num_warps: int = 4


DEFAULT_CONFIG = LinearConfig()


@triton.jit
def _linear_prefetched_kernel(x_ptr, w_ptr, out_ptr, T, N, K, stride_xt, stride_wn, stride_ot,
                              BN: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)                     # before the wait
    pdl_wait(USE_PDL)
    for t in range(T):
        x = tl.load(x_ptr + t * stride_xt + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + t * stride_ot + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def _tile_fits(k: int, config: LinearConfig) -> bool:
    """A program's [block_n, K] weight tile fits in its registers."""
    return config.block_n * triton.next_power_of_2(k) <= TILE_ELEMENTS_PER_WARP * config.num_warps


def fits(num_tokens: int, weight: torch.Tensor, config: LinearConfig = DEFAULT_CONFIG) -> bool:
    """Whether ``linear_prefetched`` beats the GEMM library here (one or two tokens, a tile that fits in
    registers)."""
    return 0 < num_tokens <= FAST_MAX_TOKENS and _tile_fits(weight.shape[1], config)


def linear_prefetched(x: torch.Tensor, weight: torch.Tensor, config: LinearConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """x [T, K], weight [N, K] → x @ weight.T [T, N], T <= MAX_TOKENS."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and x.dtype == weight.dtype, f"x [T, {k}] and weight [N, {k}] of one dtype"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    assert 0 < num_tokens <= MAX_TOKENS and _tile_fits(k, config), (
        f"{num_tokens} tokens x K={k}: linear_prefetched takes 1 to {MAX_TOKENS} tokens and block_n x K <= "
        f"{TILE_ELEMENTS_PER_WARP} x warps")
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    _linear_prefetched_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, out, num_tokens, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BN=config.block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=config.num_warps,
        **launch_options(pdl_enabled(x.device)))
    return out
