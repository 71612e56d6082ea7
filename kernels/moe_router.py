"""A decode step's routing in one launch: residual add + RMSNorm + router logits + softmax top-k.

Legend: T tokens, D hidden, E logical experts, K top-k, EB expert blocks (programs per token).

At a few tokens, a MoE layer's routing is three small launches (add + norm, the router's [E, D]
GEMV, top-k), each mostly launch latency. ``add_norm_router_topk`` does all three: grid (T, EB);
every program adds the token's residual and normalises it (D elements, cheap to redo), program 0
of the token writes the normalised row and the new residual, and each program computes the router
logits of its BLOCK_E experts, whose router rows it loads before its PDL wait (they depend on no
kernel, so they stream while the kernel before still runs). The last program of a token to finish (a
per-token counter, atomic with acquire-release ordering; it resets itself, so graph replays need no
memset) reads the E logits and picks the top K. Numerics follow the torch composition: the sum rounded to the model
dtype, variance in float32, ``weight * h.to(dtype)``, logits rounded to the model dtype (as a
bf16 GEMM writes them), softmax in float32; ties go to the lower expert id.

Past a few tokens the router GEMM is better done by the GEMM library and the weights re-read per
token would dominate: ``FUSED_MAX_TOKENS`` bounds where callers use this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.counters import zeroed_counters
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait
from epserve.kernels.topk_softmax import top_k_exp

FUSED_MAX_TOKENS = 32
TILE_ELEMENTS = 8192        # a program's router tile [BLOCK_E, D], held in registers


def _counters(device: torch.device, num_tokens: int) -> torch.Tensor:
    """Per-token completion counters, zero between launches (the last program resets its own)."""
    return zeroed_counters("moe_router", device, max(num_tokens, FUSED_MAX_TOKENS))


@triton.jit
def _add_norm_router_topk_kernel(delta_ptr, res_ptr, norm_w_ptr, router_ptr, x_ptr, res_out_ptr, logits_ptr,
                                 counter_ptr, ids_ptr, weights_ptr, D, E, top_k, eps,
                                 stride_dt, stride_rt, stride_xt, stride_ot, stride_we,
                                 BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, E_P2: tl.constexpr,
                                 K_P2: tl.constexpr, NUM_EB: tl.constexpr, RENORMALIZE: tl.constexpr,
                                 USE_PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    eb = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    experts = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    w = tl.load(router_ptr + experts[:, None].to(tl.int64) * stride_we + offs[None, :],
                mask=(experts[:, None] < E) & ok[None, :], other=0.0)            # [BLOCK_E, BLOCK_D], before the wait
    pdl_wait(USE_PDL)
    summed = (tl.load(delta_ptr + t * stride_dt + offs, mask=ok, other=0.0).to(tl.float32)
              + tl.load(res_ptr + t * stride_rt + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype)
    s32 = summed.to(tl.float32)
    h = s32 * tl.rsqrt(tl.sum(s32 * s32, axis=0) / D + eps)
    x = (h.to(dtype).to(tl.float32) * tl.load(norm_w_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype)
    if eb == 0:
        tl.store(x_ptr + t * stride_xt + offs, x, mask=ok)
        tl.store(res_out_ptr + t * stride_ot + offs, summed, mask=ok)
    logits = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1).to(dtype).to(tl.float32)   # [BLOCK_E]
    tl.store(logits_ptr + t * E + experts, logits, mask=experts < E)
    tl.debug_barrier()                          # every thread's stores precede the release below
    done = tl.atomic_add(counter_ptr + t, 1, sem="acq_rel")
    if done == NUM_EB - 1:                      # every block of this token has stored its logits
        all_e = tl.arange(0, E_P2)
        row = tl.load(logits_ptr + t * E + all_e, mask=all_e < E, other=-float("inf"), volatile=True)
        denominator = tl.sum(tl.exp(row - tl.max(row, axis=0)), axis=0)
        vals, ids = top_k_exp(row, top_k, E_P2, K_P2)
        ks = tl.arange(0, K_P2)
        if RENORMALIZE:
            vals = vals / tl.sum(vals, axis=0)
        else:
            vals = vals / denominator
        tl.store(weights_ptr + t * top_k + ks, vals, mask=ks < top_k)
        tl.store(ids_ptr + t * top_k + ks, ids, mask=ks < top_k)
        tl.store(counter_ptr + t, 0)


def add_norm_router_topk(delta: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                         router: torch.Tensor, eps: float, top_k: int, renormalize: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """delta, residual [T, D], norm_weight [D], router [E, D] → (x [T, D] normalised, summed [T, D] the
    new residual, topk_ids [T, K] int32, topk_weights [T, K] float32)."""
    assert delta.dim() == 2 and delta.shape == residual.shape, "delta and residual must be [T, D] alike"
    num_tokens, dim = delta.shape
    num_experts = router.shape[0]
    assert router.shape == (num_experts, dim) and norm_weight.shape == (dim,), "router [E, D], norm_weight [D]"
    assert 1 <= top_k <= num_experts, f"top_k {top_k} must be in [1, E={num_experts}]"
    assert delta.stride(1) == residual.stride(1) == router.stride(1) == 1, "rows must be contiguous"
    device = delta.device
    x = torch.empty_like(delta)
    summed = torch.empty_like(delta)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    if num_tokens == 0:
        return x, summed, ids, weights
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
    block_d = triton.next_power_of_2(dim)
    block_e = max(1, min(16, TILE_ELEMENTS // block_d))        # D=2048: 4 experts per program
    num_blocks = triton.cdiv(num_experts, block_e)
    _add_norm_router_topk_kernel[(num_tokens, num_blocks)](
        delta, residual, norm_weight, router, x, summed, logits, _counters(device, num_tokens), ids, weights,
        dim, num_experts, top_k, eps, delta.stride(0), residual.stride(0), x.stride(0), summed.stride(0),
        router.stride(0), BLOCK_D=block_d, BLOCK_E=block_e,
        E_P2=triton.next_power_of_2(num_experts), K_P2=triton.next_power_of_2(top_k), NUM_EB=num_blocks,
        RENORMALIZE=renormalize, num_warps=4 if block_d <= 2048 else 8, **launch_options(pdl_enabled(device)))
    return x, summed, ids, weights


def add_norm_router_topk_reference(delta: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                                   router: torch.Tensor, eps: float, top_k: int, renormalize: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch composition the model runs without the kernel (epserve.models.ops.TORCH_OPS)."""
    from epserve.models.layers import rms_norm, softmax_topk

    summed = residual + delta
    x = rms_norm(summed, norm_weight, eps)
    ids, weights = softmax_topk(torch.nn.functional.linear(x, router), top_k, renormalize)
    return x, summed, ids.to(torch.int32), weights.float()
