"""split_by_worker and CombineSum against a dense reference."""

from __future__ import annotations

import pytest
import torch

from dataplane_worlds import SLOTS_PER_WORKER, WORKERS, TestExperts, dense_reference, make_batch
from epserve.dataplane import CombineSum, split_by_worker

EXPERTS = [TestExperts(w) for w in range(WORKERS)]


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 37])
def test_each_worker_gets_exactly_the_tokens_with_a_slot_there(num_tokens: int) -> None:
    _, slot_ids, weights = make_batch(num_tokens, num_tokens)
    shares = split_by_worker(slot_ids, weights, SLOTS_PER_WORKER, WORKERS)
    assert [s.worker for s in shares] == list(range(WORKERS))
    for share in shares:
        owner = slot_ids // SLOTS_PER_WORKER
        expected_tokens = [t for t in range(num_tokens) if (owner[t] == share.worker).any()]
        assert share.token_idx.tolist() == expected_tokens
        assert share.local_slot_ids.shape == share.weights.shape == (len(expected_tokens), slot_ids.shape[1])
        for row, t in enumerate(expected_tokens):
            for k in range(slot_ids.shape[1]):
                mine = int(owner[t, k]) == share.worker
                assert int(share.local_slot_ids[row, k]) == (int(slot_ids[t, k]) - share.worker * SLOTS_PER_WORKER
                                                             if mine else -1)
                assert float(share.weights[row, k]) == (float(weights[t, k]) if mine else 0.0)


def test_tokens_all_on_one_worker_and_workers_with_nothing() -> None:
    _, slot_ids, weights = make_batch(5, 2)              # token 0 all on worker 0, token 1 all on worker 1
    shares = split_by_worker(slot_ids, weights, SLOTS_PER_WORKER, WORKERS)
    assert shares[0].token_idx.tolist() == [0] and shares[1].token_idx.tolist() == [1]
    _, slot_ids, weights = make_batch(6, 9, pattern="only0")
    shares = split_by_worker(slot_ids, weights, SLOTS_PER_WORKER, WORKERS)
    assert shares[0].num_tokens == 9 and shares[1].num_tokens == 0
    assert shares[1].local_slot_ids.shape == (0, slot_ids.shape[1])


def test_minus_one_is_no_choice_and_bad_ids_are_rejected() -> None:
    slot_ids = torch.tensor([[0, -1], [-1, -1], [7, 4]])
    weights = torch.ones(3, 2)
    shares = split_by_worker(slot_ids, weights, 4, 2)
    assert shares[0].token_idx.tolist() == [0] and shares[1].token_idx.tolist() == [2]
    assert shares[1].local_slot_ids.tolist() == [[3, 0]]
    with pytest.raises(ValueError, match="out of range"):
        split_by_worker(torch.tensor([[8, 0]]), torch.ones(1, 2), 4, 2)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        split_by_worker(torch.tensor([[1, 0]]), torch.ones(1, 3), 4, 2)


@pytest.mark.parametrize("layer", [0, 20])               # diagonal experts, the real MoE runner
def test_split_then_combine_equals_the_dense_sum(layer: int) -> None:
    hidden, slot_ids, weights = make_batch(7, 29)
    total = CombineSum(29, hidden.shape[1], hidden.dtype, "cpu")
    for share in split_by_worker(slot_ids, weights, SLOTS_PER_WORKER, WORKERS):
        expert = EXPERTS[share.worker]
        if layer == 20:
            partial = expert.runner.run(hidden[share.token_idx], share.local_slot_ids, share.weights,
                                        expert.w13, expert.w2)
        else:
            partial = expert.diagonal(hidden[share.token_idx], share.local_slot_ids, share.weights)
        total.add(share, partial)
    expected = dense_reference(EXPERTS, layer, hidden, slot_ids, weights)
    torch.testing.assert_close(total.result(), expected, rtol=1e-12, atol=1e-12)


def test_combine_accumulates_low_precision_in_float32() -> None:
    _, slot_ids, weights = make_batch(8, 4)
    shares = split_by_worker(slot_ids, weights.to(torch.bfloat16), SLOTS_PER_WORKER, WORKERS)
    total = CombineSum(4, 16, torch.bfloat16, "cpu")
    assert total.out.dtype == torch.float32
    for share in shares:
        total.add(share, torch.full((share.num_tokens, 16), 1.0 / 3, dtype=torch.bfloat16))
    assert total.result().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected"):
        total.add(shares[0], torch.zeros(shares[0].num_tokens + 1, 16))
