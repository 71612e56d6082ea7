"""The latent cache's store: a step's latents and rotated keys into their rows (multi-head latent attention).

Legend: T tokens of the step, C kv_lora_rank, Dr qk_rope_head_dim, N cache blocks, Bs tokens per block.

``mla_store_latent``: grid (T,), cache row ``slot_mapping[t]`` (flat ``block * Bs + offset``) = latent[t] ++
k_rope[t]; a slot of -1 (a padding row of a CUDA graph's bucket) stores nothing. No host sync.
``mla_store_latent_reference`` is the torch composition. The attention kernels that read these rows:
``mla_attention.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait


@triton.jit
def _store_latent_kernel(latent_ptr, rope_ptr, cache_ptr, slot_ptr, stride_lt, stride_rt,
                         C: tl.constexpr, C_P: tl.constexpr, DR: tl.constexpr, DR_P: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """grid (T,): cache row ``slot_mapping[t]`` = latent[t] ++ k_rope[t]; slot -1 stores nothing."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    row = cache_ptr + slot * (C + DR)
    offs_c = tl.arange(0, C_P)
    offs_r = tl.arange(0, DR_P)
    tl.store(row + offs_c, tl.load(latent_ptr + t * stride_lt + offs_c, mask=offs_c < C), mask=offs_c < C)
    tl.store(row + C + offs_r, tl.load(rope_ptr + t * stride_rt + offs_r, mask=offs_r < DR), mask=offs_r < DR)


def mla_store_latent(latent: torch.Tensor, k_rope: torch.Tensor, cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """latent [T, C], k_rope [T, Dr] (rotated) → cache [N, Bs, C + Dr] (contiguous) rows at
    ``slot_mapping`` [T] (flat slot ``block * Bs + offset``; -1: skipped)."""
    num_tokens, latent_dim = latent.shape
    rope_dim = k_rope.shape[1]
    assert k_rope.shape[0] == num_tokens and slot_mapping.shape == (num_tokens,), \
        f"latent [T, C], k_rope [T, Dr], slot_mapping [T] disagree: {tuple(latent.shape)}, {tuple(k_rope.shape)}, " \
        f"{tuple(slot_mapping.shape)}"
    assert cache.is_contiguous() and cache.shape[2] == latent_dim + rope_dim, \
        f"cache must be contiguous [N, Bs, C + Dr = {latent_dim + rope_dim}], got {tuple(cache.shape)}"
    assert latent.dtype == k_rope.dtype == cache.dtype, \
        f"latent, k_rope, cache dtypes differ: {latent.dtype}, {k_rope.dtype}, {cache.dtype}"
    assert latent.stride(1) == 1 and k_rope.stride(1) == 1, "latent and k_rope rows must be contiguous"
    if num_tokens == 0:
        return
    _store_latent_kernel[(num_tokens,)](
        latent, k_rope, cache, slot_mapping, latent.stride(0), k_rope.stride(0),
        C=latent_dim, C_P=triton.next_power_of_2(latent_dim), DR=rope_dim, DR_P=triton.next_power_of_2(rope_dim),
        num_warps=4, **launch_options(pdl_enabled(latent.device)))


def mla_store_latent_reference(latent: torch.Tensor, k_rope: torch.Tensor, cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> None:
    """Same contract in torch; host syncs."""
    keep = slot_mapping >= 0
    cache.view(-1, cache.shape[2])[slot_mapping[keep]] = torch.cat([latent, k_rope], dim=-1)[keep]
