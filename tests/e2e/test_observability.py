"""Observability end to end: one deployment of real processes exporting traces to an in-process
OTLP receiver and serving Prometheus /metrics; one Generate must be one trace across the
gateway, the attention worker and the expert workers."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from prometheus_client.parser import text_string_to_metric_families

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import generate
from epserve.protos import generation_pb2, placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.slow

REQUEST_ID = "traced-request-1"
MAX_NEW_TOKENS = 4
EXPERT_WORKERS = ("expert-0", "expert-1")


def scrape(endpoint: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value from ``http://endpoint/metrics``."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def names(samples: dict[tuple[str, tuple], float]) -> set[str]:
    return {name for name, _ in samples}


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def observed(tiny_model, receiver, tmp_path_factory):
    """1 attention worker (every step traced), 2 expert workers, traces and metrics (with the expert-load
    series) on."""
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=1, num_expert_workers=2,
                              dtype="float32", otlp_endpoint=receiver.endpoint, metrics=True,
                              enable_expert_distribution_metrics=True,
                              extra_attention_args=["--trace-step-every", "1"],
                              log_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalDeployment(config) as running:
        yield running


@pytest.fixture(scope="module")
def served(observed):
    """Metrics before and after one Generate, and its result."""
    endpoints = observed.metrics_endpoints
    before = {name: scrape(endpoint) for name, endpoint in endpoints.items()}
    result = generate(f"127.0.0.1:{observed.gateway_port}", "Tell me about the weather", request_id=REQUEST_ID,
                      max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, temperature=0.0, timeout_s=120)
    after = {name: scrape(endpoint) for name, endpoint in endpoints.items()}
    return result, before, after


def _request_trace(receiver: OtlpReceiver) -> list[ReceivedSpan]:
    """Every span of the request's trace, once the engine's and experts' spans have arrived."""
    def complete(spans: list[ReceivedSpan]) -> bool:
        roots = [s for s in spans if s.name == "gateway.request" and s.attributes.get("epserve.request_id")
                 == REQUEST_ID]
        if not roots:
            return False
        in_trace = [s for s in spans if s.trace_id == roots[0].trace_id]
        have = {(s.resource.get("service.instance.id", s.service_name), s.name) for s in in_trace}
        return {("epserve-gateway", "epserve.v1.Generation/Generate"), ("attention-0", "decode"),
                ("attention-0", "epserve.v1.AttentionWorker/Generate"), ("attention-0", "moe.combine"),
                *((worker, "expert.compute") for worker in EXPERT_WORKERS)} <= have
    spans = receiver.wait_for(complete, timeout_s=30)   # each process exports on its own schedule
    trace_id = next(s.trace_id for s in spans if s.name == "gateway.request")
    return [s for s in spans if s.trace_id == trace_id]


def test_one_request_is_one_trace_across_the_processes(served, receiver):
    result, _, _ = served
    assert result.final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    spans = _request_trace(receiver)
    by_id = {s.span_id: s for s in spans}

    def one(service: str, name: str) -> ReceivedSpan:
        found = [s for s in spans if s.service_name == service and s.name == name]
        assert len(found) == 1, (service, name, found)
        return found[0]

    gateway_rpc = one("epserve-gateway", "epserve.v1.Generation/Generate")
    assert gateway_rpc.kind == "SERVER" and gateway_rpc.parent_span_id is None
    request = one("epserve-gateway", "gateway.request")
    assert request.parent_span_id == gateway_rpc.span_id
    assert request.attributes["epserve.completion_tokens"] == MAX_NEW_TOKENS
    assert request.attributes["epserve.prompt_tokens"] > 0
    assert request.attributes["epserve.finish_reason"] == "length"

    worker_rpc = one("epserve-attention-worker", "epserve.v1.AttentionWorker/Generate")
    assert worker_rpc.kind == "SERVER" and worker_rpc.parent_span_id == request.span_id
    queue, prefill, decode = (one("epserve-attention-worker", name) for name in ("queue", "prefill", "decode"))
    for phase in (queue, prefill, decode):
        assert phase.parent_span_id == worker_rpc.span_id
    assert queue.end_ns <= prefill.start_ns + 1 and prefill.end_ns <= decode.start_ns + 1
    assert decode.attributes["epserve.completion_tokens"] == MAX_NEW_TOKENS

    steps = [s for s in spans if s.name == "attention.step"]
    assert len(steps) >= MAX_NEW_TOKENS            # every step sampled: prefill + 3 decodes at least
    for step in steps:
        assert step.parent_span_id == worker_rpc.span_id
        assert step.attributes["epserve.num_seqs"] == 1
    step_ids = {s.span_id for s in steps}
    exchanges = [s for s in spans if s.name in ("moe.dispatch", "moe.combine")]
    assert exchanges and all(s.parent_span_id in step_ids for s in exchanges)

    computes = [s for s in spans if s.name == "expert.compute"]
    assert {s.resource["service.instance.id"] for s in computes} == set(EXPERT_WORKERS)
    for compute in computes:
        assert compute.parent_span_id in step_ids and by_id[compute.parent_span_id].name == "attention.step"
        assert compute.parent_span_id in {link.span_id for link in compute.links}
        assert compute.attributes["epserve.num_tokens"] > 0


def test_placement_traces_its_own_work(observed, served, receiver):
    """Registration (SERVER spans) and the first map's pushes to every worker, in placement's traces."""
    workers = {"attention-0", *EXPERT_WORKERS}

    def arrived(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.service_name == "epserve-placement"]
        registered = [s for s in mine if s.name == "epserve.v1.Placement/Register"]
        pushed = {s.attributes.get("epserve.worker_id") for s in mine if s.name == "placement.push"
                  and s.attributes.get("epserve.phase") == "COMMIT"}
        return len(registered) >= len(workers) and workers <= pushed
    spans = [s for s in receiver.wait_for(arrived, timeout_s=30) if s.service_name == "epserve-placement"]
    for register in (s for s in spans if s.name == "epserve.v1.Placement/Register"):
        assert register.kind == "SERVER" and register.attributes["rpc.grpc.status_code"] == 0
    first = [s for s in spans if s.name == "placement.push" and s.attributes["epserve.map_version"] == 1]
    assert {s.attributes["epserve.worker_id"] for s in first} >= workers
    assert not any(s.name in ("epserve.v1.Placement/Heartbeat", "epserve.v1.Placement/WatchPlacement")
                   for s in spans)


def test_every_process_serves_its_metrics(observed, served):
    _, before, after = served
    assert {"gateway", "placement", "attention-0", *EXPERT_WORKERS} <= set(after), observed.metrics_endpoints

    gateway = after["gateway"]
    assert {"epserve_gateway_requests_total", "epserve_gateway_time_to_first_token_seconds_bucket",
            "epserve_gateway_inter_token_latency_seconds_bucket", "epserve_gateway_requests_in_flight",
            "epserve_gateway_e2e_request_latency_seconds_count"} <= names(gateway)
    ok = dict(finish_reason="length", code="OK")
    assert value(gateway, "epserve_gateway_requests_total", **ok) == \
        value(before["gateway"], "epserve_gateway_requests_total", **ok) + 1
    assert value(gateway, "epserve_gateway_time_to_first_token_seconds_count") >= 1
    assert value(gateway, "epserve_gateway_inter_token_latency_seconds_count") >= MAX_NEW_TOKENS - 1
    assert value(gateway, "epserve_gateway_requests_in_flight") == 0

    attention = after["attention-0"]
    assert {"epserve_attention_requests_waiting", "epserve_attention_requests_running",
            "epserve_attention_kv_cache_blocks_used", "epserve_attention_kv_cache_blocks_total",
            "epserve_attention_step_duration_seconds_bucket", "epserve_attention_expert_balancedness",
            "epserve_attention_map_version"} <= names(attention)
    assert value(attention, "epserve_attention_kv_cache_blocks_total") > 0
    assert value(attention, "epserve_attention_map_version") >= 1
    sent = {w: value(attention, "epserve_attention_expert_tokens_total", expert_worker=w) for w in EXPERT_WORKERS}
    assert all(n > 0 for n in sent.values()), sent
    # No traffic before this request: the 64-step window holds all of it.
    assert value(attention, "epserve_attention_expert_balancedness") == \
        pytest.approx(sum(sent.values()) / len(sent) / max(sent.values()))

    placement = after["placement"]            # rebalance metrics: see test_a_rebalance_is_traced_and_counted
    assert {"epserve_placement_map_version", "epserve_placement_workers", "epserve_placement_balancedness",
            "epserve_placement_rebalance_duration_seconds_count"} <= names(placement)
    assert value(placement, "epserve_placement_map_version") >= 1
    assert value(placement, "epserve_placement_workers", role="expert", state="ALIVE") == len(EXPERT_WORKERS)
    assert value(placement, "epserve_placement_workers", role="attention", state="ALIVE") == 1

    for worker in EXPERT_WORKERS:
        expert = after[worker]
        assert {"epserve_expert_batches_total", "epserve_expert_compute_duration_seconds_bucket",
                "epserve_expert_held_map_versions", "epserve_expert_resident_weight_bytes"} <= names(expert)
        assert value(expert, "epserve_expert_batches_total") > value(before[worker], "epserve_expert_batches_total")
        assert value(expert, "epserve_expert_map_version") >= 1
        assert value(expert, "epserve_expert_resident_weight_bytes") > 0
        assert value(expert, "epserve_expert_map_load_duration_seconds_count") >= 1     # the first map


def test_a_rebalance_is_traced_and_counted(tiny_model_factory, tmp_path):
    """An admin Rebalance on a skewed model: placement.rebalance with plan, prepare and commit
    under the RPC's span, and the rebalance counted and timed."""
    model = tiny_model_factory(seed=1, router_skew=1.0)
    with OtlpReceiver() as receiver:
        config = DeploymentConfig(model_path=str(model), num_attention_workers=1, num_expert_workers=2,
                                  num_redundant_experts=2, dtype="float32", otlp_endpoint=receiver.endpoint,
                                  metrics=True, log_dir=str(tmp_path / "logs"),
                                  extra_attention_args=["--load-report-interval-s", "0.2"])
        with LocalDeployment(config) as deployment:
            for i in range(3):
                generate(f"127.0.0.1:{deployment.gateway_port}", f"hello there number {i}", max_new_tokens=16,
                         ignore_eos=True, temperature=0.0, timeout_s=120)
            time.sleep(1.0)                   # the load reports reach placement
            with grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}") as channel:
                result = placement_pb2_grpc.PlacementAdminStub(channel).Rebalance(placement_pb2.RebalanceRequest(),
                                                                                  timeout=60)
            assert result.num_versions == 1, result
            metrics = scrape(deployment.metrics_endpoints["placement"])
            assert "epserve_placement_rebalances_total" in names(metrics)
            spans = receiver.wait_for_names("epserve.v1.PlacementAdmin/Rebalance", "placement.rebalance",
                                            "placement.plan", "placement.prepare", "placement.commit", timeout_s=30)
    by_name = {s.name: s for s in spans if s.service_name == "epserve-placement"}
    rebalance = by_name["placement.rebalance"]
    assert rebalance.parent_span_id == by_name["epserve.v1.PlacementAdmin/Rebalance"].span_id
    assert rebalance.attributes["epserve.reason"] == "rebalance"
    assert (rebalance.attributes["epserve.from_version"], rebalance.attributes["epserve.to_version"]) == \
        (result.previous_version, result.version)
    for name in ("placement.plan", "placement.prepare", "placement.commit"):
        assert by_name[name].parent_span_id == rebalance.span_id
    assert by_name["placement.commit"].attributes["epserve.to_version"] == result.version
    assert value(metrics, "epserve_placement_rebalances_total", reason="rebalance", outcome="committed") == 1
    assert value(metrics, "epserve_placement_rebalance_duration_seconds_count") == 1
