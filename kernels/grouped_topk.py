"""DeepSeek-V3 grouped top-k routing with the score-correction bias (``noaux_tc``).

Legend: T tokens, E logical experts, G expert groups (E/G experts each), K top-k.

For each token: ``scores = sigmoid(logits)``; ``biased = scores + bias`` is used for the
selection only: each group scores the sum of its two largest biased scores, the
``topk_group`` best groups are kept, and the K largest biased scores among their experts
are chosen (descending; ties go to the lower id). The weights are the *unbiased* scores of
the chosen experts, renormalised to sum to 1, times ``routed_scaling_factor``.
One program per token; no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, G, epg, topk_group, top_k,
                         scaling, stride_lt,
                         G_P2: tl.constexpr, EPG_P2: tl.constexpr, K_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_P2)
    j = tl.arange(0, EPG_P2)
    expert = g[:, None] * epg + j[None, :]                                   # [G_P2, EPG_P2]
    ok = (g[:, None] < G) & (j[None, :] < epg)
    neg = -float("inf")
    logit = tl.load(logits_ptr + t * stride_lt + expert, mask=ok, other=0.0).to(tl.float32)
    scores = tl.where(ok, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
    biased = tl.where(ok, scores + tl.load(bias_ptr + expert, mask=ok, other=0.0).to(tl.float32), neg)
    # group score: sum of the two largest biased scores in the group
    first = tl.max(biased, axis=1)
    first_at = tl.min(tl.where(biased == first[:, None], j[None, :], EPG_P2), axis=1)
    second = tl.max(tl.where(j[None, :] == first_at[:, None], neg, biased), axis=1)
    group_score = tl.where(g < G, first + second, neg)
    keep_group = g < 0
    for _ in range(topk_group):
        best = tl.max(group_score, axis=0)
        pick = tl.min(tl.where(group_score == best, g, G_P2), axis=0)
        keep_group = keep_group | (g == pick)
        group_score = tl.where(g == pick, neg, group_score)
    cand = tl.where(keep_group[:, None], biased, neg)
    ks = tl.arange(0, K_P2)
    vals = tl.zeros([K_P2], dtype=tl.float32)
    ids = tl.zeros([K_P2], dtype=tl.int32)
    for k in range(top_k):
        best = tl.max(tl.max(cand, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(cand == best, expert, 2147483647), axis=1), axis=0)
        unbiased = tl.sum(tl.sum(tl.where(expert == pick, scores, 0.0), axis=1), axis=0)
        vals = tl.where(ks == k, unbiased, vals)
        ids = tl.where(ks == k, pick, ids)
        cand = tl.where(expert == pick, neg, cand)
    vals = vals / tl.sum(vals, axis=0) * scaling
    tl.store(weights_ptr + t * top_k + ks, vals, mask=ks < top_k)
    tl.store(ids_ptr + t * top_k + ks, ids, mask=ks < top_k)


def _check(logits, bias, num_expert_group, topk_group, top_k) -> None:
    assert logits.dim() == 2, f"logits must be [T, E], got {tuple(logits.shape)}"
    num_experts = logits.shape[1]
    assert bias.shape == (num_experts,), f"bias must be [E={num_experts}], got {tuple(bias.shape)}"
    assert num_experts % num_expert_group == 0, "E must be a multiple of num_expert_group"
    assert 1 <= topk_group <= num_expert_group, "topk_group must be in [1, num_expert_group]"
    per_group = num_experts // num_expert_group
    assert per_group >= 2, "each group needs at least 2 experts (top-2 group score)"
    assert 1 <= top_k <= topk_group * per_group, "top_k exceeds the experts of the kept groups"


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, num_expert_group: int,
                 topk_group: int, routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], bias [E] → (weights [T, K] float32, ids [T, K] int32)."""
    _check(logits, bias, num_expert_group, topk_group, top_k)
    num_tokens, num_experts = logits.shape
    per_group = num_experts // num_expert_group
    logits, bias = logits.contiguous(), bias.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        _grouped_topk_kernel[(num_tokens,)](
            logits, bias, weights, ids, num_experts, num_expert_group, per_group, topk_group, top_k,
            float(routed_scaling_factor), logits.stride(0),
            G_P2=triton.next_power_of_2(num_expert_group), EPG_P2=triton.next_power_of_2(per_group),
            K_P2=triton.next_power_of_2(top_k))
    return weights, ids


def grouped_topk_reference(logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                           num_expert_group: int, topk_group: int,
                           routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``biased_grouped_topk_impl`` (renormalised), in float32, ids sorted by biased score."""
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid()
    biased = scores + bias.float()[None, :]
    group_scores = biased.view(num_tokens, num_expert_group, -1).topk(2, dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.repeat_interleave(num_experts // num_expert_group, dim=1).bool()
    _, ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1)
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(-1, keepdim=True) * routed_scaling_factor
    return weights, ids.to(torch.int32)
