"""SGLang's scheduler protocol (``sglang.grpc.scheduler``, what SMG sends its workers) <-> the
gateway's dataclasses: requests in (``request_from_proto``), stream messages out
(``chunk_response``, ``complete_response``).

What a request may ask for: token ids (``tokenized.input_ids``), temperature / top_p / top_k
(-1 or 0 = off) / min_p / repetition_penalty, max_new_tokens (unset: the gateway's default), stop
strings and stop token ids, ignore_eos, n >= 1, return_logprob with top_logprobs_num, and a
sampling seed as ``custom_params {"seed": N}`` (SMG 1.13 sends no seed: the OpenAI ``seed`` does not
reach SGLang workers; ``--sglang-default-seed`` is the deployment-wide fallback). Everything else
epserve lacks is refused with INVALID_ARGUMENT naming it (``Unsupported``) — multimodal inputs,
input embeddings, LoRA, structured output, logit bias, frequency/presence penalties,
min_new_tokens, input logprobs, token_ids_logprob, hidden states, custom logit processors,
disaggregation, data-parallel pinning, reasoning-token counts — never ignored. Fields about text
(skip_special_tokens, spaces_between_special_tokens, no_stop_trim, stream_interval) concern
SMG's own detokenization and are not needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from google.protobuf.json_format import MessageToDict

from epserve.gateway.errors import ValidationError
from epserve.gateway.request_types import GenerateInput, SamplingRequest
from epserve.sampling import FinishReason, TokenLogprob
from epserve.protos import sglang_scheduler_pb2 as sglang_pb2

MAX_SAMPLES = 64                      # n
SEED_KEY = "seed"


class Unsupported(ValidationError):
    """A field asks for something epserve does not do (INVALID_ARGUMENT naming it)."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(field, f"{what} is not supported by epserve")


@dataclass(frozen=True)
class SglangRequest:
    request_id: str
    input_ids: tuple[int, ...]
    sampling: SamplingRequest          # seed: the request's, or None
    n: int = 1
    stream: bool = False

    def sample_inputs(self, default_seed: int | None) -> list[GenerateInput]:
        """One gateway request per sample: ids ``RID`` (n = 1) or ``RID/i``; sample i samples with
        seed + i (the request's seed, else ``default_seed``, else a random one per sample)."""
        seed = self.sampling.seed if self.sampling.seed is not None else default_seed
        inputs = []
        for i in range(self.n):
            sampling = replace(self.sampling, seed=None if seed is None else (seed + i) % 2 ** 63)
            request_id = self.request_id if self.n == 1 else f"{self.request_id}/{i}"
            inputs.append(GenerateInput(request_id=request_id, token_ids=self.input_ids, sampling=sampling))
        return inputs


def _refuse_request_fields(request: sglang_pb2.GenerateRequest) -> None:
    if request.HasField("mm_inputs") and request.mm_inputs.ByteSize():
        raise Unsupported("mm_inputs", "multimodal input (images, video, audio)")
    if request.input_embeds:
        raise Unsupported("input_embeds", "input embeddings")
    if request.lora_id:
        raise Unsupported("lora_id", "LoRA adapters")
    if request.return_hidden_states:
        raise Unsupported("return_hidden_states", "returning hidden states")
    if request.return_logprob and request.logprob_start_len >= 0:
        raise Unsupported("logprob_start_len", "input (prompt) logprobs; send -1")
    if request.token_ids_logprob:
        raise Unsupported("token_ids_logprob", "logprobs of chosen token ids")
    if request.custom_logit_processor:
        raise Unsupported("custom_logit_processor", "custom logit processors")
    if request.HasField("disaggregated_params") and request.disaggregated_params.bootstrap_host:
        raise Unsupported("disaggregated_params", "prefill/decode disaggregation")
    if request.HasField("data_parallel_rank"):
        raise Unsupported("data_parallel_rank", "pinning a data-parallel rank (the gateway routes itself)")
    if request.require_reasoning:
        raise Unsupported("require_reasoning", "counting reasoning tokens")


def _refuse_sampling_fields(params: sglang_pb2.SamplingParams) -> None:
    prefix = "sampling_params."
    constraint = params.WhichOneof("constraint")
    if constraint is not None:
        raise Unsupported(prefix + constraint, f"structured output ({constraint})")
    if params.frequency_penalty:
        raise Unsupported(prefix + "frequency_penalty", "frequency_penalty (use repetition_penalty)")
    if params.presence_penalty:
        raise Unsupported(prefix + "presence_penalty", "presence_penalty (use repetition_penalty)")
    if params.min_new_tokens:
        raise Unsupported(prefix + "min_new_tokens", "min_new_tokens")
    if params.logit_bias:
        raise Unsupported(prefix + "logit_bias", "logit_bias")


def _seed(params: sglang_pb2.SamplingParams) -> int | None:
    """custom_params may carry {"seed": N} (an integer in [0, 2**63)); any other key is refused."""
    if not params.HasField("custom_params"):
        return None
    custom = MessageToDict(params.custom_params)
    unknown = sorted(set(custom) - {SEED_KEY})
    if unknown:
        raise Unsupported(f"sampling_params.custom_params.{unknown[0]}", f"custom parameter {unknown[0]!r}")
    if SEED_KEY not in custom:
        return None
    seed = custom[SEED_KEY]
    if not isinstance(seed, (int, float)) or seed != int(seed) or not 0 <= seed < 2 ** 63:
        raise ValidationError("sampling_params.custom_params.seed", f"must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def request_from_proto(request: sglang_pb2.GenerateRequest) -> SglangRequest:
    """Raises ValidationError (INVALID_ARGUMENT) naming the field; ranges are checked later by the
    gateway's own validation (validation.py) as for epserve.v1 requests."""
    if not request.request_id:
        raise ValidationError("request_id", "must not be empty")
    if not request.tokenized.input_ids:
        raise ValidationError("tokenized.input_ids", "the prompt is empty (epserve takes token ids, not text)")
    _refuse_request_fields(request)
    params = request.sampling_params
    _refuse_sampling_fields(params)
    n = params.n or 1
    if not 1 <= n <= MAX_SAMPLES:
        raise ValidationError("sampling_params.n", f"must be in [1, {MAX_SAMPLES}], got {n}")
    sampling = SamplingRequest(
        temperature=params.temperature,
        top_p=params.top_p or None,                      # proto3 zero = not sent
        top_k=max(params.top_k, 0),                      # -1 (SGLang's off) -> 0 (epserve's off)
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty or None,
        seed=_seed(params),
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        stop=tuple(params.stop), stop_token_ids=tuple(params.stop_token_ids), ignore_eos=params.ignore_eos,
        return_logprob=request.return_logprob,
        top_logprobs_num=request.top_logprobs_num if request.return_logprob else 0)
    return SglangRequest(request.request_id, tuple(request.tokenized.input_ids), sampling, n, request.stream)


def output_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> sglang_pb2.OutputLogProbs:
    """One entry per token; top_logprobs only where some were asked for."""
    proto = sglang_pb2.OutputLogProbs(token_logprobs=[lp.logprob for lp in logprobs], token_ids=list(token_ids))
    if any(lp.top_ids for lp in logprobs):
        proto.top_logprobs.extend(sglang_pb2.TopLogProbs(values=list(lp.top_logprobs), token_ids=list(lp.top_ids))
                                  for lp in logprobs)
    return proto


def chunk_response(request_id: str, index: int, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob],
                   prompt_tokens: int, completion_tokens: int) -> sglang_pb2.GenerateResponse:
    """New tokens of sample ``index``; the counts are cumulative."""
    chunk = sglang_pb2.GenerateStreamChunk(token_ids=list(token_ids), prompt_tokens=prompt_tokens,
                                           completion_tokens=completion_tokens, index=index)
    if logprobs:
        chunk.output_logprobs.CopyFrom(output_logprobs(token_ids, logprobs))
    return sglang_pb2.GenerateResponse(request_id=request_id, chunk=chunk)


def complete_response(request_id: str, index: int, output_ids: Sequence[int], logprobs: Sequence[TokenLogprob],
                      reason: FinishReason, matched_stop: str, matched_stop_token: int | None,
                      stop_strings: Sequence[str], prompt_tokens: int, completion_tokens: int
                      ) -> sglang_pb2.GenerateResponse:
    """The end of sample ``index``: all its tokens when not streaming, none when streaming (the
    chunks carried them). ``matched_stop``: the stop string that ended it ("" for none);
    ``matched_stop_token``: the stop token that ended it (None for none)."""
    complete = sglang_pb2.GenerateComplete(output_ids=list(output_ids), finish_reason=reason.label,
                                           prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                           index=index)
    if logprobs:
        complete.output_logprobs.CopyFrom(output_logprobs(output_ids, logprobs))
    if matched_stop in stop_strings:
        complete.matched_stop_str = matched_stop
    elif matched_stop_token is not None:
        complete.matched_token_id = matched_stop_token
    return sglang_pb2.GenerateResponse(request_id=request_id, complete=complete)
