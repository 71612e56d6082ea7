"""Prometheus metrics: one ``*Metrics`` object per process, each with its own ``CollectorRegistry``.

A process makes its metrics object in ``main()``, passes it down, and serves it with
``start_metrics_server(port, metrics.registry)``. The objects hold plain prometheus_client
metrics as attributes (``metrics.requests_in_flight.inc()``); a few ``record_*``/``set_*``
methods cover what needs more than one call. Nothing is global: two objects never share a
series, which keeps in-process tests independent.

Names start with ``epserve_<role>_``; labels are low-cardinality (finish reason, status code,
expert worker id, worker role/state — never request ids). Every registry also holds
prometheus_client's ``process_*`` metrics (CPU, memory, open fds).

Threads: prometheus_client's WSGI server thread per ``start_metrics_server`` (daemon).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               start_http_server)

# Buckets (seconds unless named otherwise).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REBALANCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKENS_PER_STEP_BUCKETS = tuple(float(2 ** i) for i in range(15))  # 1 … 16384 tokens


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` as Prometheus text (at ``/metrics``, and any path) from a daemon thread.
    ``port`` 0 picks a free port: read it back from ``.port``."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port must be in [0, 65535], got {port}")
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server.server_port, server, thread)


def balancedness(tokens_per_worker: Sequence[float]) -> float:
    """mean / max of per-worker token counts: 1.0 = perfectly even, 1/W = all on one worker.
    1.0 when nothing was routed (an idle deployment is not imbalanced)."""
    if not tokens_per_worker:
        return 1.0
    peak = max(tokens_per_worker)
    return 1.0 if peak <= 0 else (sum(tokens_per_worker) / len(tokens_per_worker)) / peak


class LoadWindow:
    """Per-worker token counts summed over the last ``window`` records (e.g. engine steps)."""

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError(f"load window must be >= 1 record, got {window}")
        self._records: deque[Mapping[str, int]] = deque(maxlen=window)
        self._totals: dict[str, int] = {}
        self._seen_in: dict[str, int] = {}   # records in the window that name the worker

    def add(self, tokens_by_worker: Mapping[str, int]) -> None:
        """One record: every worker that could receive tokens, zeros included. A worker absent
        from every record in the window (gone from the map) stops counting."""
        if len(self._records) == self._records.maxlen:
            for worker, n in self._records[0].items():
                self._totals[worker] -= n
                self._seen_in[worker] -= 1
                if self._seen_in[worker] == 0:
                    del self._totals[worker], self._seen_in[worker]
        self._records.append(dict(tokens_by_worker))
        for worker, n in tokens_by_worker.items():
            self._totals[worker] = self._totals.get(worker, 0) + n
            self._seen_in[worker] = self._seen_in.get(worker, 0) + 1

    def totals(self) -> dict[str, int]:
        return dict(self._totals)

    def balancedness(self) -> float:
        return balancedness(list(self._totals.values()))


class _ProcessMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)


class GatewayMetrics(_ProcessMetrics):
    """Client-facing request metrics (one gateway)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.requests = Counter("epserve_gateway_requests_total", "Finished requests",
                                ["finish_reason", "code"], registry=r)   # finish_reason "" when failed
        self.time_to_first_token = Histogram("epserve_gateway_time_to_first_token_seconds",
                                             "From request arrival to its first streamed token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("epserve_gateway_inter_token_latency_seconds",
                                             "Between consecutive streamed tokens of a request",
                                             buckets=ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram("epserve_gateway_e2e_request_latency_seconds",
                                     "From request arrival to its last token or error",
                                     buckets=E2E_BUCKETS, registry=r)
        self.requests_in_flight = Gauge("epserve_gateway_requests_in_flight", "Requests being served",
                                        registry=r)
        self.prompt_tokens = Counter("epserve_gateway_prompt_tokens_total", "Prompt tokens of finished requests",
                                     registry=r)
        self.completion_tokens = Counter("epserve_gateway_completion_tokens_total", "Generated tokens streamed",
                                         registry=r)
        self.retries = Counter("epserve_gateway_request_retries_total",
                               "Requests re-submitted to another attention worker after losing one", registry=r)


class AttentionWorkerMetrics(_ProcessMetrics):
    """Scheduler, KV cache, step and (with ``expert_distribution``, the worker's
    ``--enable-expert-distribution-metrics``) expert-load metrics of one attention worker. Without
    it ``expert_tokens`` and ``balancedness`` are None and their series do not exist."""

    def __init__(self, registry: CollectorRegistry | None = None, load_window: int = 64,
                 expert_distribution: bool = False) -> None:
        super().__init__(registry)
        r = self.registry
        self.requests_waiting = Gauge("epserve_attention_requests_waiting", "Requests queued, not yet admitted",
                                      registry=r)
        self.requests_running = Gauge("epserve_attention_requests_running", "Requests in the running batch",
                                      registry=r)
        self.kv_cache_blocks_used = Gauge("epserve_attention_kv_cache_blocks_used", "KV-cache blocks in use",
                                          registry=r)
        self.kv_cache_blocks_total = Gauge("epserve_attention_kv_cache_blocks_total", "KV-cache blocks",
                                           registry=r)
        self.step_duration = Histogram("epserve_attention_step_duration_seconds", "One engine step",
                                       buckets=STEP_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("epserve_attention_tokens_per_step", "Tokens computed in one step",
                                         buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.map_version = Gauge("epserve_attention_map_version", "Expert-map version in use", registry=r)
        self.preemptions = Counter("epserve_attention_preemptions_total", "Requests preempted (recompute)",
                                   registry=r)
        self.dataplane_timeouts = Counter("epserve_attention_dataplane_timeouts_total",
                                          "Data-plane combines that passed their deadline, by expert worker",
                                          ["expert_worker"], registry=r)
        self.expert_distribution = expert_distribution
        self.expert_tokens: Counter | None = None
        self.balancedness: Gauge | None = None
        if expert_distribution:             # one series per expert worker, never per expert
            self.expert_tokens = Counter("epserve_attention_expert_tokens_total",
                                         "Token-expert choices sent to each expert worker (all MoE layers)",
                                         ["expert_worker"], registry=r)
            self.balancedness = Gauge("epserve_attention_expert_balancedness",
                                      "mean/max tokens per expert worker over the last window (1 = even)",
                                      registry=r)
            self.balancedness.set(1.0)
        self._load_window = LoadWindow(load_window)

    def record_expert_load(self, tokens_by_worker: Mapping[str, int]) -> None:
        """Once per step: token-expert choices sent to each expert worker (every worker, zeros too).
        Only with ``expert_distribution``."""
        assert self.expert_tokens is not None, "expert-load metrics are off (--enable-expert-distribution-metrics)"
        for worker, n in tokens_by_worker.items():
            self.expert_tokens.labels(expert_worker=worker).inc(n)
        self._load_window.add(tokens_by_worker)
        self.balancedness.set(self._load_window.balancedness())


class ExpertWorkerMetrics(_ProcessMetrics):
    """Batches served and resident weights (one expert worker)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.batches = Counter("epserve_expert_batches_total", "Data-plane batches served", registry=r)
        self.tokens = Counter("epserve_expert_tokens_total", "Tokens served (all layers)", registry=r)
        self.compute_duration = Histogram("epserve_expert_compute_duration_seconds",
                                          "Expert compute of one batch (one MoE layer)",
                                          buckets=COMPUTE_BUCKETS, registry=r)
        self.held_map_versions = Gauge("epserve_expert_held_map_versions",
                                       "Expert-map versions held side by side", registry=r)
        self.map_version = Gauge("epserve_expert_map_version", "Newest expert-map version held", registry=r)
        self.resident_weight_bytes = Gauge("epserve_expert_resident_weight_bytes",
                                           "Bytes of expert weights resident (all held versions, shared once)",
                                           registry=r)
        self.stale_version_refusals = Counter("epserve_expert_stale_version_refusals_total",
                                              "Batches refused: routed with a map version not held", registry=r)
        self.map_load_duration = Histogram("epserve_expert_map_load_duration_seconds",
                                           "Making one map version's slots resident (PREPARE / first COMMIT), "
                                           "paced sleeps included", buckets=REBALANCE_BUCKETS, registry=r)
        self.map_load_paced_sleep = Counter("epserve_expert_map_load_paced_sleep_seconds_total",
                                            "Time live map loads slept to keep --expert-load-duty-cycle",
                                            registry=r)

    def set_held_versions(self, versions: Iterable[int]) -> None:
        held = list(versions)
        self.held_map_versions.set(len(held))
        self.map_version.set(max(held) if held else 0)


class PlacementMetrics(_ProcessMetrics):
    """Map versions, rebalances, worker registry and health (the placement service)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.map_version = Gauge("epserve_placement_map_version", "Newest committed expert-map version",
                                 registry=r)
        self.rebalances = Counter("epserve_placement_rebalances_total", "Map changes attempted",
                                  ["reason", "outcome"], registry=r)  # reason eplb|admin|failure; committed|rolled_back
        self.rebalance_duration = Histogram("epserve_placement_rebalance_duration_seconds",
                                            "Plan → prepare → commit of one map change",
                                            buckets=REBALANCE_BUCKETS, registry=r)
        self.workers = Gauge("epserve_placement_workers", "Registered workers by role and health state",
                             ["role", "state"], registry=r)
        self.balancedness = Gauge("epserve_placement_balancedness",
                                  "mean/max reported load per expert worker (1 = even)", registry=r)
        self.balancedness.set(1.0)
        self._worker_keys: set[tuple[str, str]] = set()
        self._workers_lock = threading.Lock()

    def set_worker_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace every ``(role, state) -> count``; pairs set before and absent now drop to 0."""
        with self._workers_lock:
            for role, state in self._worker_keys - counts.keys():
                self.workers.labels(role=role, state=state).set(0)
            for (role, state), n in counts.items():
                self.workers.labels(role=role, state=state).set(n)
            self._worker_keys |= counts.keys()
