"""Request validation: every check names the field it rejects (``ValidationError.field``).

Rules (the public API's, see protos/generation.proto; the defaults are ``SamplingParams``' in
epserve/sampling.py):
  prompt             text or token_ids, non-empty after tokenization; every id in [0, vocab_size);
                     fewer tokens than the context (max_position_embeddings)
  max_new_tokens     in [1, --max-new-tokens-limit], default 128 (or the limit when lower); the gateway
                     then lowers it to what fits in the context (``effective_max_new_tokens``)
  temperature >= 0 (default 1.0), top_p in (0, 1] (default 1.0), top_k >= 0 (0 = off),
  min_p in [0, 1), repetition_penalty > 0, stop strings non-empty, stop_token_ids in [0, vocab_size)
  top_logprobs_num   in [0, 20] (OpenAI's limit), only with return_logprob
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from epserve.gateway.errors import ValidationError
from epserve.gateway.request_types import SamplingRequest
from epserve.sampling import DEFAULT_SAMPLING, MAX_TOP_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context_length: int
    max_new_tokens_limit: int


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValidationError(field, f"must be a finite number, got {value}")
    return value


def validate_prompt(field: str, ids: Sequence[int], limits: Limits) -> None:
    if not ids:
        raise ValidationError(field, "the prompt is empty")
    if len(ids) >= limits.max_context_length:     # before looking at each id: a huge list costs nothing
        raise ValidationError(field, f"the prompt has {len(ids)} tokens; the model's context is "
                                     f"{limits.max_context_length} tokens and the prompt must be shorter")
    for i, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise ValidationError(f"{field}[{i}]", f"token id {token} is out of range [0, {limits.vocab_size})")


def validate_sampling(sampling: SamplingRequest, limits: Limits) -> SamplingParams:
    temperature = DEFAULT_SAMPLING.temperature if sampling.temperature is None else _finite(
        "sampling.temperature", sampling.temperature)
    if temperature < 0:
        raise ValidationError("sampling.temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    top_p = DEFAULT_SAMPLING.top_p if sampling.top_p is None else _finite("sampling.top_p", sampling.top_p)
    if not 0 < top_p <= 1:
        raise ValidationError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = DEFAULT_SAMPLING.top_k if sampling.top_k is None else sampling.top_k
    if top_k < 0:
        raise ValidationError("sampling.top_k", f"must be >= 0 (0 = off), got {top_k}")
    min_p = DEFAULT_SAMPLING.min_p if sampling.min_p is None else _finite("sampling.min_p", sampling.min_p)
    if not 0 <= min_p < 1:
        raise ValidationError("sampling.min_p", f"must be in [0, 1), got {min_p}")
    penalty = DEFAULT_SAMPLING.repetition_penalty if sampling.repetition_penalty is None else _finite(
        "sampling.repetition_penalty", sampling.repetition_penalty)
    if penalty <= 0:
        raise ValidationError("sampling.repetition_penalty", f"must be > 0, got {penalty}")
    max_new = (min(DEFAULT_SAMPLING.max_new_tokens, limits.max_new_tokens_limit) if sampling.max_new_tokens is None
               else sampling.max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise ValidationError("sampling.max_new_tokens",
                              f"must be in [1, {limits.max_new_tokens_limit}], got {max_new}")
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise ValidationError(f"sampling.stop[{i}]", "stop strings must not be empty")
    for i, token in enumerate(sampling.stop_token_ids):
        if not 0 <= token < limits.vocab_size:
            raise ValidationError(f"sampling.stop_token_ids[{i}]",
                                  f"unknown token id {token}: must be in [0, {limits.vocab_size})")
    if not 0 <= sampling.top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise ValidationError("sampling.top_logprobs_num",
                              f"must be in [0, {MAX_TOP_LOGPROBS}], got {sampling.top_logprobs_num}")
    if sampling.top_logprobs_num and not sampling.return_logprob:
        raise ValidationError("sampling.top_logprobs_num", "needs return_logprob")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=penalty, seed=sampling.seed, max_new_tokens=max_new,
                          stop=tuple(sampling.stop), stop_token_ids=tuple(sampling.stop_token_ids),
                          ignore_eos=sampling.ignore_eos, return_logprob=sampling.return_logprob,
                          top_logprobs_num=sampling.top_logprobs_num)


def effective_max_new_tokens(num_prompt_tokens: int, max_new_tokens: int, limits: Limits) -> int:
    """max_new_tokens lowered to what fits in the context (>= 1 for a valid prompt)."""
    return min(max_new_tokens, limits.max_context_length - num_prompt_tokens)
