"""Softmax top-k routing with renormalisation (Qwen3-MoE, Mixtral: ``norm_topk_prob``).

Legend: T tokens, E logical experts, K top-k.

``weights, ids = softmax_topk_renorm(logits [T, E], K)``: probabilities = softmax(logits),
the K largest (descending; ties go to the lower expert id), weights renormalised to sum to 1.
Since softmax is monotonic and the renormalisation cancels the softmax denominator, the
kernel picks the top-k logits and normalises ``exp(l - max)`` over them alone.
One program per token; no host sync; programmatic dependent launch on Hopper (kernels/pdl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait


@triton.jit
def top_k_exp(row, top_k, E_P2: tl.constexpr, K_P2: tl.constexpr):
    """row [E_P2] float32 (-inf past the E real entries) → (``exp(v - max(row))`` of the K largest v,
    descending [K_P2]; their indexes [K_P2] int32). Ties go to the lower index; K_P2 >= top_k."""
    offs = tl.arange(0, E_P2)
    ks = tl.arange(0, K_P2)
    row_max = tl.max(row, axis=0)
    vals = tl.zeros([K_P2], dtype=tl.float32)
    ids = tl.zeros([K_P2], dtype=tl.int32)
    for k in range(top_k):
        best = tl.max(row, axis=0)
        idx = tl.min(tl.where(row == best, offs, E_P2), axis=0)
        vals = tl.where(ks == k, tl.exp(best - row_max), vals)
        ids = tl.where(ks == k, idx, ids)
        row = tl.where(offs == idx, -float("inf"), row)
    return vals, ids


@triton.jit
def _softmax_topk_renorm_kernel(logits_ptr, weights_ptr, ids_ptr, E, top_k, stride_lt,
                                E_P2: tl.constexpr, K_P2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_P2)
    ks = tl.arange(0, K_P2)
    x = tl.load(logits_ptr + t * stride_lt + offs, mask=offs < E, other=-float("inf")).to(tl.float32)
    vals, ids = top_k_exp(x, top_k, E_P2, K_P2)
    vals = vals / tl.sum(vals, axis=0)
    tl.store(weights_ptr + t * top_k + ks, vals, mask=ks < top_k)
    tl.store(ids_ptr + t * top_k + ks, ids, mask=ks < top_k)


def softmax_topk_renorm(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] → (weights [T, K] float32, ids [T, K] int32)."""
    assert logits.dim() == 2, f"logits must be [T, E], got {tuple(logits.shape)}"
    num_tokens, num_experts = logits.shape
    assert 1 <= top_k <= num_experts, f"top_k {top_k} must be in [1, E={num_experts}]"
    logits = logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        _softmax_topk_renorm_kernel[(num_tokens,)](logits, weights, ids, num_experts, top_k,
                                                   logits.stride(0),
                                                   E_P2=triton.next_power_of_2(num_experts),
                                                   K_P2=triton.next_power_of_2(top_k),
                                                   **launch_options(pdl_enabled(logits.device)))
    return weights, ids


def softmax_topk_renorm_reference(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)
