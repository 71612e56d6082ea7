"""The real gateway as a subprocess in front of scripted attention workers (subprocesses too),
through the real stubs and gateway/client.py."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from gateway_testlib import CONTEXT_LENGTH, FakeWorker, GatewayProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epserve.gateway import client
from epserve.protos import generation_pb2

SCRIPT_TEXT = "Hello wörld! 日本語のテキスト 😀🎉 café 5 € STOP naïve tail. "
ABORT = generation_pb2.FINISH_REASON_ABORT
LENGTH = generation_pb2.FINISH_REASON_LENGTH
STOP = generation_pb2.FINISH_REASON_STOP


@pytest.fixture(scope="module")
def script(gateway_tokenizer) -> list[int]:
    return gateway_tokenizer.encode(SCRIPT_TEXT)


@pytest.fixture(scope="module")
def eos_id(gateway_tokenizer) -> int:
    return gateway_tokenizer._tokenizer.token_to_id("<|endoftext|>")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, gateway_model_dir, script, eos_id):
    tmp = tmp_path_factory.mktemp("e2e")
    workers = [FakeWorker(tmp, f"w{i}", script, 0.01, eos_id) for i in range(2)]
    gateway = GatewayProcess(tmp, gateway_model_dir, [w.address for w in workers], "--shutdown-grace-s", "1")
    try:
        client.wait_until_serving(gateway.address, 15)
        yield gateway, workers
    finally:
        for process in (gateway, *workers):
            process.stop()


def expected_text(tokenizer, script: list[int], n: int) -> str:
    return tokenizer.decode([script[i % len(script)] for i in range(n)])


def worker_of(workers: list[FakeWorker], request_id: str) -> FakeWorker:
    for worker in workers:
        if worker.events(request_id):
            return worker
    raise AssertionError(f"no worker saw {request_id}")


def test_health_and_reflection(deployment) -> None:
    gateway, _ = deployment
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "epserve.v1.Generation"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"epserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_generate_streams_text_and_final(deployment, gateway_tokenizer, script) -> None:
    gateway, _ = deployment
    n = len(script)
    responses = list(client.stream_generate(gateway.address, "Hello", max_new_tokens=n, timeout_s=20))
    assert len(responses) > 1 and responses[-1].finished and not any(r.finished for r in responses[:-1])
    assert not any("\ufffd" in r.text for r in responses)
    ids = [t for r in responses for t in r.token_ids]
    assert ids == script
    assert "".join(r.text for r in responses) == gateway_tokenizer.decode(ids) == SCRIPT_TEXT
    final = responses[-1]
    assert final.finish_reason == LENGTH and final.request_id
    assert final.usage.prompt_tokens == len(gateway_tokenizer.encode("Hello"))
    assert final.usage.completion_tokens == n


def test_token_ids_in_and_stop_token(deployment, gateway_tokenizer, script) -> None:
    gateway, _ = deployment
    stop_id = script[5]
    result = client.generate(gateway.address, token_ids=[1, 2, 3], stop_token_ids=[stop_id], max_new_tokens=40)
    assert result.token_ids == script[:6]
    assert result.final.finish_reason == STOP and result.final.usage.prompt_tokens == 3


def test_stop_string_cut_and_aborted_at_worker(deployment, script) -> None:
    gateway, workers = deployment
    result = client.generate(gateway.address, "Hi", request_id="stop-string", stop=["STOP"], max_new_tokens=60)
    assert result.text == SCRIPT_TEXT.split("STOP")[0]
    assert result.final.finish_reason == STOP and result.final.matched_stop == "STOP"
    worker = worker_of(workers, "stop-string")
    worker.wait_for(lambda e: e["request_id"] == "stop-string" and e["event"] in ("abort", "cancelled"))
    assert worker.events("stop-string")[0]["stop"] == []          # stop strings stay in the gateway


def test_context_full_stops_with_length(deployment) -> None:
    gateway, _ = deployment
    prompt = [i % 256 for i in range(CONTEXT_LENGTH - 3)]
    result = client.generate(gateway.address, token_ids=prompt, max_new_tokens=100)
    assert len(result.token_ids) == 3 and result.final.finish_reason == LENGTH


BAD_REQUESTS = [
    ({"prompt": ""}, "text"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": [1, 99999]}, "token_ids[1]"),
    ({"token_ids": [i % 256 for i in range(CONTEXT_LENGTH)]}, "token_ids"),
    ({"prompt": "hi", "max_new_tokens": 0}, "sampling.max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 5000}, "sampling.max_new_tokens"),
    ({"prompt": "hi", "temperature": -1.0}, "sampling.temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "sampling.top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "sampling.top_p"),
    ({"prompt": "hi", "top_k": -2}, "sampling.top_k"),
    ({"prompt": "hi", "min_p": 1.0}, "sampling.min_p"),
    ({"prompt": "hi", "repetition_penalty": 0.0}, "sampling.repetition_penalty"),
    ({"prompt": "hi", "stop_token_ids": [99999]}, "sampling.stop_token_ids[0]"),
]


def test_bad_requests_are_invalid_argument_and_server_keeps_serving(deployment) -> None:
    gateway, _ = deployment
    for kwargs, field in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as info:
            list(client.stream_generate(gateway.address, timeout_s=10, **kwargs))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert info.value.details().startswith(field + ":"), (kwargs, info.value.details())
    assert client.generate(gateway.address, "still serving", max_new_tokens=3).final.finished


def test_abort_ends_stream_with_abort_and_worker_sees_it(deployment) -> None:
    gateway, workers = deployment
    stream = client.stream_generate(gateway.address, "long", request_id="abort-me", max_new_tokens=500,
                                    timeout_s=30)
    next(stream), next(stream)
    assert client.abort(gateway.address, "abort-me")
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == ABORT
    worker_of(workers, "abort-me").wait_for(lambda e: e["request_id"] == "abort-me" and e["event"] == "abort")
    assert not client.abort(gateway.address, "abort-me")     # no longer running
    assert not client.abort(gateway.address, "never-ran")


def test_duplicate_running_id_is_already_exists(deployment) -> None:
    gateway, _ = deployment
    stream = client.stream_generate(gateway.address, "a", request_id="dup", max_new_tokens=500, timeout_s=30)
    next(stream)
    with pytest.raises(grpc.RpcError) as info:
        list(client.stream_generate(gateway.address, "b", request_id="dup", max_new_tokens=5, timeout_s=10))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert client.abort(gateway.address, "dup")
    assert list(stream)[-1].finish_reason == ABORT


def test_client_cancel_aborts_at_worker(deployment) -> None:
    gateway, workers = deployment
    stream = client.stream_generate(gateway.address, "x", request_id="cancel-me", max_new_tokens=500,
                                    timeout_s=30)
    next(stream), next(stream)
    stream.close()                                            # cancels the RPC
    worker = worker_of(workers, "cancel-me")
    worker.wait_for(lambda e: e["request_id"] == "cancel-me" and e["event"] in ("abort", "cancelled"))
    worker.wait_for(lambda e: e["request_id"] == "cancel-me" and e["event"] == "finished")


def test_concurrent_requests_spread_over_workers(deployment) -> None:
    gateway, workers = deployment
    streams = [client.stream_generate(gateway.address, "s", request_id=f"spread-{i}", max_new_tokens=200,
                                      timeout_s=30) for i in range(2)]
    for stream in streams:
        next(stream)
    assert {worker_of(workers, f"spread-{i}").proc.pid for i in range(2)} == {w.proc.pid for w in workers}
    for i, stream in enumerate(streams):
        client.abort(gateway.address, f"spread-{i}")
        list(stream)


def test_model_info(deployment, gateway_tokenizer, eos_id) -> None:
    gateway, _ = deployment
    info = client.get_model_info(gateway.address)
    assert info.architecture == "Qwen3MoeForCausalLM" and info.max_context_length == CONTEXT_LENGTH
    assert info.vocab_size == gateway_tokenizer.vocab_size and eos_id in info.eos_token_ids
    assert (info.num_moe_layers, info.num_experts, info.num_experts_per_tok) == (2, 8, 2)
    assert info.num_attention_workers == 2


def test_worker_killed_mid_stream_continues_on_the_other(tmp_path, gateway_model_dir, gateway_tokenizer,
                                                         script, eos_id) -> None:
    workers = [FakeWorker(tmp_path, f"k{i}", script, 0.05, eos_id) for i in range(2)]
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [w.address for w in workers])
    try:
        client.wait_until_serving(gateway.address, 15)
        n = 30
        prompt = gateway_tokenizer.encode("Tell me")
        responses = []
        for response in client.stream_generate(gateway.address, "Tell me", request_id="survivor",
                                               max_new_tokens=n, timeout_s=30):
            responses.append(response)
            if len(responses) == 5:
                first = worker_of(workers, "survivor")
                first.kill()
        ids = [t for r in responses for t in r.token_ids]
        assert responses[-1].finished and responses[-1].finish_reason == LENGTH
        assert ids == [script[i % len(script)] for i in range(n)]
        assert "".join(r.text for r in responses) == expected_text(gateway_tokenizer, script, n)
        assert responses[-1].usage.completion_tokens == n and responses[-1].usage.prompt_tokens == len(prompt)
        (second,) = [w for w in workers if w is not first]
        (retry,) = [e for e in second.events("survivor") if e["event"] == "generate"]
        m = retry["num_generated_before"]
        assert m >= 5
        assert retry["prompt_ids"] == prompt + ids[:m] and retry["max_new_tokens"] == n - m
    finally:
        for process in (gateway, *workers):
            process.stop()


def test_last_worker_lost_is_unavailable(tmp_path, gateway_model_dir, script, eos_id) -> None:
    worker = FakeWorker(tmp_path, "only", script, 0.05, eos_id)
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [worker.address])
    try:
        client.wait_until_serving(gateway.address, 15)
        stream = client.stream_generate(gateway.address, "x", max_new_tokens=100, timeout_s=30)
        next(stream)
        worker.kill()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no attention worker" in info.value.details()
        with grpc.insecure_channel(gateway.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gateway.stop()
        worker.stop()


def test_sigterm_aborts_streams_after_grace_and_exits_0(tmp_path, gateway_model_dir, script, eos_id) -> None:
    worker = FakeWorker(tmp_path, "t", script, 0.02, eos_id)
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [worker.address], "--shutdown-grace-s", "0.5")
    try:
        client.wait_until_serving(gateway.address, 15)
        stream = client.stream_generate(gateway.address, "x", request_id="term", max_new_tokens=500, timeout_s=30)
        next(stream)
        started = time.monotonic()
        gateway.signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].finished and rest[-1].finish_reason == ABORT
        assert gateway.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 8
        worker.wait_for(lambda e: e["request_id"] == "term" and e["event"] in ("abort", "cancelled"))
    finally:
        gateway.stop()
        worker.stop()


def test_sigterm_lets_short_streams_finish(tmp_path, gateway_model_dir, script, eos_id) -> None:
    worker = FakeWorker(tmp_path, "f", script, 0.02, eos_id)
    gateway = GatewayProcess(tmp_path, gateway_model_dir, [worker.address], "--shutdown-grace-s", "5")
    try:
        client.wait_until_serving(gateway.address, 15)
        stream = client.stream_generate(gateway.address, "x", max_new_tokens=20, timeout_s=30)
        next(stream)
        gateway.signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].finish_reason == LENGTH
        assert gateway.proc.wait(timeout=10) == 0
    finally:
        gateway.stop()
        worker.stop()



def test_client_deadline_is_deadline_exceeded_and_aborted_at_worker(deployment) -> None:
    gateway, workers = deployment
    with pytest.raises(grpc.RpcError) as info:
        list(client.stream_generate(gateway.address, "x", request_id="late", max_new_tokens=500, timeout_s=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    worker = worker_of(workers, "late")
    worker.wait_for(lambda e: e["request_id"] == "late" and e["event"] in ("abort", "cancelled"))
