"""Validation: every bad field is rejected with INVALID_ARGUMENT and a message naming it."""

from __future__ import annotations

import math

import pytest

from epserve.gateway.errors import ValidationError
from epserve.status_error import StatusCode
from epserve.gateway.request_types import SamplingRequest
from epserve.sampling import SamplingParams
from epserve.gateway.validation import Limits, effective_max_new_tokens, validate_prompt, validate_sampling

LIMITS = Limits(vocab_size=100, max_context_length=16, max_new_tokens_limit=32)


def test_defaults() -> None:
    params = validate_sampling(SamplingRequest(), Limits(100, 16, 4096))
    assert params == SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                    max_new_tokens=128)
    assert validate_sampling(SamplingRequest(), LIMITS).max_new_tokens == 32   # the limit when lower


@pytest.mark.parametrize("sampling, field", [
    (SamplingRequest(temperature=-0.1), "sampling.temperature"),
    (SamplingRequest(temperature=math.nan), "sampling.temperature"),
    (SamplingRequest(top_p=0.0), "sampling.top_p"),
    (SamplingRequest(top_p=1.01), "sampling.top_p"),
    (SamplingRequest(top_k=-1), "sampling.top_k"),
    (SamplingRequest(min_p=1.0), "sampling.min_p"),
    (SamplingRequest(min_p=-0.1), "sampling.min_p"),
    (SamplingRequest(repetition_penalty=0.0), "sampling.repetition_penalty"),
    (SamplingRequest(max_new_tokens=0), "sampling.max_new_tokens"),
    (SamplingRequest(max_new_tokens=33), "sampling.max_new_tokens"),
    (SamplingRequest(stop=("ok", "")), "sampling.stop[1]"),
    (SamplingRequest(stop_token_ids=(5, 100)), "sampling.stop_token_ids[1]"),
    (SamplingRequest(stop_token_ids=(-1,)), "sampling.stop_token_ids[0]"),
])
def test_bad_sampling_field_is_named(sampling: SamplingRequest, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_sampling(sampling, LIMITS)
    assert info.value.field == field
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(field + ":")


def test_edges_accepted() -> None:
    params = validate_sampling(SamplingRequest(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                               repetition_penalty=0.5, max_new_tokens=32, stop_token_ids=(99,)),
                               LIMITS)
    assert params.temperature == 0.0 and params.max_new_tokens == 32


@pytest.mark.parametrize("ids, field, words", [
    ([], "token_ids", "empty"),
    ([1, 100], "token_ids[1]", "out of range"),
    ([-1], "token_ids[0]", "out of range"),
    (list(range(16)), "token_ids", "context"),
])
def test_bad_prompt(ids: list[int], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_prompt("token_ids", ids, LIMITS)
    assert info.value.field == field and words in info.value.message


def test_prompt_one_shorter_than_context_is_valid_and_gets_one_token() -> None:
    validate_prompt("token_ids", list(range(15)), LIMITS)
    assert effective_max_new_tokens(15, 32, LIMITS) == 1
    assert effective_max_new_tokens(4, 8, LIMITS) == 8
