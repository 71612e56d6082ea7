"""The fused hand-off kernels of the cuda_ipc step path (epserve/dataplane/cuda_ipc_handoff.py) under
the Triton interpreter (CPU; with CUDA, compiled): the data lands (with int32 → int64 slot ids), the flag
carries the step's value, the arrival counter is back at zero for the next launch, and a wait that runs
out of budget reports its error code and still copies."""

from __future__ import annotations

import pytest
import torch

from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE
from epserve.dataplane.cuda_ipc_handoff import (BLOCK, MAX_WAITING_PROGRAMS, copy_and_signal, wait_and_copy,
                                                wait_local_slots, waiting_programs)
from epserve.kernels.local_slots import local_slots_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def words(*values: int, dtype=torch.int64) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=dtype, device=DEVICE) for v in values]


def test_copy_and_signal_copies_every_segment_then_signals_once_all_programs_arrived():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(3, BLOCK // 2 + 7, generator=g, device=DEVICE)         # 2 programs for this segment
    slots = torch.randint(-1, 50, (3, 4), generator=g, device=DEVICE, dtype=torch.int32)
    weights = torch.rand(3, 4, generator=g, device=DEVICE)
    dsts = [torch.full_like(hidden, float("nan")), torch.zeros(3, 4, dtype=torch.int64, device=DEVICE),
            torch.zeros_like(weights)]
    flag, counter = words(0, 5)
    (arrivals,) = words(0, dtype=torch.int32)
    for step in (5, 6):
        counter.fill_(step)
        copy_and_signal(list(zip([hidden, slots, weights], dsts)), flag, counter, FLAG_STEP_STRIDE, 3, arrivals)
        assert torch.equal(dsts[0], hidden) and torch.equal(dsts[1], slots.long()) and torch.equal(dsts[2], weights)
        assert int(flag) == step * FLAG_STEP_STRIDE + 3 and int(arrivals) == 0


def test_copy_and_signal_of_one_segment():
    partial = torch.arange(10, dtype=torch.float32, device=DEVICE).view(2, 5)
    out = torch.zeros_like(partial)
    flag, counter = words(0, 2)
    (arrivals,) = words(0, dtype=torch.int32)
    copy_and_signal([(partial, out)], flag, counter, 10, 1, arrivals)
    assert torch.equal(out, partial) and int(flag) == 21 and int(arrivals) == 0


def test_wait_and_copy_with_the_flag_set_and_when_the_budget_runs_out():
    src = torch.randn(4, BLOCK + 1, device=DEVICE)
    flag, counter, error = words(2 * FLAG_STEP_STRIDE + 4, 2, 0)
    dst = torch.zeros_like(src)
    wait_and_copy(flag, counter, FLAG_STEP_STRIDE, 4, error, 7, 100, src, dst)          # flag >= 2·stride + 4
    assert torch.equal(dst, src) and int(error) == 0
    dst.zero_()
    wait_and_copy(flag, counter, FLAG_STEP_STRIDE, 5, error, 7, 2, src, dst)            # never set: budget of 2
    assert int(error) == 7 and torch.equal(dst, src)


def test_a_wait_larger_than_its_programs_strides_over_every_block():
    """A prefill-sized wait runs MAX_WAITING_PROGRAMS spinning programs, each copying every G-th block."""
    src = torch.randn(MAX_WAITING_PROGRAMS * 3 + 1, BLOCK, device=DEVICE)
    dst = torch.zeros_like(src)
    flag, counter, error = words(5, 1, 0)
    assert waiting_programs(src.numel(), BLOCK) == MAX_WAITING_PROGRAMS
    wait_and_copy(flag, counter, 4, 1, error, 7, 10, src, dst)
    assert torch.equal(dst, src) and int(error) == 0


@pytest.mark.parametrize("tokens", [5, 1000])
def test_wait_local_slots_equals_the_reference(tokens):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    slots = torch.randint(-1, 12, (tokens, 13), generator=g, device=DEVICE)   # 1000 x 13: 13 blocks, 8 programs
    weights = torch.rand(tokens, 13, generator=g, device=DEVICE)
    flag, counter, error = words(9, 1, 0)
    local, local_weights = wait_local_slots(flag, counter, 8, 1, error, 3, 10, slots, weights, 1, 4, torch.float32)
    want_local, want_weights = local_slots_reference(slots, weights, 1, 4, torch.float32)
    assert torch.equal(local, want_local) and torch.equal(local_weights, want_weights) and int(error) == 0
