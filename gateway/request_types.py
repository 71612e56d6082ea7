"""Plain dataclasses for a generation request and its outputs, shared by the gateway's classes.

``SamplingRequest`` is what the client sent (unset fields are None); ``SamplingParams`` is the
validated version with defaults applied. ``FinishReason`` values equal the proto enum's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 128


class FinishReason(enum.IntEnum):
    STOP = 1      # EOS, stop token or stop string
    LENGTH = 2    # max_new_tokens or the context is full
    ABORT = 3


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
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0                 # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0      # with return_logprob: the N most likely tokens too


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob (of the processed logits: repetition penalty, temperature) and
    the N most likely tokens, most likely first."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


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
    matched_stop: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()   # return_logprob: one per token_ids entry
