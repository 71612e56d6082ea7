"""Two micro-batches of a decode step on the GPU runner (``gpu_runner.split_decode_batch`` and
``GpuStepRunner.micro_batch_sizes``): halves as views of the step's tensors, each with its own split-KV
count; only decode steps whose rows all sample are split, and only when the executor overlaps two."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.gpu_runner import GpuStepRunner, split_decode_batch
from epserve.models.decoder import ForwardBatch


def decode_batch(rows: int, padding: bool = False) -> ForwardBatch:
    meta = GpuAttentionMetadata(block_tables=torch.arange(rows * 3, dtype=torch.int32).view(rows, 3),
                                context_lens=torch.arange(1, rows + 1, dtype=torch.int32), query_start_loc=None,
                                max_query_len=1, decode=True, num_splits=9)
    return ForwardBatch(torch.arange(100, 100 + rows), torch.arange(rows) + 7, [1] * rows, list(range(1, rows + 1)),
                        [[i] for i in range(rows)], torch.arange(rows) * 4,
                        padding_rows=(torch.arange(rows) >= rows - 1).unsqueeze(1) if padding else None, device=meta)


@pytest.mark.parametrize("rows,first", [(2, 1), (5, 3), (8, 4)])
def test_halves_are_views_of_the_step_with_their_own_splits(rows, first):
    batch = decode_batch(rows, padding=True)
    a, b = split_decode_batch(batch, first, num_splits=lambda size: 100 + size)
    assert (a.num_tokens, b.num_tokens) == (first, rows - first)
    for half, start in ((a, 0), (b, first)):
        size = half.num_tokens
        assert torch.equal(half.input_ids, batch.input_ids[start:start + size])
        assert half.input_ids.data_ptr() == batch.input_ids[start:].data_ptr()        # a view, not a copy
        assert torch.equal(half.slot_mapping, batch.slot_mapping[start:start + size])
        assert torch.equal(half.device.block_tables, batch.device.block_tables[start:start + size])
        assert torch.equal(half.device.context_lens, batch.device.context_lens[start:start + size])
        assert torch.equal(half.padding_rows, batch.padding_rows[start:start + size])
        assert half.device.num_splits == 100 + size and half.device.decode and half.logits_rows is None
        assert half.context_lens == batch.context_lens[start:start + size]


def test_only_decode_steps_whose_rows_all_sample_are_split():
    batch = decode_batch(4)
    batch.device.decode = False
    with pytest.raises(AssertionError, match="decode steps of 2\\+ rows"):
        split_decode_batch(batch, 2, num_splits=lambda size: 1)
    batch = decode_batch(4)
    batch.logits_rows = torch.tensor([0, 2])
    with pytest.raises(AssertionError, match="every row must sample"):
        split_decode_batch(batch, 2, num_splits=lambda size: 1)


class _Executor:
    def __init__(self, micro_batches: int) -> None:
        self.step_micro_batches = micro_batches


@pytest.mark.parametrize("micro_batches,tokens,splittable,want", [
    (2, 8, True, [4, 4]), (2, 5, True, [3, 2]), (2, 1, True, [1]), (2, 8, False, [8]), (1, 8, True, [8])])
def test_micro_batch_sizes(micro_batches, tokens, splittable, want):
    runner = GpuStepRunner.__new__(GpuStepRunner)          # the sizing reads the executor only
    runner.executor = _Executor(micro_batches)
    assert runner.micro_batch_sizes(tokens, splittable) == want
