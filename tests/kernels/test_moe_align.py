"""Slot alignment: counts, padded offsets and the members of each slot's segment."""

from __future__ import annotations

import pytest
import torch

from kernels.moe_align import SINGLE_PROGRAM_MAX_ASSIGNMENTS, align_by_slot, align_by_slot_reference
from kernel_test_utils import make_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_alignment(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> None:
    align = align_by_slot(slot_ids, num_slots, block_m)
    members, offsets, counts = align_by_slot_reference(slot_ids, num_slots, block_m)
    assert torch.equal(align.slot_counts.cpu(), counts)
    assert torch.equal(align.slot_offsets.cpu(), offsets)
    assert int(offsets[-1]) <= align.sorted_ids.numel()
    assert align.sorted_ids.numel() % block_m == 0
    sorted_ids = align.sorted_ids.cpu()
    for s in range(num_slots):
        start = int(offsets[s])
        got = sorted(sorted_ids[start:start + int(counts[s])].tolist())
        assert got == members[s], f"slot {s}"


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_small(num_tokens, block_m):
    _, slot_ids, *_ = make_problem(num_tokens, 4, 13, 8, 8, torch.float32, DEVICE, hit_slots=10,
                                   elsewhere=0.4, seed=num_tokens)
    check_alignment(slot_ids, 13, block_m)


def test_align_all_elsewhere():
    slot_ids = torch.full((5, 3), -1, dtype=torch.int32, device=DEVICE)
    align = align_by_slot(slot_ids, 6, 16)
    assert align.slot_counts.cpu().tolist() == [0] * 6
    assert align.slot_offsets.cpu().tolist() == [0] * 7


def test_align_large_uses_multi_program_path():
    num_tokens, top_k = SINGLE_PROGRAM_MAX_ASSIGNMENTS // 8 + 37, 8
    _, slot_ids, *_ = make_problem(num_tokens, top_k, 33, 8, 8, torch.float32, DEVICE, hit_slots=30,
                                   elsewhere=0.5, seed=1)
    assert slot_ids.numel() > SINGLE_PROGRAM_MAX_ASSIGNMENTS
    check_alignment(slot_ids.to(torch.int64), 33, 16)


@pytest.mark.parametrize("num_slots,num_tokens", [(33, 200), (300, 200), (128, 1100)])
def test_multi_program_path_segments_and_positions(num_slots, num_tokens):
    """Several programs (and, at 300 slots, a wide slot vector): each slot's segment holds
    exactly its assignments and the positions invert the segments."""
    _, slot_ids, *_ = make_problem(num_tokens, 8, num_slots, 8, 8, torch.float32, DEVICE,
                                   hit_slots=num_slots - 3, elsewhere=0.3, seed=num_slots)
    assert slot_ids.numel() > SINGLE_PROGRAM_MAX_ASSIGNMENTS
    first = align_by_slot(slot_ids, num_slots, 16)
    members, offsets, counts = align_by_slot_reference(slot_ids, num_slots, 16)
    assert torch.equal(first.slot_offsets.cpu(), offsets) and torch.equal(first.slot_counts.cpu(), counts)
    sorted_ids = first.sorted_ids.cpu()
    for s in range(num_slots):
        start = int(offsets[s])
        assert sorted(sorted_ids[start:start + int(counts[s])].tolist()) == members[s], f"slot {s}"
    positions = first.positions.cpu().long()
    flat = slot_ids.reshape(-1).cpu()
    assert torch.equal(positions < 0, flat < 0)
    local = (flat >= 0).nonzero().squeeze(1)
    assert torch.equal(sorted_ids.long()[positions[local]], local)


def split_tiles_reference(offsets: torch.Tensor, counts: torch.Tensor, half: int) -> list[tuple[int, int, int, int]]:
    """(slot, first row, real rows, full height) of every split tile, in slot order."""
    out = []
    for s in range(counts.numel()):
        start, end, count = int(offsets[s]), int(offsets[s + 1]), int(counts[s])
        for m in range(start, end, 2 * half):
            out.append((s, m, max(0, min(start + count - m, 2 * half)), int(end - m >= 2 * half)))
    return out


@pytest.mark.parametrize("num_slots,num_tokens,half", [(9, 3, 16), (13, 90, 16), (33, 200, 8), (300, 200, 16),
                                                        (128, 1100, 64)])
def test_tile_table_lists_every_split_tile(num_slots, num_tokens, half):
    """The split tile table: one row per tile in slot order, then -1 rows up to the bound."""
    from kernels.moe_align import split_tile_count
    _, slot_ids, *_ = make_problem(num_tokens, 4, num_slots, 8, 8, torch.float32, DEVICE,
                                   hit_slots=max(num_slots - 3, 1), elsewhere=0.3, seed=num_slots + num_tokens)
    align = align_by_slot(slot_ids, num_slots, half, tiles=True)
    _, offsets, counts = align_by_slot_reference(slot_ids, num_slots, half)
    expected = split_tiles_reference(offsets, counts, half)
    table = align.tiles.cpu()
    bound = split_tile_count(slot_ids.numel(), num_slots, align.sorted_ids.numel(), half)
    assert table.shape == (max(bound, 1), 4) and len(expected) <= bound
    assert [tuple(r) for r in table[:len(expected)].tolist()] == expected
    assert (table[len(expected):bound, 0] == -1).all()


def test_counters_are_left_zeroed_for_the_next_call():
    """No memset per call: the count kernel re-zeroes its workspace, so alignments of
    different routings one after another are each exact."""
    from kernels.moe_align import _counters
    num_slots = 21
    for seed in range(3):
        _, slot_ids, *_ = make_problem(150 + 40 * seed, 8, num_slots, 8, 8, torch.float32, DEVICE,
                                       hit_slots=num_slots - seed, elsewhere=0.2, seed=seed)
        assert slot_ids.numel() > SINGLE_PROGRAM_MAX_ASSIGNMENTS
        check_alignment(slot_ids, num_slots, 16)
        assert not _counters(slot_ids.device, num_slots).any()
