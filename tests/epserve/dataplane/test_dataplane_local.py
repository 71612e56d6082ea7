"""The local backend against the dense reference; backend selection errors; header validation."""

from __future__ import annotations

import pytest
import torch

from dataplane_worlds import (HELD_VERSIONS, RUNNER_LAYER, SLOTS_PER_WORKER, WORKERS, TestExperts,
                              dense_reference, make_batch)
from epserve.dataplane import (BACKENDS, BackendUnavailable, BatchHeader, StaleMapVersion, make_dispatcher,
                               make_expert_server)

EXPERTS = [TestExperts(w) for w in range(WORKERS)]


@pytest.mark.parametrize("layer", [0, RUNNER_LAYER])
@pytest.mark.parametrize("num_tokens,pattern", [(1, "random"), (2, "random"), (33, "random"), (9, "only1")])
def test_local_backend_equals_dense_reference(layer: int, num_tokens: int, pattern: str) -> None:
    hidden, slot_ids, weights = make_batch(num_tokens, num_tokens, pattern=pattern)
    dispatcher = make_dispatcher("local", experts=EXPERTS)
    header = BatchHeader(HELD_VERSIONS[0], layer, 0, num_tokens)
    out = dispatcher.combine(dispatcher.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), 1.0)
    torch.testing.assert_close(out, dense_reference(EXPERTS, layer, hidden, slot_ids, weights),
                               rtol=1e-12, atol=1e-12)


def test_two_micro_batches_in_flight_and_zero_tokens() -> None:
    calls = []

    def counting(worker):
        def compute(header, hidden, ids, weights):
            calls.append((worker, header.micro_batch, hidden.shape[0]))
            return EXPERTS[worker](header, hidden, ids, weights)
        return compute

    dispatcher = make_dispatcher("local", experts=[counting(w) for w in range(WORKERS)])
    batches = [make_batch(40 + i, 6 + i) for i in range(2)]
    pending = [dispatcher.dispatch(BatchHeader(1, 0, i, 6 + i), *batches[i], SLOTS_PER_WORKER) for i in range(2)]
    outs = [dispatcher.combine(pending[i], 1.0) for i in (1, 0)]
    for out, (hidden, slot_ids, weights) in zip(outs, batches[::-1]):
        torch.testing.assert_close(out, dense_reference(EXPERTS, 0, hidden, slot_ids, weights))
    calls.clear()
    empty = make_batch(0, 0)
    out = dispatcher.combine(dispatcher.dispatch(BatchHeader(1, 0, 0, 0), *empty, SLOTS_PER_WORKER), 1.0)
    assert out.shape == (0, 16) and out.dtype == torch.float64 and calls == []


def test_stale_version_surfaces_from_combine() -> None:
    dispatcher = make_dispatcher("local", experts=EXPERTS)
    pending = dispatcher.dispatch(BatchHeader(9, 0, 0, 3), *make_batch(1, 3), SLOTS_PER_WORKER)
    with pytest.raises(StaleMapVersion) as info:
        dispatcher.combine(pending, 1.0)
    assert info.value.held_versions == HELD_VERSIONS and info.value.requested == 9


def test_bad_inputs_are_rejected() -> None:
    dispatcher = make_dispatcher("local", experts=EXPERTS)
    with pytest.raises(ValueError, match="num_tokens"):
        dispatcher.dispatch(BatchHeader(1, 0, 0, 4), *make_batch(1, 3), SLOTS_PER_WORKER)
    with pytest.raises(ValueError, match="64 fit"):
        BatchHeader(1, 0, 0, 1, trace_context=b"x" * 65)


def test_backend_choice_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="choose one of") as info:
        make_dispatcher("nccl_magic")
    assert all(name in str(info.value) for name in BACKENDS)
    with pytest.raises(BackendUnavailable, match="deep_ep"):
        make_dispatcher("deepep")
    with pytest.raises(BackendUnavailable, match="mooncake-transfer-engine"):
        make_expert_server("mooncake")
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        make_dispatcher("cuda_ipc")
    with pytest.raises(ValueError, match="no expert server"):
        make_expert_server("local")
