"""The fused residual add + RMSNorm + router + top-k kernel against the torch composition."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.moe_router import add_norm_router_topk, add_norm_router_topk_reference
from kernel_test_utils import TOLERANCE, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(num_tokens, dim, num_experts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(num_tokens, dim, generator=g)
    residual = torch.randn(num_tokens, dim, generator=g) * 3
    norm_weight = 1 + 0.1 * torch.randn(dim, generator=g)
    router = torch.randn(num_experts, dim, generator=g) / dim ** 0.5
    return [t.to(dtype).to(DEVICE) for t in (delta, residual, norm_weight, router)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,dim,num_experts,top_k", [(1, 64, 8, 2), (3, 48, 13, 4), (5, 32, 128, 8),
                                                            (2, 256, 6, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_the_torch_composition(num_tokens, dim, num_experts, top_k, dtype, renormalize):
    inputs = problem(num_tokens, dim, num_experts, dtype, seed=num_tokens * 7 + dim)
    x, summed, ids, weights = add_norm_router_topk(*inputs, 1e-6, top_k, renormalize)
    rx, rsummed, rids, rweights = add_norm_router_topk_reference(*inputs, 1e-6, top_k, renormalize)
    assert torch.equal(summed, rsummed)
    assert rel_err(x, rx) < TOLERANCE[dtype]
    assert torch.equal(ids.cpu(), rids.cpu())
    assert rel_err(weights, rweights) < TOLERANCE[dtype]


def test_counters_reset_between_launches():
    inputs = problem(4, 64, 16, torch.float32, seed=0)
    first = add_norm_router_topk(*inputs, 1e-6, 2, True)
    again = add_norm_router_topk(*inputs, 1e-6, 2, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 8, 32])
def test_gpu_bf16_qwen3_shape(num_tokens):
    inputs = problem(num_tokens, 2048, 128, torch.bfloat16, seed=num_tokens)
    x, summed, ids, weights = add_norm_router_topk(*inputs, 1e-6, 8, True)
    rx, rsummed, rids, rweights = add_norm_router_topk_reference(*inputs, 1e-6, 8, True)
    assert torch.equal(summed, rsummed)
    assert rel_err(x, rx) < 1e-2
    assert (ids == rids).float().mean() > 0.95          # bf16 ties may order differently
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = add_norm_router_topk(*inputs, 1e-6, 8, True)
    graph.replay()
    graph.replay()
    assert torch.equal(out[2], ids) and torch.equal(out[3], weights)
