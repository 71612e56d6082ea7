"""What the grouped gate_up (``moe_gate_up.py``) and down (``moe_down.py``) GEMMs share: their
tile configs, and the device functions that map a program to its tile of a slot-aligned layout.

Legend: S local slots, BM/BN/BK tile sizes, HALF = BM / 2.

Layouts (``moe_align.SlotAlignment``): each slot's rows form a segment padded to BM
(``block_slot``: the slot owning the BM block at a row) or, for the split configs, to HALF
(``split_tile``: the pid-th tile, full height or a segment's odd last half; ``split_layout`` and
``nth_tile`` for persistent programs that walk many tiles). ``grouped_tile`` orders tiles
GROUP_M row tiles at a time so their weight tiles share L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.moe_align import SlotAlignment


@triton.jit
def dot_acc(a, b, acc):
    """acc + a @ b; float32 operands multiply exactly (no TF32: float32 is the reference path)."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class TmaGemmConfig(GemmConfig):
    """Same tiles; the weight tiles (and contiguous A tiles) load through the TMA engine.

    ``tma_store``: the output tile leaves through a TMA store too (no [BM, BN] pointer tensor
    in registers). For down this writes rows in slot-sorted padded order, [cap, D], and the
    combine reads them through ``SlotAlignment.positions``."""
    tma_store: bool = False


@dataclass(frozen=True)
class SplitTmaGemmConfig(TmaGemmConfig):
    """TMA tiles of block_m rows over segments padded to block_m / 2 (odd remainder: half tile)."""


@dataclass(frozen=True)
class PersistentSplitTmaGemmConfig(SplitTmaGemmConfig):
    """The split tiles, run by ``ctas_per_sm`` programs per SM that each loop over tiles
    (full-height tiles first, then the half-height ones). With ``flatten`` the compiler
    pipelines across tile boundaries: the next tile's loads are in flight during this tile's
    epilogue (a short-K GEMM such as down spends a large share of each tile there)."""
    ctas_per_sm: int = 1
    flatten: bool = True


def alignment_block(config: GemmConfig) -> int:
    """Rows each slot's segment is padded to for this GEMM config."""
    return config.block_m // 2 if isinstance(config, SplitTmaGemmConfig) else config.block_m


def slot_block(num_slots: int) -> int:
    """Power-of-2 width for the per-program slot lookup (at least 128: one compile serves most S)."""
    return max(128, triton.next_power_of_2(num_slots))


@triton.jit
def block_slot(offsets_ptr, counts_ptr, m_start, num_slots, S_P2: tl.constexpr):
    """Slot owning the block that starts at m_start, its segment start and count (-1 if past the end)."""
    s = tl.arange(0, S_P2)
    ends = tl.load(offsets_ptr + 1 + s, mask=s < num_slots, other=2147483647)
    slot = tl.sum((ends <= m_start).to(tl.int32), axis=0)
    total = tl.load(offsets_ptr + num_slots)
    slot = tl.where(m_start < total, slot, -1)
    safe = tl.maximum(slot, 0)
    return slot, tl.load(offsets_ptr + safe), tl.load(counts_ptr + safe)


@triton.jit
def split_tile(offsets_ptr, counts_ptr, pid_m, num_slots, S_P2: tl.constexpr, HALF: tl.constexpr):
    """The pid_m-th tile of 2·HALF rows over segments padded to HALF (a segment's odd last
    half-block is a tile of its own): slot (-1 past the last tile), first row, segment start,
    count, and whether the tile is full height. Every pid below the total is a real tile, so
    no program is launched for the odd half-blocks (call 6: they were half the grid)."""
    s = tl.arange(0, S_P2)
    in_range = s < num_slots
    starts = tl.load(offsets_ptr + s, mask=in_range, other=0)
    ends = tl.load(offsets_ptr + 1 + s, mask=in_range, other=0)
    tiles = ((ends - starts) // HALF + 1) // 2
    tile_ends = tl.cumsum(tiles, axis=0)
    slot = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    here = s == slot
    first_tile = tl.sum(tl.where(here, tile_ends - tiles, 0), axis=0)
    seg_start = tl.sum(tl.where(here, starts, 0), axis=0)
    seg_end = tl.sum(tl.where(here, ends, 0), axis=0)
    m_start = seg_start + (pid_m - first_tile) * (2 * HALF)
    slot = tl.where(slot < num_slots, slot, -1)
    count = tl.load(counts_ptr + tl.maximum(slot, 0))
    return slot, m_start, seg_start, count, seg_end - m_start >= 2 * HALF


def split_tiles_bound(align: SlotAlignment, tile_rows: int) -> int:
    """Upper bound on the split kernels' tiles along M (no host sync): each hit slot's tiles
    number ceil(count / tile_rows), so at most cdiv(A, tile_rows) + min(S, A) in all."""
    half_blocks = align.sorted_ids.numel() // (tile_rows // 2)
    if align.positions is None:
        return half_blocks
    num_assignments, num_slots = align.positions.numel(), align.slot_counts.numel()
    return min(half_blocks, triton.cdiv(num_assignments, tile_rows) + min(num_slots, num_assignments))


@triton.jit
def split_layout(offsets_ptr, counts_ptr, num_slots, S_P2: tl.constexpr, HALF: tl.constexpr):
    """Per-slot vectors [S_P2] of a split alignment, for programs that walk many tiles:
    segment starts, counts, full-height tiles, and the running ends of full and half tiles."""
    s = tl.arange(0, S_P2)
    in_range = s < num_slots
    starts = tl.load(offsets_ptr + s, mask=in_range, other=0)
    ends = tl.load(offsets_ptr + 1 + s, mask=in_range, other=0)
    counts = tl.load(counts_ptr + s, mask=in_range, other=0)
    halves = (ends - starts) // HALF
    fulls = halves // 2
    return starts, counts, fulls, tl.cumsum(fulls, axis=0), tl.cumsum(halves - 2 * fulls, axis=0)


@triton.jit
def nth_tile(pid_m, tile_ends, starts, counts, fulls, S_P2: tl.constexpr, HALF: tl.constexpr,
              FULL: tl.constexpr):
    """The pid_m-th full-height tile (FULL) or half-height tile (not FULL) of a split layout:
    slot, first row, segment start and count. A slot's odd half-block follows its full tiles."""
    s = tl.arange(0, S_P2)
    slot = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    here = s == slot
    seg_start = tl.sum(tl.where(here, starts, 0), axis=0)
    full_tiles = tl.sum(tl.where(here, fulls, 0), axis=0)
    if FULL:
        m_start = seg_start + (pid_m - tl.sum(tl.where(here, tile_ends - fulls, 0), axis=0)) * (2 * HALF)
    else:
        m_start = seg_start + full_tiles * (2 * HALF)
    return slot, m_start, seg_start, tl.sum(tl.where(here, counts, 0), axis=0)


@triton.jit
def persistent_layout(offsets_ptr, counts_ptr, num_slots, S_P2: tl.constexpr, HALF: tl.constexpr):
    """``split_layout`` and its number of full-height row tiles, for persistent programs: (layout, num_full)."""
    layout = split_layout(offsets_ptr, counts_ptr, num_slots, S_P2, HALF)
    return layout, tl.sum(layout[2], axis=0)


@triton.jit
def persistent_full_tile(tile, layout, num_full, num_pid_n, S_P2: tl.constexpr, HALF: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """A persistent program's tile-th full-height tile (grouped) → (slot, m_start, seg_start, seg_count, pid_n)."""
    starts, counts, fulls, full_ends, _ = layout
    pid_m, pid_n = grouped_tile(tile, num_full, num_pid_n, GROUP_M)
    slot, m_start, seg_start, seg_count = nth_tile(pid_m, full_ends, starts, counts, fulls, S_P2, HALF, True)
    return slot, m_start, seg_start, seg_count, pid_n


@triton.jit
def persistent_half_tiles(layout, num_full, num_pid_n, NUM_PROGS: tl.constexpr):
    """(this program's first half-height tile, the number of them): the programs that ran one full tile
    fewer take the half tiles first."""
    pid = tl.program_id(0)
    first = (pid + NUM_PROGS - (num_full * num_pid_n) % NUM_PROGS) % NUM_PROGS
    return first, tl.max(layout[4], axis=0) * num_pid_n


@triton.jit
def persistent_half_tile(tile, layout, num_pid_n, S_P2: tl.constexpr, HALF: tl.constexpr):
    """The tile-th half-height tile → (slot, m_start, seg_start, seg_count, pid_n)."""
    starts, counts, fulls, _, odd_ends = layout
    slot, m_start, seg_start, seg_count = nth_tile(tile // num_pid_n, odd_ends, starts, counts, fulls, S_P2, HALF,
                                                    False)
    return slot, m_start, seg_start, seg_count, tile % num_pid_n


@triton.jit
def grouped_pid(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    return grouped_tile(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile pid → (pid_m, pid_n), GROUP_M row tiles at a time so their weight tiles share L2."""
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


def programs_for(config: GemmConfig, device: torch.device, tiles_bound: int) -> int:
    """Programs a persistent config launches: ctas_per_sm per SM (4 in the CPU interpreter),
    never more than there can be tiles."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    return max(1, min(sms * config.ctas_per_sm, tiles_bound))
