"""A small client for the gateway's public API, used by ``epserve generate --gateway`` and tests.

    for response in stream_generate("127.0.0.1:50051", "Hello", max_new_tokens=16, temperature=0):
        print(response.text, end="")

Sampling keyword arguments are the fields of ``epserve.v1.SamplingParams``: temperature, top_p,
top_k, min_p, repetition_penalty, seed, max_new_tokens, stop, stop_token_ids, ignore_eos, return_logprob,
top_logprobs_num (each response's ``logprobs``: one per token id).
Errors arrive as ``grpc.RpcError`` (``.code()``, ``.details()``). Closing the iterator early
cancels the stream (the gateway then aborts the request at its worker). ``security``
(``grpc_security.Security``): the gateway's API token (``--api-token-file``) and TLS files, if any.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.protos import generation_pb2, generation_pb2_grpc

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_new_tokens",
                   "stop", "stop_token_ids", "ignore_eos", "return_logprob", "top_logprobs_num")


def build_request(prompt: str | None = None, *, token_ids: Sequence[int] | None = None, request_id: str = "",
                  **sampling: object) -> generation_pb2.GenerateRequest:
    if (prompt is None) == (token_ids is None):
        raise TypeError("give exactly one of prompt and token_ids")
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
    params = generation_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=params)
    if prompt is not None:
        request.text = prompt
    else:
        request.token_ids.ids.extend(token_ids or ())
    return request


def stream_generate(address: str, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                    request_id: str = "", timeout_s: float = 60.0, security: Security = PLAINTEXT,
                    **sampling: object) -> Iterator[generation_pb2.GenerateResponse]:
    """Streams the responses of one Generate call; the last one has finished=True."""
    request = build_request(prompt, token_ids=token_ids, request_id=request_id, **sampling)
    return _stream(address, request, timeout_s, security)


def _stream(address: str, request: generation_pb2.GenerateRequest,
            timeout_s: float, security: Security = PLAINTEXT) -> Iterator[generation_pb2.GenerateResponse]:
    channel = open_channel(address, security)
    call = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)
    try:
        yield from call
    finally:
        call.cancel()
        channel.close()


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    final: generation_pb2.GenerateResponse   # finish_reason, usage, matched_stop


def generate(address: str, prompt: str | None = None, **kwargs: object) -> GenerateResult:
    """Runs a whole request; same arguments as ``stream_generate``."""
    text: list[str] = []
    ids: list[int] = []
    final = None
    for response in stream_generate(address, prompt, **kwargs):  # type: ignore[arg-type]
        text.append(response.text)
        ids.extend(response.token_ids)
        final = response
    assert final is not None and final.finished, "the stream ended without a final message"
    return GenerateResult("".join(text), ids, final)


def abort(address: str, request_id: str, timeout_s: float = 5.0, security: Security = PLAINTEXT) -> bool:
    with open_channel(address, security) as channel:
        return generation_pb2_grpc.GenerationStub(channel).Abort(
            generation_pb2.AbortRequest(request_id=request_id), timeout=timeout_s).found


def get_model_info(address: str, timeout_s: float = 5.0) -> generation_pb2.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
            generation_pb2.GetModelInfoRequest(), timeout=timeout_s)


def wait_until_serving(address: str, timeout_s: float = 30.0) -> None:
    """Polls grpc.health.v1 until the gateway is SERVING; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.05)
    raise TimeoutError(f"gateway {address} not SERVING after {timeout_s} s (last: {last})")
