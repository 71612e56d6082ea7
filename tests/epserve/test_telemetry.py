"""epserve.telemetry: tracing through real gRPC calls into an in-process OTLP receiver, data-plane
context bytes and links, the no-endpoint mode, and Prometheus metrics scraped over HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import timeit
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from otlp_receiver import OtlpReceiver
from prometheus_client import CollectorRegistry

from epserve.grpc_server import serve_grpc
from epserve.telemetry import (AttentionWorkerMetrics, ExpertWorkerMetrics, GatewayMetrics, LoadWindow,
                               PlacementMetrics, StepSampler, balancedness, decode_trace_context,
                               encode_trace_context, setup_tracing, span_links_from, start_metrics_server)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "test.Echo"
STREAM_ITEMS, STREAM_GAP_S = 3, 0.05


# ---- fixtures: two traced "processes" in one test process, a gRPC server between them ---------


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def tracings(receiver):
    client = setup_tracing("test-client", receiver.endpoint, schedule_delay_s=0.05)
    server = setup_tracing("test-server", receiver.endpoint, schedule_delay_s=0.05)
    yield client, server
    client.shutdown()
    server.shutdown()


def _echo_handler(tracing) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"internal":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if request == b"invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
        with tracing.span("echo.unary.work"):
            return request

    def stream(request: bytes, context: grpc.ServicerContext):
        count = 1000 if request == b"endless" else STREAM_ITEMS
        with tracing.span("echo.stream.work"):        # open across yields
            for i in range(count):
                time.sleep(STREAM_GAP_S)
                if request == b"fail" and i == 1:
                    raise RuntimeError("handler failed mid-stream")
                yield bytes([i % 256])
            with tracing.span("echo.stream.last"):
                pass

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream)})


@pytest.fixture
def echo(tracings):
    client_tracing, server_tracing = tracings
    handler = _echo_handler(server_tracing)
    server = serve_grpc([(lambda _servicer, s: s.add_generic_rpc_handlers((handler,)), None, SERVICE)],
                        "127.0.0.1", 0, max_workers=8, interceptors=server_tracing.server_interceptors())
    channel = client_tracing.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    yield channel
    channel.close()
    server.stop(0.5)


def _unary(channel: grpc.Channel):
    return channel.unary_unary(f"/{SERVICE}/Unary")


def _stream(channel: grpc.Channel):
    return channel.unary_stream(f"/{SERVICE}/Stream")


def _flush(*tracings) -> None:
    for t in tracings:
        assert t.force_flush(5.0)


# ---- gRPC propagation -----------------------------------------------------------------------


def test_unary_and_streaming_calls_join_the_callers_trace(tracings, echo, receiver):
    client_tracing, server_tracing = tracings
    with client_tracing.span("client.request") as root:
        assert _unary(echo)(b"hi", timeout=5) == b"hi"
        replies = list(_stream(echo)(b"go", timeout=5))
        health = health_pb2_grpc.HealthStub(echo).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert replies == [bytes([i]) for i in range(STREAM_ITEMS)]
    _flush(client_tracing, server_tracing)
    spans = receiver.wait_for_names("client.request", f"{SERVICE}/Unary", f"{SERVICE}/Stream",
                                         "echo.unary.work", "echo.stream.work", "echo.stream.last")
    by_name = {s.name: s for s in spans}
    trace_id = format(root.get_span_context().trace_id, "032x")
    client_span = by_name["client.request"]
    assert client_span.service_name == "test-client" and client_span.parent_span_id is None
    assert {s.trace_id for s in spans} == {trace_id}

    for method in ("Unary", "Stream"):
        server_span = by_name[f"{SERVICE}/{method}"]
        assert server_span.service_name == "test-server" and server_span.kind == "SERVER"
        assert server_span.parent_span_id == client_span.span_id
        assert server_span.attributes["rpc.system"] == "grpc"
        assert server_span.attributes["rpc.method"] == method
        assert server_span.attributes["rpc.grpc.status_code"] == 0
        assert server_span.status == "UNSET"
    assert by_name["echo.unary.work"].parent_span_id == by_name[f"{SERVICE}/Unary"].span_id
    assert by_name["echo.stream.work"].parent_span_id == by_name[f"{SERVICE}/Stream"].span_id
    assert by_name["echo.stream.last"].parent_span_id == by_name["echo.stream.work"].span_id
    # The streaming span ends with the stream, not when the handler returned its iterator.
    assert by_name[f"{SERVICE}/Stream"].duration_s >= STREAM_ITEMS * STREAM_GAP_S * 0.9
    assert not any("grpc.health" in s.name for s in spans)


def test_call_without_context_starts_a_root_server_span(tracings, echo, receiver):
    client_tracing, server_tracing = tracings
    assert _unary(echo)(b"alone", timeout=5) == b"alone"   # no current span on the client
    _flush(server_tracing)
    (span,) = [s for s in receiver.wait_for_names(f"{SERVICE}/Unary") if s.name == f"{SERVICE}/Unary"]
    assert span.parent_span_id is None and span.service_name == "test-server"


def test_server_span_status_follows_grpc_codes(tracings, echo, receiver):
    client_tracing, server_tracing = tracings
    with client_tracing.span("client.errors"):
        for payload, code in ((b"internal", grpc.StatusCode.INTERNAL), (b"invalid", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as err:
                _unary(echo)(payload, timeout=5)
            assert err.value.code() == code
        with pytest.raises(grpc.RpcError) as err:
            list(_stream(echo)(b"fail", timeout=5))
        assert err.value.code() == grpc.StatusCode.INTERNAL       # grpc_guard: never UNKNOWN
    _flush(server_tracing)
    spans = receiver.wait_for(lambda ss: len([s for s in ss if s.name.startswith(SERVICE)]) == 3)
    unary = sorted((s for s in spans if s.name == f"{SERVICE}/Unary"),
                   key=lambda s: s.attributes["rpc.grpc.status_code"])
    assert [s.attributes["rpc.grpc.status_code"] for s in unary] == [3, 13]
    assert unary[0].status == "UNSET"                       # INVALID_ARGUMENT: the caller's mistake
    assert unary[1].status == "ERROR" and "INTERNAL: boom" in unary[1].status_message
    (stream,) = [s for s in spans if s.name == f"{SERVICE}/Stream"]
    assert stream.status == "ERROR" and stream.attributes["rpc.grpc.status_code"] == 13
    assert "handler failed mid-stream" in stream.status_message


def test_cancelled_stream_ends_its_span(tracings, echo, receiver, caplog):
    client_tracing, server_tracing = tracings
    caplog.set_level(logging.WARNING)
    with client_tracing.span("client.cancel"):
        call = _stream(echo)(b"endless", timeout=10)
        assert next(call) == b"\x00"
        call.cancel()
    started = time.monotonic()
    # The SERVER span ends with the RPC; the abandoned handler is closed, ending its own span.
    spans = receiver.wait_for_names(f"{SERVICE}/Stream", "echo.stream.work", timeout_s=5)
    (stream,) = [s for s in spans if s.name == f"{SERVICE}/Stream"]
    assert stream.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert stream.status == "UNSET" and stream.duration_s < 5 and time.monotonic() - started < 5
    assert not [r for r in caplog.records if "detach" in r.getMessage()]


# ---- data plane -----------------------------------------------------------------------------


def test_data_plane_context_round_trips_and_links(tracings, receiver):
    sender, expert = tracings
    with sender.span("step.a") as step_a:
        context_a = encode_trace_context()
        assert sender.current_trace_context() == context_a
    with sender.span("step.b") as step_b:
        context_b = encode_trace_context()
    assert len(context_a) <= 64 and context_a.startswith(b"00-") and int(context_a[-2:], 16) & 1
    decoded = decode_trace_context(context_a)
    assert decoded.trace_id == step_a.get_span_context().trace_id
    assert decoded.span_id == step_a.get_span_context().span_id and decoded.is_remote

    links = span_links_from([context_a, b"", b"garbage", context_b, context_a])
    assert [link.context.span_id for link in links] == [step_a.get_span_context().span_id,
                                                         step_b.get_span_context().span_id]

    with expert.linked_span("expert.compute", [b"", context_a, context_b], attributes={"layer": 3}) as span:
        assert span.is_recording()
    _flush(sender, expert)
    spans = receiver.wait_for_names("step.a", "step.b", "expert.compute")
    by_name = {s.name: s for s in spans}
    compute = by_name["expert.compute"]
    assert compute.service_name == "test-server" and compute.attributes["layer"] == 3
    assert compute.trace_id == by_name["step.a"].trace_id and compute.parent_span_id == by_name["step.a"].span_id
    assert [(link.trace_id, link.span_id) for link in compute.links] == [
        (by_name[n].trace_id, by_name[n].span_id) for n in ("step.a", "step.b")]


def test_unsampled_contexts_make_no_expert_span(receiver):
    sender = setup_tracing("unsampled", receiver.endpoint, sample_ratio=0.0)
    expert = setup_tracing("expert", receiver.endpoint)
    try:
        with sender.span("step") as span:
            assert not span.is_recording()
            assert encode_trace_context() == b""
        with expert.linked_span("expert.compute", [b"", b""]) as span:
            assert not span.is_recording()
        with expert.linked_span("expert.compute", [b"junk"], sampled=True) as span:
            assert not span.is_recording()
        unsampled_sender = b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-00"
        assert len(span_links_from([unsampled_sender])) == 1
        with expert.linked_span("expert.compute", [unsampled_sender]) as span:
            assert not span.is_recording()
        with expert.span("detail", sampled=False) as span:
            assert not span.is_recording()
        _flush(sender, expert)
        time.sleep(0.2)
        assert receiver.spans == []
    finally:
        sender.shutdown()
        expert.shutdown()


def test_record_span_keeps_explicit_times_under_the_parent(tracings, receiver):
    sender, engine = tracings
    with sender.span("request") as request:
        context = encode_trace_context()
    start_ns = time.time_ns() - 2_000_000_000
    engine.record_span("queue", context, start_ns, start_ns + 1_000_000, attributes={"epserve.request_id": "r"})
    engine.record_span("ignored", b"", start_ns, start_ns + 1)               # not traced: nothing
    engine.record_span("ignored", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-00", start_ns, start_ns + 1)
    _flush(sender, engine)
    spans = receiver.wait_for_names("request", "queue")
    (queue,) = [s for s in spans if s.name == "queue"]
    assert queue.parent_span_id == format(request.get_span_context().span_id, "016x")
    assert queue.trace_id == format(request.get_span_context().trace_id, "032x")
    assert (queue.start_ns, queue.end_ns) == (start_ns, start_ns + 1_000_000)
    assert queue.service_name == "test-server" and queue.attributes["epserve.request_id"] == "r"
    assert not any(s.name == "ignored" for s in receiver.spans)
    setup_tracing("off", None).record_span("x", context, start_ns, start_ns + 1)   # off: no error, nothing


def test_expert_compute_of_a_batch_links_every_sender(tracings, receiver):
    """A batch of two attention workers' requests (the expert server's header carries both
    contexts) is one ``expert.compute`` span, child of the first sender, linked to both."""
    import torch

    from epserve.dataplane import BatchHeader
    from epserve.expert_worker.observed_compute import ObservedCompute

    sender, expert = tracings
    metrics = ExpertWorkerMetrics()
    contexts = []
    for name in ("attention.step.a", "attention.step.b"):
        with sender.span(name):
            contexts.append(encode_trace_context())
    header = BatchHeader(3, 1, 0, 5, contexts[0], (contexts[0], contexts[1]))
    compute = ObservedCompute(lambda h, hidden, ids, weights: hidden * 2, expert, metrics)
    out = compute(header, torch.ones(5, 4), torch.zeros(5, 2, dtype=torch.int64), torch.ones(5, 2))
    assert torch.equal(out, torch.full((5, 4), 2.0))
    compute(BatchHeader(3, 1, 0, 2), torch.ones(2, 4), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
    _flush(sender, expert)
    spans = receiver.wait_for_names("attention.step.a", "attention.step.b", "expert.compute")
    by_name = {s.name: s for s in spans}
    (span,) = [s for s in spans if s.name == "expert.compute"]          # the untraced batch made none
    assert span.parent_span_id == by_name["attention.step.a"].span_id
    assert {link.span_id for link in span.links} == {by_name[n].span_id for n in ("attention.step.a",
                                                                                  "attention.step.b")}
    assert span.attributes["epserve.num_senders"] == 2 and span.attributes["epserve.num_tokens"] == 5
    assert metrics.registry.get_sample_value("epserve_expert_batches_total") == 2
    assert metrics.registry.get_sample_value("epserve_expert_tokens_total") == 7


def test_step_sampler():
    assert [s for s in range(40) if StepSampler(16).sample(s)] == [0, 16, 32]
    assert all(StepSampler(1).sample(s) for s in range(5))
    assert not any(StepSampler(0).sample(s) for s in range(5))
    assert StepSampler.from_ratio(1 / 16) == StepSampler(16) and StepSampler.from_ratio(0.0) == StepSampler(0)
    with pytest.raises(ValueError):
        StepSampler(-1)
    with pytest.raises(ValueError):
        StepSampler.from_ratio(1.5)


# ---- no endpoint: nothing at all ------------------------------------------------------------


def test_no_endpoint_records_and_exports_nothing(receiver):
    threads_before = set(threading.enumerate())
    tracing = setup_tracing("quiet", None)
    assert not tracing.enabled and tracing.provider is None
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    channel = grpc.insecure_channel("127.0.0.1:1")
    assert tracing.intercept_channel(channel) is channel
    channel.close()
    with tracing.span("nothing") as span:
        assert not span.is_recording()
        assert encode_trace_context() == b"" and tracing.current_trace_context() == b""
    with tracing.linked_span("nothing", [b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"]) as span:
        assert not span.is_recording()
    tracing.shutdown()
    assert set(threading.enumerate()) <= threads_before
    assert trace.get_tracer_provider() is not tracing.provider
    time.sleep(0.2)
    assert receiver.spans == []


def test_no_endpoint_never_loads_the_sdk():
    code = ("import sys; from epserve.telemetry import setup_tracing; t = setup_tracing('x', None)\n"
            "with t.span('a'): pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_op_span_costs_about_nothing():
    """~0.5 us per span on an idle core. The bound scales with a bare Python call measured alongside,
    so a loaded CI machine does not make it flaky."""
    tracing = setup_tracing("quiet", None)

    def one_span():
        with tracing.span("attention.step", attributes=None):
            pass

    def bare_call(name, *, attributes=None):
        return None

    def baseline():
        bare_call("attention.step", attributes=None)

    n = 20000
    per_span_s = min(timeit.repeat(one_span, number=n, repeat=5)) / n
    per_encode_s = min(timeit.repeat(tracing.current_trace_context, number=n, repeat=5)) / n
    per_call_s = min(timeit.repeat(baseline, number=n, repeat=5)) / n
    print(f"no-op span: {per_span_s * 1e6:.3f} us, current_trace_context (off): {per_encode_s * 1e6:.3f} us, "
          f"bare call: {per_call_s * 1e6:.3f} us")
    assert per_span_s < max(2e-6, 8 * per_call_s)
    assert per_encode_s < max(2e-6, 8 * per_call_s)


def test_setup_tracing_rejects_bad_arguments():
    for endpoint in ("localhost", "http://collector", ":4317", "host:port"):
        with pytest.raises(ValueError, match="otlp-endpoint"):
            setup_tracing("svc", endpoint)
    with pytest.raises(ValueError):
        setup_tracing("", None)
    with pytest.raises(ValueError):
        setup_tracing("svc", None, sample_ratio=2.0)


def test_enabled_tracing_leaves_the_global_provider_alone(receiver):
    tracing = setup_tracing("local", receiver.endpoint)
    try:
        assert tracing.enabled and trace.get_tracer_provider() is not tracing.provider
    finally:
        tracing.shutdown()
        tracing.shutdown()  # idempotent


# ---- metrics --------------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


EXPECTED_NAMES = {
    GatewayMetrics: ["epserve_gateway_requests_total", "epserve_gateway_time_to_first_token_seconds_bucket",
                     "epserve_gateway_inter_token_latency_seconds_bucket",
                     "epserve_gateway_e2e_request_latency_seconds_bucket", "epserve_gateway_requests_in_flight",
                     "epserve_gateway_prompt_tokens_total", "epserve_gateway_completion_tokens_total",
                     "epserve_gateway_request_retries_total"],
    AttentionWorkerMetrics: ["epserve_attention_requests_waiting", "epserve_attention_requests_running",
                             "epserve_attention_kv_cache_blocks_used", "epserve_attention_kv_cache_blocks_total",
                             "epserve_attention_step_duration_seconds_bucket",
                             "epserve_attention_tokens_per_step_bucket", "epserve_attention_expert_tokens_total",
                             "epserve_attention_expert_balancedness", "epserve_attention_map_version",
                             "epserve_attention_preemptions_total", "epserve_attention_dataplane_timeouts_total"],
    ExpertWorkerMetrics: ["epserve_expert_batches_total", "epserve_expert_tokens_total",
                          "epserve_expert_compute_duration_seconds_bucket", "epserve_expert_held_map_versions",
                          "epserve_expert_map_version", "epserve_expert_resident_weight_bytes",
                          "epserve_expert_stale_version_refusals_total",
                          "epserve_expert_map_load_duration_seconds_bucket",
                          "epserve_expert_map_load_paced_sleep_seconds_total"],
    PlacementMetrics: ["epserve_placement_map_version", "epserve_placement_rebalances_total",
                       "epserve_placement_rebalance_duration_seconds_bucket", "epserve_placement_workers",
                       "epserve_placement_balancedness"],
}


def _touch_labelled(metrics) -> None:
    """Labelled series appear once a label set is used."""
    if isinstance(metrics, GatewayMetrics):
        metrics.requests.labels(finish_reason="stop", code="OK").inc()
    elif isinstance(metrics, AttentionWorkerMetrics):
        metrics.record_expert_load({"0": 3, "1": 1})
        metrics.dataplane_timeouts.labels(expert_worker="1").inc()
    elif isinstance(metrics, PlacementMetrics):
        metrics.rebalances.labels(reason="eplb", outcome="committed").inc()
        metrics.set_worker_counts({("expert", "ALIVE"): 2})


@pytest.mark.parametrize("cls", list(EXPECTED_NAMES), ids=lambda c: c.__name__)
def test_metrics_server_serves_every_metric(cls):
    metrics = cls(expert_distribution=True) if cls is AttentionWorkerMetrics else cls()
    _touch_labelled(metrics)
    server = start_metrics_server(0, metrics.registry, host="127.0.0.1")
    try:
        assert server.port > 0
        text = _scrape(server.port)
    finally:
        server.stop()
    for name in EXPECTED_NAMES[cls]:
        assert f"\n{name}" in text, name
    assert "process_cpu_seconds_total" in text or sys.platform != "linux"


def test_registries_are_independent():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.requests_in_flight.inc(3)
    a.prompt_tokens.inc(7)
    assert a.registry is not b.registry
    assert a.registry.get_sample_value("epserve_gateway_requests_in_flight") == 3
    assert b.registry.get_sample_value("epserve_gateway_requests_in_flight") == 0
    assert b.registry.get_sample_value("epserve_gateway_prompt_tokens_total") == 0
    shared = CollectorRegistry()
    GatewayMetrics(shared)
    with pytest.raises(ValueError):   # one registry holds one set: duplicates are refused loudly
        GatewayMetrics(shared)


def test_balancedness_and_load_window():
    assert balancedness([]) == 1.0 and balancedness([0, 0]) == 1.0
    assert balancedness([4, 4]) == 1.0 and balancedness([8, 0]) == 0.5
    window = LoadWindow(window=2)
    window.add({"0": 6, "1": 2})
    window.add({"0": 0, "1": 4})
    assert window.totals() == {"0": 6, "1": 6} and window.balancedness() == 1.0
    window.add({"1": 4})                    # worker 0 left the map: still counted while in the window
    assert window.totals() == {"0": 0, "1": 8}
    window.add({"1": 1})
    assert window.totals() == {"1": 5} and window.balancedness() == 1.0

    metrics = AttentionWorkerMetrics(load_window=4, expert_distribution=True)
    metrics.record_expert_load({"0": 30, "1": 10})
    assert metrics.registry.get_sample_value("epserve_attention_expert_balancedness") == 20 / 30
    assert metrics.registry.get_sample_value("epserve_attention_expert_tokens_total", {"expert_worker": "0"}) == 30


def test_expert_load_series_exist_only_with_expert_distribution():
    expert_series = ("epserve_attention_expert_tokens_total", "epserve_attention_expert_balancedness")
    off = AttentionWorkerMetrics()
    assert off.expert_tokens is None and off.balancedness is None
    names = {family.name for family in off.registry.collect()} | {
        sample.name for family in off.registry.collect() for sample in family.samples}
    assert not any(name.startswith(expert_series) for name in names)
    assert "epserve_attention_map_version" in names
    with pytest.raises(AssertionError, match="enable-expert-distribution-metrics"):
        off.record_expert_load({"expert-0": 1})
    on = AttentionWorkerMetrics(expert_distribution=True)
    on.record_expert_load({"expert-0": 3, "expert-1": 1})
    assert on.registry.get_sample_value("epserve_attention_expert_tokens_total", {"expert_worker": "expert-1"}) == 1
    assert on.registry.get_sample_value("epserve_attention_expert_balancedness") == 2 / 3


def test_worker_counts_drop_states_no_longer_reported():
    metrics = PlacementMetrics()
    metrics.set_worker_counts({("expert", "ALIVE"): 2, ("attention", "ALIVE"): 1})
    metrics.set_worker_counts({("expert", "ALIVE"): 1, ("expert", "DEAD"): 1, ("attention", "ALIVE"): 1})
    metrics.set_worker_counts({("expert", "DEAD"): 2})
    value = metrics.registry.get_sample_value
    assert value("epserve_placement_workers", {"role": "expert", "state": "ALIVE"}) == 0
    assert value("epserve_placement_workers", {"role": "expert", "state": "DEAD"}) == 2
    assert value("epserve_placement_workers", {"role": "attention", "state": "ALIVE"}) == 0


def test_expert_held_versions():
    metrics = ExpertWorkerMetrics()
    metrics.set_held_versions([4, 5])
    assert metrics.registry.get_sample_value("epserve_expert_held_map_versions") == 2
    assert metrics.registry.get_sample_value("epserve_expert_map_version") == 5
