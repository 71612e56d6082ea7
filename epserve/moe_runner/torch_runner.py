"""Reference MoE runner in plain torch: sort assignments by slot, loop over hit slots.

Legend: T tokens, D hidden size, I intermediate size, S local slots, K top-k.
Works in every dtype (float64 included), on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.moe_runner.base import register_backend


class TorchMoERunner:
    name = "torch"
    capturable = False          # loops over the slots hit, found on the host

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K], weights [T, K], w13 [S, 2I, D], w2 [S, D, I] → [T, D]."""
        num_tokens, top_k = slot_ids.shape
        inter = w2.shape[2]
        out = torch.zeros_like(hidden)
        flat_slots = slot_ids.reshape(-1)                                   # [T*K]
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
            gate_up = F.linear(hidden[tokens], w13[slot])                    # [n, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            expert_out = F.linear(act, w2[slot])                             # [n, D]
            scale = weights.reshape(-1)[rows].unsqueeze(1).to(expert_out.dtype)
            out.index_add_(0, tokens, (expert_out * scale).to(out.dtype))
        return out


register_backend("torch", lambda config: TorchMoERunner())
