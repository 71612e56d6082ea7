"""The small per-layer operations of a model, in two implementations chosen once at start-up.

Legend: T tokens, N normalised width, E logical experts, K top-k.

``LayerOps`` bundles the operations a decoder layer runs around its matrix products:
- ``rms_norm(x [T, N], weight [N], eps) -> [T, N]``
- ``add_rms_norm(x [T, N], residual [T, N], weight [N], eps) -> (normed [T, N], summed [T, N])``:
  ``summed = x + residual`` (the new residual stream), ``normed = rms_norm(summed)``.
- ``route(router_logits [T, E], top_k, renormalize) -> (topk_ids [T, K], topk_weights [T, K])``.
- ``add_norm_route(x, residual, weight, eps, router [E, D], top_k, renormalize) -> (normed, summed,
  topk_ids, topk_weights)``: a MoE layer's post-attention residual add, norm and routing together
  (one launch at decode sizes on a GPU, ``kernels/moe_router.py``).
- ``linear(x [T, K], weight [N, K]) -> [T, N]``: a projection; at one or two tokens on a GPU one kernel that
  loads its weights before it waits for x (``kernels/dense_gemv.py``).

``TORCH_OPS`` composes torch operations exactly as transformers' reference computes them (the
float64 parity path, and any device). ``triton_ops()`` uses one fused Triton kernel per
operation (``epserve.kernels``): on a GPU a decode step of a 48-layer model otherwise spends
more time launching small kernels than moving weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epserve.models.layers import rms_norm, softmax_topk


@dataclass(frozen=True)
class LayerOps:
    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    route: Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
    add_norm_route: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear


def _torch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def _composed_add_norm_route(add_rms_norm, route):
    def add_norm_route(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       router: torch.Tensor, top_k: int, renormalize: bool):
        normed, summed = add_rms_norm(x, residual, weight, eps)
        topk_ids, topk_weights = route(F.linear(normed, router), top_k, renormalize)
        return normed, summed, topk_ids, topk_weights
    return add_norm_route


TORCH_OPS = LayerOps("torch", rms_norm, _torch_add_rms_norm, softmax_topk,
                     _composed_add_norm_route(_torch_add_rms_norm, softmax_topk))


def triton_ops() -> LayerOps:
    """The fused-kernel operations (CUDA devices; the Triton interpreter in CPU tests)."""
    from epserve.kernels.dense_gemv import fits, linear_prefetched
    from epserve.kernels.moe_router import FUSED_MAX_TOKENS, add_norm_router_topk
    from epserve.kernels.rms_norm import add_rms_norm, rms_norm as triton_rms_norm
    from epserve.kernels.topk_softmax import softmax_topk_renorm

    def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not renormalize:       # the kernel renormalises; the plain top-k softmax stays in torch
            return softmax_topk(router_logits, top_k, renormalize)
        weights, ids = softmax_topk_renorm(router_logits, top_k)
        return ids, weights

    composed = _composed_add_norm_route(add_rms_norm, route)

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == weight.dtype and x.stride(-1) == 1 and fits(x.shape[0], weight):
            return linear_prefetched(x, weight)
        return F.linear(x, weight)

    def add_norm_route(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       router: torch.Tensor, top_k: int, renormalize: bool):
        if x.shape[0] > FUSED_MAX_TOKENS:      # past decode sizes the GEMM library does the router better
            return composed(x, residual, weight, eps, router, top_k, renormalize)
        normed, summed, topk_ids, topk_weights = add_norm_router_topk(x, residual, weight, router, eps, top_k,
                                                                      renormalize)
        return normed, summed, topk_ids, topk_weights

    return LayerOps("triton", triton_rms_norm, add_rms_norm, route, add_norm_route, linear)


def layer_ops_for(device: torch.device | str) -> LayerOps:
    """Triton's fused operations on CUDA devices, torch's everywhere else."""
    return triton_ops() if torch.device(device).type == "cuda" else TORCH_OPS
