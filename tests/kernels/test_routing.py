"""Routing kernels (attention side) against their torch references."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.grouped_topk import grouped_topk, grouped_topk_reference
from epserve.kernels.topk_softmax import softmax_topk_renorm, softmax_topk_renorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (17, 60, 4), (64, 128, 8), (3, 5, 5)])
def test_softmax_topk_renorm(num_tokens, num_experts, top_k):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(top_k)).to(DEVICE)
    weights, ids = softmax_topk_renorm(logits, top_k)
    ref_w, ref_ids = softmax_topk_renorm_reference(logits, top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens,num_experts,groups,topk_group,top_k",
                         [(1, 256, 8, 4, 8), (17, 48, 6, 3, 5), (64, 64, 4, 2, 6), (3, 18, 3, 1, 2)])
def test_grouped_topk(num_tokens, num_experts, groups, topk_group, top_k):
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=g).to(DEVICE)
    bias = (torch.randn(num_experts, generator=g) * 0.5).to(DEVICE)
    weights, ids = grouped_topk(logits, bias, top_k, groups, topk_group, routed_scaling_factor=2.5)
    ref_w, ref_ids = grouped_topk_reference(logits, bias, top_k, groups, topk_group, 2.5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.full_like(weights[:, 0], 2.5))


def test_grouped_topk_bias_selects_but_does_not_weight():
    logits = torch.zeros(1, 8, device=DEVICE)
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 4.0], device=DEVICE)
    weights, ids = grouped_topk(logits, bias, 2, 4, 1)
    assert sorted(ids[0].tolist()) == [6, 7]
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))
