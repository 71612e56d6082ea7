"""The host sampler (CPU runner): extreme but valid parameters never produce NaN or end the process."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.sampler import sample_one
from epserve.sampling import SamplingParams

NONE_SEEN = torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-38, 1e-6, 1.0, 1e6])
def test_any_positive_temperature_gives_a_token(temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    token = sample_one(logits, SamplingParams(temperature=temperature), NONE_SEEN, torch.Generator().manual_seed(1))
    assert 0 <= token < 1000
    if temperature <= 1e-6:
        assert token == int(logits.argmax())        # a vanishing temperature is greedy


@pytest.mark.parametrize("penalty", [1e-39, 1e-45, 1e30])
def test_extreme_repetition_penalty_gives_a_token(penalty):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    seen = torch.tensor([0, 3, 7])
    for params in (SamplingParams(temperature=1.0, repetition_penalty=penalty),
                   SamplingParams(temperature=0.0, repetition_penalty=penalty),
                   SamplingParams(temperature=1e-39, repetition_penalty=penalty, top_p=0.5, top_k=5, min_p=0.2)):
        token = sample_one(logits, params, seen, torch.Generator().manual_seed(3))
        assert 0 <= token < 50


def test_equal_logits_sample_uniformly_among_ties():
    logits = torch.zeros(4)
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(4)
    for _ in range(400):
        counts[sample_one(logits, SamplingParams(temperature=1e-40), NONE_SEEN, g)] += 1
    assert (counts > 50).all()
