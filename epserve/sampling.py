"""The request vocabulary shared by the gateway and the attention workers, and its proto edge.

``SamplingParams`` is a request's sampling settings with every default applied (the defaults
live here and nowhere else); ``FinishReason`` says why a request ended (its values equal the
``epserve.v1.FinishReason`` proto enum's); ``TokenLogprob`` is one generated token's logprob.
The gateway validates a client's request field by field into a ``SamplingParams``
(``gateway/validation.py``) and sends it to a worker with ``sampling_to_proto``; the worker reads
it back with ``sampling_from_proto``, which leaves unset fields to the defaults below.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from epserve.protos import generation_pb2

MAX_TOP_LOGPROBS = 20                    # OpenAI's limit on top_logprobs


class FinishReason(enum.IntEnum):
    STOP = generation_pb2.FINISH_REASON_STOP        # EOS, a stop token or a stop string
    LENGTH = generation_pb2.FINISH_REASON_LENGTH    # max_new_tokens or the context is full
    ABORT = generation_pb2.FINISH_REASON_ABORT

    @property
    def label(self) -> str:
        """"stop", "length" or "abort" (metric labels, span attributes, OpenAI's names)."""
        return self.name.lower()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0             # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None              # None: a random seed per request
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()           # stop strings: the gateway's job, never sent to a worker
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0            # with return_logprob: the N most likely tokens too

    def __post_init__(self) -> None:
        checks = [
            ("temperature", 0 <= self.temperature < math.inf, "must be finite and >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "must be finite and > 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("top_logprobs_num", 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS,
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def logprob_temperature(self) -> float:
        """What the logits are divided by before the log-softmax (1 for temperature 0)."""
        return self.temperature if self.temperature > 0 else 1.0


DEFAULT_SAMPLING = SamplingParams()

# Fields the proto marks ``optional``: unset means "the default above".
_OPTIONAL_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_new_tokens")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob (of the processed logits: repetition penalty, temperature) and
    the N most likely tokens, most likely first."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def sampling_to_proto(params: SamplingParams) -> generation_pb2.SamplingParams:
    """The worker's copy: stop strings stay in the gateway."""
    proto = generation_pb2.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, max_new_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        return_logprob=params.return_logprob, top_logprobs_num=params.top_logprobs_num)
    if params.seed is not None:
        proto.seed = params.seed
    return proto


def sampling_from_proto(message: generation_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Raises ValueError naming the field."""
    given = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    return SamplingParams(**given, stop_token_ids=tuple(message.stop_token_ids), ignore_eos=message.ignore_eos,
                          return_logprob=message.return_logprob, top_logprobs_num=message.top_logprobs_num)


def logprob_to_proto(logprob: TokenLogprob) -> generation_pb2.TokenLogprob:
    return generation_pb2.TokenLogprob(logprob=logprob.logprob, top_token_ids=logprob.top_ids,
                                       top_logprobs=logprob.top_logprobs)


def logprob_from_proto(message: generation_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(message.logprob, tuple(message.top_token_ids), tuple(message.top_logprobs))
