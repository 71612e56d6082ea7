"""Slot alignment: counts, padded offsets and the members of each slot's segment."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.moe_align import SINGLE_PROGRAM_MAX_ASSIGNMENTS, align_by_slot, align_by_slot_reference
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


def test_counters_are_left_zeroed_for_the_next_call():
    """No memset per call: the count kernel re-zeroes its workspace, so alignments of
    different routings one after another are each exact."""
    from epserve.kernels.moe_align import _counters
    num_slots = 21
    for seed in range(3):
        _, slot_ids, *_ = make_problem(150 + 40 * seed, 8, num_slots, 8, 8, torch.float32, DEVICE,
                                       hit_slots=num_slots - seed, elsewhere=0.2, seed=seed)
        assert slot_ids.numel() > SINGLE_PROGRAM_MAX_ASSIGNMENTS
        check_alignment(slot_ids, num_slots, 16)
        assert not _counters(slot_ids.device, num_slots).any()  # the default stride
