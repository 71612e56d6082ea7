"""Shared helpers for the kernel tests: random MoE problems and a relative error."""

from __future__ import annotations

import torch

# Relative (Frobenius) error bounds against a float64 reference, per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_problem(num_tokens: int, top_k: int, num_slots: int, dim: int, inter: int,
                 dtype: torch.dtype, device: str = "cpu", hit_slots: int | None = None,
                 elsewhere: float = 0.3, seed: int = 0):
    """Random hidden/weights; slot ids drawn from the first ``hit_slots`` slots (others never
    hit), distinct per token, with a fraction ``elsewhere`` of choices set to -1."""
    g = torch.Generator().manual_seed(seed)
    hit_slots = num_slots if hit_slots is None else hit_slots
    hidden = torch.randn(num_tokens, dim, generator=g).to(dtype)
    w13 = (torch.randn(num_slots, 2 * inter, dim, generator=g) / dim ** 0.5).to(dtype)
    w2 = (torch.randn(num_slots, dim, inter, generator=g) / inter ** 0.5).to(dtype)
    scores = torch.rand(num_tokens, hit_slots, generator=g)
    slot_ids = scores.topk(min(top_k, hit_slots), dim=1).indices
    if slot_ids.shape[1] < top_k:
        pad = torch.full((num_tokens, top_k - slot_ids.shape[1]), -1, dtype=slot_ids.dtype)
        slot_ids = torch.cat([slot_ids, pad], dim=1)
    slot_ids[torch.rand(num_tokens, top_k, generator=g) < elsewhere] = -1
    weights = torch.rand(num_tokens, top_k, generator=g)
    tensors = (hidden, slot_ids.to(torch.int32), weights, w13, w2)
    return tuple(t.to(device) for t in tensors)
