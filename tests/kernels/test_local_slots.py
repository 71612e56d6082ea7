"""The expert's share of a step's routing in one kernel, against the torch composition."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.local_slots import local_slots, local_slots_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,k,slots,workers", [(1, 8, 130, 1), (3, 2, 5, 3), (37, 8, 64, 4), (300, 4, 7, 2)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_matches_split_by_workers_rule(n, k, slots, workers, out_dtype):
    g = torch.Generator().manual_seed(n * k + slots)
    slot_ids = torch.randint(-1, slots * workers, (n, k), generator=g).to(DEVICE)
    weights = torch.rand(n, k, generator=g).to(DEVICE)
    for worker in range(workers):
        local, local_weights = local_slots(slot_ids, weights, worker, slots, out_dtype)
        want_local, want_weights = local_slots_reference(slot_ids, weights, worker, slots, out_dtype)
        assert local.dtype == torch.int64 and local_weights.dtype == out_dtype
        assert torch.equal(local, want_local) and torch.equal(local_weights, want_weights)


def test_int32_slots_and_no_rows():
    slot_ids = torch.tensor([[0, 5, -1, 9]], dtype=torch.int32, device=DEVICE)
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=DEVICE)
    local, local_weights = local_slots(slot_ids, weights, 1, 5, torch.float32)
    assert local.tolist() == [[-1, 0, -1, 4]]
    assert local_weights[0].tolist() == pytest.approx([0.0, 0.2, 0.0, 0.4])
    empty, empty_weights = local_slots(slot_ids[:0], weights[:0], 0, 5, torch.float32)
    assert empty.shape == (0, 4) and empty_weights.shape == (0, 4)
