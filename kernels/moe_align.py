"""Token permutation and block alignment by physical slot (compact).

Legend: T tokens, K top-k, A = T*K assignments (a = t*K + k), S local slots, BM block rows.

The grouped GEMMs process rows in blocks of BM that all belong to one slot. This module
sorts the assignments by slot and pads each slot's segment to a multiple of BM:

- ``sorted_ids [cap]`` int32: the assignment index at each padded position. Positions past
  a slot's count are padding and are never read (the GEMMs mask rows by ``slot_counts``).
- ``slot_offsets [S + 1]`` int32: where each slot's padded segment starts;
  ``slot_offsets[S]`` is the padded total.
- ``slot_counts [S]`` int32: assignments per slot.
- ``positions [A]`` int32: the padded position of each assignment (-1 if served elsewhere),
  the inverse of ``sorted_ids``; the combine reads rows written in sorted order through it.

Assignments whose slot is -1 (served by another shard) are dropped here, so no GEMM row is
computed, written or read for them. ``cap`` is the padded total in the worst case
(``A + min(S, A) * (BM - 1)``), fixed by the shapes alone: no host sync, so the launch
path is CUDA-graph capturable. The order of assignments inside a slot follows atomic
arrival (it does not change any result: GEMM rows are independent).

Two paths, picked by size: one program for small batches (one launch); otherwise two
launches (count with atomics, the last program scans; then scatter), since a single program
serialises the atomics (15 us at 2048 assignments on an H200). The counters live in a
workspace kept per (device, S) that the count kernel's last program leaves zeroed again, so
no memset runs per call; alignments on one device and S must therefore be stream-ordered
(one in flight at a time), as they are in a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.counters import zeroed_counters
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_wait

SINGLE_PROGRAM_MAX_ASSIGNMENTS = 512


@dataclass(frozen=True)
class SlotAlignment:
    sorted_ids: torch.Tensor     # [cap] int32
    slot_offsets: torch.Tensor   # [S + 1] int32
    slot_counts: torch.Tensor    # [S] int32
    block_m: int
    positions: torch.Tensor | None = None   # [A] int32, -1 = elsewhere

    @property
    def num_blocks(self) -> int:
        """Upper bound on the number of BM-row blocks (the GEMMs' grid along M)."""
        return self.sorted_ids.numel() // self.block_m


def padded_capacity(num_assignments: int, num_slots: int, block_m: int) -> int:
    cap = num_assignments + min(num_slots, num_assignments) * (block_m - 1)
    return max(triton.cdiv(cap, block_m), 1) * block_m


# Counter i lives at int32 index i * COUNTER_STRIDE (256 bytes apart): every counting atomic
# returns a rank, and counters packed into a few cache lines serialise all A of them in a few
# L2 slices; spread out, the slots' counters are served in parallel.
COUNTER_STRIDE = 64

def _counters(device: torch.device, num_slots: int, stride: int = COUNTER_STRIDE) -> torch.Tensor:
    """[(S + 1) * stride] int32 zeros (per-slot counts, then the done ticket, ``stride`` apart); the count
    kernel zeroes them again when it finishes (``kernels/counters.py``: per device and stream, kept)."""
    return zeroed_counters("moe_align", device, (num_slots + 1) * stride)


@triton.jit(do_not_specialize=["num_assignments"])
def _align_single_kernel(slot_ids_ptr, sorted_ids_ptr, offsets_ptr, counts_ptr, rank_ptr, pos_ptr,
                         num_assignments, num_slots, block_m,
                         S_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """One program: count (ranks from atomics), scan, scatter."""
    pdl_wait(USE_PDL)
    slots = tl.arange(0, S_P2)
    tl.store(counts_ptr + slots, tl.zeros([S_P2], dtype=tl.int32), mask=slots < num_slots)
    tl.debug_barrier()
    for start in range(0, num_assignments, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        s = tl.load(slot_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
        valid = s >= 0
        rank = tl.atomic_add(counts_ptr + s, 1, mask=valid)
        tl.store(rank_ptr + offs, rank, mask=valid)
    tl.debug_barrier()
    counts = tl.load(counts_ptr + slots, mask=slots < num_slots, other=0, volatile=True)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, axis=0)
    tl.store(offsets_ptr + 1 + slots, ends, mask=slots < num_slots)
    tl.store(offsets_ptr, 0)
    tl.debug_barrier()
    for start in range(0, num_assignments, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        s = tl.load(slot_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
        valid = s >= 0
        rank = tl.load(rank_ptr + offs, mask=valid, other=0, volatile=True)
        base = tl.load(offsets_ptr + s, mask=valid, other=0, volatile=True)
        tl.store(sorted_ids_ptr + base + rank, offs, mask=valid)
        tl.store(pos_ptr + offs, tl.where(valid, base + rank, -1), mask=offs < num_assignments)


@triton.jit(do_not_specialize=["num_assignments"])
def _count_scan_kernel(slot_ids_ptr, counters_ptr, counts_ptr, rank_ptr, offsets_ptr, num_assignments,
                       num_slots, block_m, S_P2: tl.constexpr, CHUNK: tl.constexpr, STRIDE: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """Count (ranks from atomics on the zeroed ``counters``: S counts, then a done ticket);
    the last program to finish writes ``counts`` and the scanned offsets, then zeroes the
    counters for the next call (every other program is done with them by then)."""
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    s = tl.load(slot_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
    valid = s >= 0
    rank = tl.atomic_add(counters_ptr + s * STRIDE, 1, mask=valid)
    tl.store(rank_ptr + offs, rank, mask=valid)
    ticket = tl.atomic_add(counters_ptr + num_slots * STRIDE, 1)   # acq_rel: orders this program's counts
    if ticket == tl.num_programs(0) - 1:
        slots = tl.arange(0, S_P2)
        in_range = slots < num_slots
        counts = tl.atomic_xchg(counters_ptr + slots * STRIDE, 0, mask=in_range)     # read and re-zero
        counts = tl.where(in_range, counts, 0)
        tl.store(counts_ptr + slots, counts, mask=in_range)
        padded = (counts + block_m - 1) // block_m * block_m
        tl.store(offsets_ptr + 1 + slots, tl.cumsum(padded, axis=0), mask=in_range)
        tl.store(offsets_ptr, 0)
        tl.atomic_xchg(counters_ptr + num_slots * STRIDE, 0)


@triton.jit(do_not_specialize=["num_assignments"])
def _scatter_kernel(slot_ids_ptr, sorted_ids_ptr, offsets_ptr, rank_ptr, pos_ptr, num_assignments,
                    CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    s = tl.load(slot_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
    valid = s >= 0
    rank = tl.load(rank_ptr + offs, mask=valid, other=0)
    base = tl.load(offsets_ptr + s, mask=valid, other=0)
    tl.store(sorted_ids_ptr + base + rank, offs, mask=valid)
    tl.store(pos_ptr + offs, tl.where(valid, base + rank, -1), mask=offs < num_assignments)


def align_by_slot(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> SlotAlignment:
    """slot_ids [T, K] int (-1 = elsewhere) → SlotAlignment. No host sync."""
    assert slot_ids.dim() == 2, f"slot_ids must be [T, K], got {tuple(slot_ids.shape)}"
    assert not slot_ids.dtype.is_floating_point, "slot_ids must be an integer tensor"
    assert num_slots >= 1 and block_m >= 1
    slot_ids = slot_ids.contiguous()
    device = slot_ids.device
    num_assignments = slot_ids.numel()
    cap = padded_capacity(num_assignments, num_slots, block_m)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=device)
    offsets = torch.empty(num_slots + 1, dtype=torch.int32, device=device)
    rank = torch.empty(max(num_assignments, 1), dtype=torch.int32, device=device)
    positions = torch.empty(num_assignments, dtype=torch.int32, device=device)
    s_p2 = triton.next_power_of_2(num_slots)
    pdl = launch_options(pdl_enabled(device))
    counts = torch.empty(num_slots, dtype=torch.int32, device=device)
    if num_assignments <= SINGLE_PROGRAM_MAX_ASSIGNMENTS:
        _align_single_kernel[(1,)](slot_ids, sorted_ids, offsets, counts, rank, positions,
                                   num_assignments, num_slots, block_m,
                                   S_P2=s_p2, CHUNK=512, num_warps=4, **pdl)
    else:
        chunk = 256
        grid = (triton.cdiv(max(num_assignments, 1), chunk),)
        _count_scan_kernel[grid](slot_ids, _counters(device, num_slots, COUNTER_STRIDE), counts, rank, offsets,
                                 num_assignments, num_slots, block_m, S_P2=s_p2, CHUNK=chunk,
                                 STRIDE=COUNTER_STRIDE, num_warps=4, **pdl)
        _scatter_kernel[grid](slot_ids, sorted_ids, offsets, rank, positions, num_assignments,
                              CHUNK=chunk, num_warps=4, **pdl)
    return SlotAlignment(sorted_ids, offsets, counts, block_m, positions)


def align_by_slot_reference(slot_ids: torch.Tensor, num_slots: int,
                            block_m: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Pure torch: per slot, the sorted list of its assignment indices; offsets; counts."""
    flat = slot_ids.reshape(-1).long().cpu()
    members = [sorted((flat == s).nonzero().squeeze(1).tolist()) for s in range(num_slots)]
    counts = torch.tensor([len(m) for m in members], dtype=torch.int32)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(num_slots + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(padded, 0)
    return members, offsets, counts
