"""Plain dataclasses for a generation request and its outputs, shared by the gateway's classes.

``SamplingRequest`` is what the client sent (unset fields are None); validation turns it into
the ``SamplingParams`` shared with the workers (``epserve/sampling.py``, where the defaults live).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from epserve.sampling import FinishReason, TokenLogprob


@dataclass(frozen=True)
class SamplingRequest:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass(frozen=True)
class GenerateInput:
    """Exactly one of ``text`` and ``token_ids`` is set (None = not given)."""

    request_id: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    sampling: SamplingRequest = field(default_factory=SamplingRequest)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateOutput:
    """One streamed message: new text and token ids since the previous one."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None     # set on the final message
    matched_stop: str = ""         # the stop string that ended it
    matched_stop_token: int | None = None   # the stop token (EOS or stop_token_ids) that ended it
    logprobs: tuple[TokenLogprob, ...] = ()   # return_logprob: one per token_ids entry
