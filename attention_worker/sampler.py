"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, per-request seeds.

Legend: B sequences sampled this step, V vocab, N top logprobs.

Each sequence carries its own ``torch.Generator`` (seeded from the request's seed, or from a
random seed), so a seeded request draws the same tokens whatever else is in the batch.

Logprobs (``return_logprob``): log-softmax of the *processed* logits — after the repetition
penalty and the temperature (none for greedy rows), before top-k/top-p/min-p — at the sampled
token, plus the ``top_logprobs_num`` most likely tokens. Both step runners compute them this way
(``token_logprobs`` on the host, ``gpu_sampling.py`` on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SampledTokens:
    """What a step runner sampled: one token per completing sequence, in chunk order, and (None
    when no sequence of the step asked) each one's logprobs, None where its sequence did not ask."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V], seen [n] token ids: positive logits divided, negative multiplied (CTRL rule)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = seen.unique()
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def token_logprobs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, token: int) -> TokenLogprob:
    """logits [V] → the logprobs of ``token`` and of the top ``params.top_logprobs_num`` tokens, from
    the processed logits (repetition penalty, temperature) in float64."""
    processed = apply_repetition_penalty(logits.double(), seen, params.repetition_penalty)
    logprobs = torch.log_softmax(processed / params.logprob_temperature, dim=-1)           # [V]
    if params.top_logprobs_num == 0:
        return TokenLogprob(float(logprobs[token]))
    top = torch.topk(logprobs, min(params.top_logprobs_num, logprobs.numel()))
    return TokenLogprob(float(logprobs[token]), tuple(top.indices.tolist()), tuple(top.values.tolist()))


def sample_one(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
               generator: torch.Generator) -> int:
    """logits [V] float32 → token id. In float64, with the maximum subtracted before the temperature
    divides: a penalty or temperature as small as 1e-45 gives huge but finite logits and a valid
    distribution (in float32 they overflowed to inf and NaN probabilities ended the process)."""
    logits = apply_repetition_penalty(logits.double(), seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p       # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
