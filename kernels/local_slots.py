"""One expert worker's share of a step's routing, in one kernel (the ``cuda_ipc`` step path).

Legend: n tokens, K choices per token, S slots per worker, w this worker.

``local[t, k] = slot_ids[t, k] - w·S`` where this worker owns the slot (``slot_ids[t, k] // S == w``,
slot ≥ 0), else -1; ``local_weights[t, k]`` the choice's weight there, else 0, in ``out_dtype`` —
``split_by_worker``'s rule on all n rows, which the step path sends unsplit to every worker.
Composed from torch this is ~8 elementwise launches per MoE layer on the expert's side of every
step; as one kernel it is one node of the expert's CUDA graph. ``local_slots_reference`` is the
torch composition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

BLOCK = 1024


@triton.jit
def local_slots_block(slot_ptr, weight_ptr, local_ptr, local_weight_ptr, numel, base, slots_per_worker, block,
                      BLOCK: tl.constexpr, VOLATILE: tl.constexpr):
    """Choices [block · BLOCK, (block + 1) · BLOCK); VOLATILE: read past L1 (written by another process during
    this launch, ``epserve/dataplane/cuda_ipc_handoff.py``)."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    slot = tl.load(slot_ptr + offs, mask=ok, other=-1, volatile=VOLATILE).to(tl.int64)
    weight = tl.load(weight_ptr + offs, mask=ok, other=0.0, volatile=VOLATILE)
    mine = (slot >= base) & (slot < base + slots_per_worker)
    tl.store(local_ptr + offs, tl.where(mine, slot - base, -1), mask=ok)
    tl.store(local_weight_ptr + offs, tl.where(mine, weight, 0.0).to(local_weight_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["numel", "base", "slots_per_worker"])
def _local_slots_kernel(slot_ptr, weight_ptr, local_ptr, local_weight_ptr, numel, base, slots_per_worker,
                        BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """base = worker · S (scalars never specialised: a value of 1 would turn into a constexpr)."""
    pdl_wait(USE_PDL)
    local_slots_block(slot_ptr, weight_ptr, local_ptr, local_weight_ptr, numel, base, slots_per_worker,
                      tl.program_id(0), BLOCK, False)


def local_slots(slot_ids: torch.Tensor, weights: torch.Tensor, worker: int, slots_per_worker: int,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_ids [n, K] (int, -1 = none), weights [n, K] → (local [n, K] int64, local_weights [n, K] out_dtype)."""
    assert slot_ids.shape == weights.shape and slot_ids.dim() == 2, "slot_ids and weights must both be [n, K]"
    assert not slot_ids.dtype.is_floating_point and slots_per_worker > 0 and worker >= 0
    slot_ids, weights = slot_ids.contiguous(), weights.contiguous()
    local = torch.empty(slot_ids.shape, dtype=torch.int64, device=slot_ids.device)
    local_weights = torch.empty(slot_ids.shape, dtype=out_dtype, device=slot_ids.device)
    numel = slot_ids.numel()
    if numel:
        _local_slots_kernel[(triton.cdiv(numel, BLOCK),)](
            slot_ids, weights, local, local_weights, numel, worker * slots_per_worker, slots_per_worker, BLOCK=BLOCK,
            **launch_options(pdl_enabled(slot_ids.device)))
    return local, local_weights


def local_slots_reference(slot_ids: torch.Tensor, weights: torch.Tensor, worker: int, slots_per_worker: int,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mine = (slot_ids >= 0) & (slot_ids // slots_per_worker == worker)
    local = torch.where(mine, slot_ids.to(torch.int64) - worker * slots_per_worker, -1)
    return local, torch.where(mine, weights, 0).to(out_dtype)
