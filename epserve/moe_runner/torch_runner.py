"""Reference MoE runner in plain torch: sort assignments by slot, loop over hit slots.

Legend: T tokens, D hidden size, I intermediate size, S local slots, K top-k.
Works in every dtype (float64 included), on CPU and GPU. ``run_clamped_swiglu`` is GPT-OSS's expert
variant (biases, clamped SwiGLU); the other runners do not have it (``expert_side.check_moe_runner``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from epserve.moe_runner.base import MoERunnerConfig


class TorchMoERunner:
    name = "torch"
    capturable = False          # loops over the slots hit, found on the host

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K], weights [T, K], w13 [S, 2I, D], w2 [S, D, I] → [T, D]."""
        inter = w2.shape[2]

        def expert(slot: int, x: torch.Tensor) -> torch.Tensor:
            gate_up = F.linear(x, w13[slot])                                 # [n, 2I]
            return F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[slot])
        return _combine(hidden, slot_ids, weights, expert)

    def run_clamped_swiglu(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                           w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor, b2: torch.Tensor,
                           alpha: float, limit: float) -> torch.Tensor:
        """GPT-OSS's experts: b13 [S, 2I], b2 [S, D] biases and the clamped SwiGLU
        ``(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)``, g = min(gate, limit), computed as transformers'
        ``GptOssExperts`` (biases added after each product) → [T, D]."""
        inter = w2.shape[2]

        def expert(slot: int, x: torch.Tensor) -> torch.Tensor:
            gate_up = F.linear(x, w13[slot]) + b13[slot]                    # [n, 2I]
            gate = gate_up[:, :inter].clamp(max=limit)
            up = gate_up[:, inter:].clamp(min=-limit, max=limit)
            return F.linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), w2[slot]) + b2[slot]
        return _combine(hidden, slot_ids, weights, expert)


def _combine(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_k weights[t, k] · expert(slot_ids[t, k], hidden[t]): assignments sorted by slot, one call per slot hit."""
    num_tokens, top_k = slot_ids.shape
    out = torch.zeros_like(hidden)
    flat_slots = slot_ids.reshape(-1)                                       # [T*K]
    keep = (flat_slots >= 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return out
    order = keep[torch.argsort(flat_slots[keep], stable=True)]
    sorted_slots = flat_slots[order]
    token_of = order // top_k
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        rows = order[start:start + count]
        tokens = token_of[start:start + count]
        start += count
        expert_out = expert(slot, hidden[tokens])                           # [n, D]
        scale = weights.reshape(-1)[rows].unsqueeze(1).to(expert_out.dtype)
        out.index_add_(0, tokens, (expert_out * scale).to(out.dtype))
    return out


def make_torch_runner(config: MoERunnerConfig) -> TorchMoERunner:
    return TorchMoERunner()                   # any device and dtype: nothing to check
