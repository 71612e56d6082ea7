"""The attention worker process: wiring of model, engine, data plane, placement and gRPC.

Start-up: load the attention side's weights (no routed experts) → serve gRPC (health
NOT_SERVING) → register with placement (rank, world size, rendezvous address, backend) →
watch placement. The first committed map (which comes once every worker has registered)
joins the data-plane group, builds the engine and its loop, and flips health to SERVING.
Later maps are handed to the engine, which switches at its next step boundary.

Colocated (``--moe-a2a-backend local``, placement's backend too): every routed expert is loaded
with the attention side (``colocated.ColocatedExperts``: the trivial map, no redundancy, never
changed); right after registering, the engine starts with that map and in-process experts, and
health flips to SERVING. Nothing is watched and no load is reported: placement holds no map in
such a deployment (it is the registry the gateway discovers workers from, and the health view).

Telemetry (made in ``main()``, passed in; default off): the gRPC server records a SERVER span
per RPC (GetLoad, polled by the gateway, is not traced); Generate hands its span's context to
the engine; the engine and the MoE executor record step spans on sampled steps and feed
``AttentionWorkerMetrics``.

Expert distribution: the recorder (``--expert-distribution-recorder-mode``) feeds placement's
load windows (``load-reporter`` thread); ``DumpExpertDistribution`` writes what it kept
(``expert_dump.py``); with ``EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL`` a ``HeatmapCollector`` on
the engine thread hands intervals to a ``HeatmapWriter`` thread (``expert_heatmap.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from epserve.attention_worker.colocated import ColocatedExperts, load_attention_model
from epserve.attention_worker.config import AttentionWorkerConfig
from epserve.attention_worker.engine import Engine, resolved_attention_backend
from epserve.attention_worker.elastic import ElasticRecovery, MapBoard
from epserve.attention_worker.engine_loop import EngineLoop
from epserve.attention_worker.expert_heatmap import HeatmapCollector, HeatmapWriter
from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.moe_executor import MoEExecutor, RemoteExperts
from epserve.attention_worker.service import AttentionWorkerService
from epserve.attention_worker.step_experts import StepExperts
from epserve.dummy_weights import open_weights
from epserve.expert_map import ExpertMap
from epserve.grpc_server import GrpcServer, serve_grpc
from epserve.model_config import load_model_spec, model_fingerprint
from epserve.placement_client import PlacementClient
from epserve.placement_types import DataPlaneInfo, UpdatePhase, WorkerRole, WorkerState
from epserve.process import start_daemon_thread
from epserve.telemetry import (DEFAULT_UNTRACED_SERVICES, AttentionWorkerMetrics, StepSampler, Tracing,
                               setup_tracing)
from epserve.weights import parse_dtype
from epserve.protos import worker_pb2_grpc

logger = logging.getLogger(__name__)


TRACING_SERVICE_NAME = "epserve-attention-worker"
EXTRA_RPC_THREADS = 16     # Abort, GetLoad, health, DumpExpertDistribution beside the Generate streams
UNTRACED_RPCS = (*DEFAULT_UNTRACED_SERVICES, "epserve.v1.AttentionWorker/GetLoad")


class AttentionWorker:
    def __init__(self, config: AttentionWorkerConfig, tracing: Tracing | None = None,
                 metrics: AttentionWorkerMetrics | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else setup_tracing(TRACING_SERVICE_NAME, None)
        self.metrics = metrics
        self.spec = load_model_spec(config.model_path)
        weights = open_weights(config.model_path, config.load_format, self.spec)
        dtype = parse_dtype(config.dtype)
        self.model = load_attention_model(self.spec, weights, dtype, config.device)
        self.local_experts: ColocatedExperts | None = None
        if config.colocated:
            self.local_experts = ColocatedExperts(self.spec, weights, dtype, config.device, config.moe_runner_backend)
        self.loop: EngineLoop | None = None
        self.ready = threading.Event()
        self._stopped = threading.Event()
        self.recorder: ExpertLoadRecorder | None = None
        self._lock = threading.Lock()
        self._dispatcher = None
        self.board = MapBoard()               # the newest committed map (elastic EP waits on it)
        self.heatmap_writer: HeatmapWriter | None = None
        if config.eplb_heatmap_collection_interval:
            self.heatmap_writer = HeatmapWriter(config.expert_distribution_dir, config.worker_id)
        service = AttentionWorkerService(config.worker_id, self.spec.vocab_size, lambda: self.loop,
                                         self.tracing.current_trace_context, config.stream_interval)
        max_streams = config.limits.max_num_seqs + config.max_queued_requests    # a Generate stream holds a thread
        self.server: GrpcServer = serve_grpc(
            [(worker_pb2_grpc.add_AttentionWorkerServicer_to_server, service, "epserve.v1.AttentionWorker")],
            config.host, config.port, serving=False,
            interceptors=self.tracing.server_interceptors(untraced=UNTRACED_RPCS), security=config.security,
            max_message_bytes=config.max_message_bytes, max_workers=max_streams + EXTRA_RPC_THREADS,
            max_concurrent_rpcs=max_streams + EXTRA_RPC_THREADS)
        self.address = f"{config.advertise_host}:{self.server.port}"
        self.placement = PlacementClient(config.placement, config.worker_id, WorkerRole.ATTENTION, self.address,
                                         device=config.device,
                                         model_fingerprint=model_fingerprint(config.model_path, config.load_format),
                                         timeout_s=config.rpc_timeout_s, security=config.security)

    def start(self, register_deadline_s: float = 120.0) -> None:
        """Raises RuntimeError when placement runs another kind of deployment (colocated or not)."""
        self.registration = self.placement.register(register_deadline_s)
        logger.info("registered as rank %d of %d", self.registration.rank, self.registration.world_size)
        placement_colocated = self.registration.backend == "local"
        if placement_colocated != self.config.colocated:
            raise RuntimeError(
                f"placement {self.config.placement} runs --moe-a2a-backend {self.registration.backend}, this worker "
                f"--moe-a2a-backend {self.config.moe_a2a_backend}: start the worker with --moe-a2a-backend "
                + ("local (a colocated deployment has no expert workers)" if placement_colocated
                   else f"{self.registration.backend} (expert workers hold the experts)"))
        if self.local_experts is not None:
            with self._lock:
                self._start_engine(self.local_experts.expert_map, None)
            return
        self.placement.watch(self._on_update)

    def _on_update(self, phase: UpdatePhase, expert_map: ExpertMap, data_plane: DataPlaneInfo) -> None:
        if phase is not UpdatePhase.COMMIT:
            return
        self.board.publish(expert_map)       # elastic EP: an interrupted layer may be waiting for it
        with self._lock:
            if self.loop is None:
                self._start_engine(expert_map, data_plane)
                self.placement.ack(expert_map.version, UpdatePhase.COMMIT)
            else:   # ack once the engine has switched: from then on no step routes with the old map
                self.loop.engine.set_expert_map(expert_map, self._ack_commit_later)
                self.loop.wake()

    def _ack_commit_later(self, applied: ExpertMap) -> None:
        """Runs on the engine thread once no step uses the old map: the COMMIT ack goes out
        without waiting for placement's answer (``ack_nowait``)."""
        self.placement.ack_nowait(applied.version, UpdatePhase.COMMIT)

    def _start_engine(self, expert_map: ExpertMap, data_plane: DataPlaneInfo | None) -> None:
        """``data_plane``: placement's, for remote experts; None for this worker's own (colocated)."""
        config = self.config
        self.recorder = ExpertLoadRecorder(RecorderMode(config.expert_distribution_recorder_mode),
                                           expert_map.num_layers, expert_map.num_physical_slots,
                                           track_passes=config.track_expert_passes, map_version=expert_map.version)
        heatmap = None
        if self.heatmap_writer is not None:
            self.heatmap_writer.start()
            heatmap = HeatmapCollector(config.worker_id, config.eplb_heatmap_collection_interval,
                                       self.heatmap_writer.put)
        if self.local_experts is not None:
            executor: MoEExecutor = self.local_experts.executor(record_load=self.recorder.record)
        else:
            executor = self._remote_experts(data_plane)
        engine = Engine(self.model, executor, expert_map, config.limits,
                        config.max_context or self.spec.max_position_embeddings, recorder=self.recorder,
                        tracing=self.tracing, step_sampler=StepSampler(config.trace_step_every),
                        metrics=self.metrics, heatmap=heatmap)
        self.loop = EngineLoop(engine, max_requests=config.limits.max_num_seqs + config.max_queued_requests)
        self.loop.start()
        if self.local_experts is None:
            start_daemon_thread(self._report_load, "load-reporter")
        self.server.set_serving(True)
        self.ready.set()
        logger.info("serving on %s with expert map version %d%s", self.address, expert_map.version,
                    " (colocated: every expert in this process)" if self.local_experts is not None else "")

    def _remote_experts(self, data_plane: DataPlaneInfo) -> MoEExecutor:
        """Join the data-plane group placement describes; experts answer from expert workers."""
        from epserve import dataplane

        config = self.config
        rank = self.registration.rank
        options = {}
        if data_plane.backend == "cuda_ipc":    # fixed channels, sized once at join
            limits = config.limits
            options = dict(device=config.device, max_tokens=max(limits.max_num_batched_tokens, limits.max_num_seqs),
                           hidden_size=self.spec.hidden_size, top_k=self.spec.num_experts_per_tok,
                           dtype=parse_dtype(config.dtype), num_micro_batches=limits.num_micro_batches or 2)
        elastic = self.registration.elastic_ep_backend != "none"
        if elastic and data_plane.backend == "torch":      # links formed on use, and again after failures
            from epserve.dataplane.torch_links import ELASTIC_FORM_TIMEOUT_S

            options = dict(eager=False, connect_timeout_s=min(config.dataplane_timeout_s, ELASTIC_FORM_TIMEOUT_S))
        self._dispatcher = dataplane.make_dispatcher(
            data_plane.backend, rank=rank, world_size=data_plane.world_size,
            dist_init_addr=data_plane.dist_init_addr, expert_ranks=_expert_ranks(data_plane),
            timeout_s=config.dataplane_timeout_s, **options)
        router = ExpertRouter(DispatchAlgorithm(config.ep_dispatch_algorithm), rank)
        recovery = None
        if elastic:
            # torch re-forms a link; cuda_ipc takes a restarted expert process once it mapped the channels again
            reconnect = getattr(self._dispatcher, "reconnect", None)
            recovery = ElasticRecovery(self.board, self._report_suspicion, reconnect, self._ack_commit_later,
                                       config.elastic_ep_recovery_timeout_s)
        if data_plane.backend == "cuda_ipc" and resolved_attention_backend(config.limits, config.device) == "triton":
            # the batched runner announces each step once and captures the per-layer hand-offs; with elastic EP a
            # step that lost an expert worker is redone under the map placement re-places its experts with
            logger.info("expert exchange: the cuda_ipc step path (one announcement per step)")
            return StepExperts(self._dispatcher, router, self.spec.num_moe_layers, config.dataplane_timeout_s,
                               record_load=self.recorder.record, num_micro_batches=config.limits.num_micro_batches or 1,
                               gpu_two_micro_batches=config.gpu_two_micro_batches, recovery=recovery)
        return RemoteExperts(self._dispatcher, router, config.dataplane_timeout_s, record_load=self.recorder.record,
                             tracing=self.tracing, on_timeout=self._timeout_counter(data_plane), recovery=recovery)

    def _report_suspicion(self, peer_rank: int, reason: str, map_version: int) -> WorkerState | None:
        """Elastic EP: placement's verdict on a peer that failed an exchange (None: unreachable)."""
        try:
            state, _ = self.placement.report_suspicion(peer_rank, reason, map_version)
        except Exception as exc:  # placement down or restarting: recover without its verdict
            logger.warning("could not report data-plane rank %d to placement: %s", peer_rank, exc)
            return None
        logger.info("placement says data-plane rank %d is %s", peer_rank, state.name)
        return state

    def _timeout_counter(self, data_plane: DataPlaneInfo) -> Callable[[int | None], None] | None:
        if self.metrics is None:
            return None
        counter = self.metrics.dataplane_timeouts
        worker_of_rank = {w.rank: w.worker_id for w in data_plane.workers}
        return lambda rank: counter.labels(expert_worker=worker_of_rank.get(rank, f"rank-{rank}")).inc()

    def _report_load(self) -> None:
        """Every load_report_interval_s, send the closed window of expert load to placement."""
        while not self._stopped.wait(self.config.load_report_interval_s):
            window, passes, version = self.recorder.take_window()
            if passes:
                try:
                    self.placement.report_load(version, window, passes)
                except Exception as exc:  # placement down or restarting: this window is dropped
                    logger.warning("expert load report failed: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        self.server.set_serving(False)
        self.server.stop(grace_s=2.0)
        if self.loop is not None:
            self.loop.stop()
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self.heatmap_writer is not None:
            self.heatmap_writer.stop()
        self.placement.close()


def _expert_ranks(data_plane: DataPlaneInfo) -> list[int]:
    return sorted(w.rank for w in data_plane.workers if w.role == WorkerRole.EXPERT)
