"""Builds the gateway from a GatewayConfig, serves it, and shuts it down gracefully.

Threads: gRPC's pool serves the RPCs (one thread per open Generate stream); one
"gateway-refresh" thread re-lists and probes the workers and flips health between SERVING
(at least one attention worker answers) and NOT_SERVING.

Shutdown: health NOT_SERVING, new requests refused (UNAVAILABLE), in-flight streams get
--shutdown-grace-s to finish, then the rest are aborted (at their workers too; their streams
end with finish_reason ABORT), then the server stops.
"""

from __future__ import annotations

import logging
import threading

from epserve.grpc_security import Security
from epserve.grpc_server import GrpcServer, serve_grpc
from epserve.telemetry import Tracing, setup_tracing
from epserve.gateway.config import GatewayConfig
from epserve.gateway.discovery import PlacementDiscovery
from epserve.gateway.observer import RequestObserver
from epserve.gateway.request_manager import RequestManager
from epserve.gateway.router import Router
from epserve.gateway.servicer import GenerationServicer
from epserve.gateway.sglang_servicer import sglang_registration
from epserve.tokenizer import Tokenizer
from epserve.gateway.worker_pool import WorkerPool
from epserve.model_config import load_model_spec
from epserve.process import start_daemon_thread
from epserve.protos import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
TRACING_SERVICE_NAME = "epserve-gateway"
EXTRA_RPC_THREADS = 16   # Abort, GetModelInfo, health and reflection beside the Generate streams


class Gateway:
    """``tracing``: the process's handle (default: off). ``observer``: fed each request's life
    (``TelemetryObserver`` for metrics and span events; default: nothing)."""

    def __init__(self, config: GatewayConfig, observer: RequestObserver | None = None,
                 tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else setup_tracing(TRACING_SERVICE_NAME, None)
        self.spec = load_model_spec(config.model_path)   # the workers' reader: the same models refused
        self.tokenizer = Tokenizer.from_dir(config.model_path)
        self.router = Router()
        discovery = (PlacementDiscovery(config.placement, config.rpc_timeout_s, config.security)
                     if config.placement else None)
        self.pool = WorkerPool(config, self.router, discovery, on_health=self._set_health,
                               intercept=self.tracing.intercept_channel)
        self.manager = RequestManager(config, self.tokenizer, self.spec, self.pool, self.router, observer)
        self._server: GrpcServer | None = None
        self._stopping = threading.Event()
        self._stop_refresh = threading.Event()
        self._refresh_thread: threading.Thread | None = None

    def start(self) -> int:
        """Serves (health NOT_SERVING until a worker answers) after one round of discovery and
        probes (at most --rpc-timeout-s each); returns the bound port."""
        servicer = GenerationServicer(self.manager, self.spec, self.pool, self.tracing)
        config = self.config
        # the public API: the optional client token (--api-token-file), the deployment's TLS
        public = Security(token=config.api_token, tls_cert=config.security.tls_cert,
                          tls_key=config.security.tls_key, tls_ca=config.security.tls_ca)
        sglang = sglang_registration(self.manager, self.spec, self.pool, config,   # for SMG (issue 16)
                                     lambda: not self._stopping.is_set() and bool(self.pool.reachable()))
        self._server = serve_grpc([(generation_pb2_grpc.add_GenerationServicer_to_server, servicer, SERVICE_NAME),
                                   sglang],
                                  config.host, config.port, serving=False,
                                  max_workers=config.max_concurrent_requests + EXTRA_RPC_THREADS,
                                  interceptors=self.tracing.server_interceptors(), security=public,
                                  max_message_bytes=config.max_message_bytes,
                                  max_concurrent_rpcs=config.max_concurrent_requests + EXTRA_RPC_THREADS)
        self.pool.refresh()
        self._refresh_thread = start_daemon_thread(lambda: self.pool.run_refresh_loop(self._stop_refresh),
                                                   "gateway-refresh")
        logger.info("gateway serving %s on %s:%d (model %s, context %d tokens)", SERVICE_NAME, self.config.host,
                    self._server.port, self.spec.architecture, self.spec.max_position_embeddings)
        return self._server.port

    def _set_health(self, healthy: bool) -> None:
        if self._server is not None and not self._stopping.is_set():
            self._server.set_serving(healthy)

    def shutdown(self) -> None:
        self._stopping.set()
        assert self._server is not None, "shutdown() before start()"
        self._server.set_serving(False)
        self.manager.stop_accepting()
        num_running = self.manager.num_running
        if num_running:
            logger.info("shutting down: waiting up to %.1f s for %d streams", self.config.shutdown_grace_s,
                        num_running)
        if not self.manager.wait_idle(self.config.shutdown_grace_s):
            logger.warning("shutting down: aborting %d streams still running", self.manager.abort_all())
            if not self.manager.wait_idle(self.config.rpc_timeout_s + 1.0):
                logger.warning("shutting down: %d streams did not end", self.manager.num_running)
        self._stop_refresh.set()
        if self._refresh_thread is not None:
            self._refresh_thread.join(timeout=self.config.rpc_timeout_s + 1.0)
        self._server.stop(grace_s=1.0)
        self.pool.close()
        self.manager.close()
        logger.info("gateway stopped")
