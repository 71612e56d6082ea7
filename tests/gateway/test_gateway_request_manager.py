"""RequestManager without gRPC: scripted in-process workers behind the worker_api Protocols."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from gateway_testlib import CONTEXT_LENGTH

from epserve.gateway.config import GatewayConfig
from epserve.gateway.errors import GatewayError
from epserve.status_error import StatusCode
from epserve.model_config import load_model_spec
from epserve.gateway.request_manager import RequestManager
from epserve.gateway.request_types import GenerateInput, SamplingRequest
from epserve.sampling import FinishReason
from epserve.gateway.router import Router
from epserve.gateway.worker_api import StreamCancelled, WorkerFailed, WorkerLost, WorkerRequest, WorkerStep, WorkerTimeout

SCRIPT_TEXT = "Hello wörld! 日本語 😀 STOP tail"


@dataclass
class ScriptedStream:
    steps: list[WorkerStep]
    fail_after: int | None = None          # raise `error` after this many steps
    error: Exception = field(default_factory=lambda: WorkerLost("scripted loss"))
    block: threading.Event | None = None   # wait here after the steps (until cancelled)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __iter__(self) -> Iterator[WorkerStep]:
        for i, step in enumerate(self.steps):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error
            if self.cancelled.is_set():
                raise StreamCancelled()
            yield step
        if self.block is not None:
            self.cancelled.wait(5)
            raise StreamCancelled()

    def cancel(self) -> None:
        self.cancelled.set()


class ScriptedWorker:
    def __init__(self, address: str, script: list[int], fail_after: int | None = None, block: bool = False,
                 error: Exception | None = None):
        self.address = address
        self.error = error or WorkerLost("scripted loss")
        self.script = script
        self.fail_after = fail_after
        self.block = block
        self.requests: list[WorkerRequest] = []
        self.aborts: list[str] = []

    def generate(self, request: WorkerRequest, timeout_s: float) -> ScriptedStream:
        self.requests.append(request)
        start = request.num_generated_before
        n = request.sampling.max_new_tokens
        tokens = self.script[start:start + n]
        steps = [WorkerStep((t,), finished=(i + 1 == len(tokens) and not self.block),
                            finish_reason=FinishReason.LENGTH if i + 1 == len(tokens) else None)
                 for i, t in enumerate(tokens)]
        return ScriptedStream(steps, self.fail_after, self.error, threading.Event() if self.block else None)

    def abort(self, request_id: str) -> bool:
        self.aborts.append(request_id)
        return True

    def abort_nowait(self, request_id: str) -> None:
        self.aborts.append(request_id)


class Directory:
    def __init__(self, *workers: ScriptedWorker) -> None:
        self.workers = {w.address: w for w in workers}
        self.lost: list[str] = []

    def reachable(self) -> list[str]:
        return [a for a in self.workers if a not in self.lost]

    def client(self, address: str) -> ScriptedWorker:
        return self.workers[address]

    def mark_lost(self, address: str, reason: str) -> None:
        self.lost.append(address)


@pytest.fixture
def make_manager(gateway_model_dir, gateway_tokenizer):
    def make(*workers: ScriptedWorker, **config) -> RequestManager:
        cfg = GatewayConfig(model_path=str(gateway_model_dir), attention_workers=("127.0.0.1:1",), **config)
        return RequestManager(cfg, gateway_tokenizer, load_model_spec(gateway_model_dir), Directory(*workers),
                              Router())
    return make


def collect(manager: RequestManager, inp: GenerateInput):
    outputs = list(manager.submit(inp).outputs())
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids], outputs[-1]


def test_streams_text_and_final_usage(make_manager, gateway_tokenizer) -> None:
    script = gateway_tokenizer.encode(SCRIPT_TEXT)
    manager = make_manager(ScriptedWorker("w1", script))
    prompt = gateway_tokenizer.encode("Hi")
    text, ids, final = collect(manager, GenerateInput("r1", text="Hi",
                                                      sampling=SamplingRequest(max_new_tokens=len(script))))
    assert ids == script and text == SCRIPT_TEXT
    assert final.finish_reason == FinishReason.LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), len(script))
    assert manager.num_running == 0


def test_stop_string_ends_request_and_aborts_worker(make_manager, gateway_tokenizer) -> None:
    worker = ScriptedWorker("w1", gateway_tokenizer.encode(SCRIPT_TEXT))
    manager = make_manager(worker)
    text, _, final = collect(manager, GenerateInput("r1", token_ids=(1, 2),
                                                    sampling=SamplingRequest(stop=("STOP",), max_new_tokens=60)))
    assert text == "Hello wörld! 日本語 😀 "
    assert final.finish_reason == FinishReason.STOP and final.matched_stop == "STOP"
    assert worker.aborts == ["r1"]


def test_lost_worker_resubmits_prompt_plus_streamed_tokens(make_manager, gateway_tokenizer) -> None:
    script = gateway_tokenizer.encode(SCRIPT_TEXT)
    first = ScriptedWorker("w1", script, fail_after=5)
    second = ScriptedWorker("w2", script)
    manager = make_manager(first, second)
    prompt = (3, 4, 5)
    text, ids, final = collect(manager, GenerateInput("r1", token_ids=prompt,
                                                      sampling=SamplingRequest(max_new_tokens=len(script))))
    assert ids == script and text == SCRIPT_TEXT and final.finish_reason == FinishReason.LENGTH
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == len(script)
    # w1 is tried first (round-robin), loses the stream after 5 tokens; w2 continues
    (retry,) = second.requests
    assert retry.prompt_ids == prompt + tuple(script[:5])
    assert retry.num_generated_before == 5 and retry.sampling.max_new_tokens == len(script) - 5


def test_no_worker_left_is_unavailable(make_manager) -> None:
    manager = make_manager(ScriptedWorker("w1", [1, 2, 3, 4], fail_after=1))
    with pytest.raises(GatewayError) as info:
        collect(manager, GenerateInput("r1", token_ids=(1,), sampling=SamplingRequest(max_new_tokens=4)))
    assert info.value.code == StatusCode.UNAVAILABLE and "w1" in info.value.message
    assert manager.num_running == 0


def test_abort_ends_stream_with_abort(make_manager) -> None:
    worker = ScriptedWorker("w1", [10, 11, 12], block=True)
    manager = make_manager(worker)
    outputs = manager.submit(GenerateInput("r1", token_ids=(1,), sampling=SamplingRequest(max_new_tokens=3)))
    stream = outputs.outputs()
    assert next(stream).token_ids == (10,)
    assert manager.abort("r1") and not manager.abort("nope")
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == FinishReason.ABORT
    assert worker.aborts == ["r1"] and manager.num_running == 0


def test_duplicate_running_id_and_cancel(make_manager) -> None:
    worker = ScriptedWorker("w1", [10, 11], block=True)
    manager = make_manager(worker)
    handle = manager.submit(GenerateInput("dup", token_ids=(1,)))
    stream = handle.outputs()
    next(stream)
    with pytest.raises(GatewayError) as info:
        manager.submit(GenerateInput("dup", token_ids=(1,)))
    assert info.value.code == StatusCode.ALREADY_EXISTS
    handle.cancel()                       # the client went away
    assert list(stream) == []             # nothing more is sent
    assert worker.aborts == ["dup"] and manager.num_running == 0
    manager.submit(GenerateInput("dup", token_ids=(1,))).cancel()  # the id is free again
    assert manager.num_running == 0


def test_context_limit_lowers_max_new_tokens(make_manager) -> None:
    worker = ScriptedWorker("w1", list(range(100)))
    manager = make_manager(worker)
    prompt = tuple(i % 256 for i in range(CONTEXT_LENGTH - 4))
    _, ids, final = collect(manager, GenerateInput("r1", token_ids=prompt,
                                                   sampling=SamplingRequest(max_new_tokens=100)))
    assert len(ids) == 4 and final.finish_reason == FinishReason.LENGTH
    assert worker.requests[0].sampling.max_new_tokens == 4


def test_validation_errors_name_the_field(make_manager) -> None:
    manager = make_manager(ScriptedWorker("w1", [1]))
    cases = [(GenerateInput("a", text=""), "text:"), (GenerateInput("b"), "input:"),
             (GenerateInput("c", token_ids=(1, 10_000)), "token_ids[1]:"),
             (GenerateInput("d", text="x " * CONTEXT_LENGTH), "text:"),
             (GenerateInput("e", text="hi", sampling=SamplingRequest(top_p=2.0)), "sampling.top_p:")]
    for inp, prefix in cases:
        with pytest.raises(GatewayError) as info:
            manager.submit(inp)
        assert info.value.code == StatusCode.INVALID_ARGUMENT and info.value.message.startswith(prefix)
    assert manager.num_running == 0


def test_shutdown_refuses_new_requests(make_manager) -> None:
    manager = make_manager(ScriptedWorker("w1", [1]))
    manager.stop_accepting()
    with pytest.raises(GatewayError) as info:
        manager.submit(GenerateInput("a", token_ids=(1,)))
    assert info.value.code == StatusCode.UNAVAILABLE


def test_full_worker_is_skipped_then_resource_exhausted(make_manager) -> None:
    full = ScriptedWorker("w1", [7, 8], fail_after=0, error=WorkerFailed("RESOURCE_EXHAUSTED", "KV cache full"))
    ok = ScriptedWorker("w2", [7, 8])
    manager = make_manager(full, ok)
    _, ids, _ = collect(manager, GenerateInput("r1", token_ids=(1,), sampling=SamplingRequest(max_new_tokens=2)))
    assert ids == [7, 8] and len(full.requests) == 1
    manager = make_manager(ScriptedWorker("w1", [7], fail_after=0,
                                          error=WorkerFailed("RESOURCE_EXHAUSTED", "KV cache full")))
    with pytest.raises(GatewayError) as info:
        collect(manager, GenerateInput("r2", token_ids=(1,)))
    assert info.value.code == StatusCode.RESOURCE_EXHAUSTED


def test_worker_timeout_is_deadline_exceeded_and_aborted(make_manager) -> None:
    worker = ScriptedWorker("w1", [7, 8, 9], fail_after=1, error=WorkerTimeout("deadline"))
    manager = make_manager(worker)
    with pytest.raises(GatewayError) as info:
        collect(manager, GenerateInput("r1", token_ids=(1,), sampling=SamplingRequest(max_new_tokens=3)))
    assert info.value.code == StatusCode.DEADLINE_EXCEEDED and worker.aborts == ["r1"]
    assert manager.num_running == 0


def test_closing_the_output_iterator_aborts_at_worker(make_manager) -> None:
    worker = ScriptedWorker("w1", [10, 11, 12], block=True)
    manager = make_manager(worker)
    stream = manager.submit(GenerateInput("r1", token_ids=(1,))).outputs()
    next(stream)
    stream.close()
    assert worker.aborts == ["r1"] and manager.num_running == 0
