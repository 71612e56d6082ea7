"""The gRPC side of worker_api: one channel and AttentionWorker stub per attention worker.

Every call has a deadline: Generate the request's; Abort, health Check and GetLoad ``rpc_timeout_s``. Errors
become worker_api's exceptions: UNAVAILABLE, a stream cancelled by the worker's side, or a
reset HTTP/2 stream -> WorkerLost (the request may run elsewhere); DEADLINE_EXCEEDED ->
WorkerTimeout; a stream this client cancelled -> StreamCancelled; anything else -> WorkerFailed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.grpc_server import GRPC_OPTIONS
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.gateway.worker_api import (StreamCancelled, WorkerFailed, WorkerLoad, WorkerLost, WorkerRequest, WorkerSlow,
                                WorkerStep, WorkerTimeout)
from epserve.protos import generation_pb2, worker_pb2, worker_pb2_grpc
from epserve.sampling import FinishReason, logprob_from_proto, sampling_to_proto

logger = logging.getLogger(__name__)

# Reconnect quickly to a worker that comes back (the default backoff grows to 120 s).
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


def request_to_proto(request: WorkerRequest) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id=request.request_id, prompt_ids=list(request.prompt_ids),
        sampling=sampling_to_proto(request.sampling), num_generated_before=request.num_generated_before)


def step_from_proto(message: worker_pb2.WorkerGenerateResponse) -> WorkerStep:
    reason = FinishReason(message.finish_reason) if message.finish_reason else None
    stop_token = message.matched_stop_token if message.HasField("matched_stop_token") else None
    return WorkerStep(tuple(message.token_ids), message.finished, reason, stop_token,
                      tuple(logprob_from_proto(lp) for lp in message.logprobs))


def _is_lost(error: grpc.RpcError) -> bool:
    code = error.code()
    return (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            or (code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or "")))


class GrpcWorkerStream:
    def __init__(self, address: str, call: grpc.Call) -> None:
        self._address = address
        self._call = call
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[WorkerStep]:
        try:
            for message in self._call:
                yield step_from_proto(message)
        except grpc.RpcError as exc:
            if self._cancelled.is_set():
                raise StreamCancelled() from exc
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WorkerTimeout(f"{self._address}: deadline exceeded") from exc
            if _is_lost(exc):
                raise WorkerLost(f"{self._address}: {exc.code().name}: {exc.details()}") from exc
            raise WorkerFailed(exc.code().name, exc.details() or "") from exc

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()


class GrpcWorkerClient:
    """``intercept``: wraps the channel (``Tracing.intercept_channel``: calls carry the caller's
    trace context as W3C ``traceparent`` metadata)."""

    def __init__(self, address: str, rpc_timeout_s: float,
                 intercept: Callable[[grpc.Channel], grpc.Channel] | None = None,
                 security: Security = PLAINTEXT) -> None:
        self.address = address
        self._rpc_timeout_s = rpc_timeout_s
        channel = open_channel(address, security, CHANNEL_OPTIONS)   # TLS and the deployment's token
        self._channel = intercept(channel) if intercept is not None else channel
        self._stub = worker_pb2_grpc.AttentionWorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, request: WorkerRequest, timeout_s: float) -> GrpcWorkerStream:
        return GrpcWorkerStream(self.address, self._stub.Generate(request_to_proto(request), timeout=timeout_s))

    def abort(self, request_id: str) -> bool:
        try:
            return self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id),
                                    timeout=self._rpc_timeout_s).found
        except grpc.RpcError as exc:
            logger.warning("abort of %s at %s failed: %s", request_id, self.address, exc.code().name)
            return False

    def abort_nowait(self, request_id: str) -> None:
        try:
            future = self._stub.Abort.future(generation_pb2.AbortRequest(request_id=request_id),
                                             timeout=self._rpc_timeout_s)
        except ValueError:  # channel closed: the gateway is shutting down
            return

        def log_failure(done: grpc.Future) -> None:
            error = None if done.cancelled() else done.exception()
            if isinstance(error, grpc.RpcError):
                logger.info("abort of %s at %s failed: %s", request_id, self.address, error.code().name)

        future.add_done_callback(log_failure)

    def probe(self) -> WorkerLoad:
        """Raises WorkerLost unless the worker's grpc.health.v1 says SERVING (a worker starts
        NOT_SERVING until it has its expert map) and GetLoad answers. A worker without a health
        service or without GetLoad counts as reachable (unknown load)."""
        try:
            status = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self._rpc_timeout_s).status
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WorkerSlow(f"{self.address}: health: no answer within {self._rpc_timeout_s}s") from exc
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise WorkerLost(f"{self.address}: health: {exc.code().name}: {exc.details()}") from exc
        else:
            if status != health_pb2.HealthCheckResponse.SERVING:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                raise WorkerLost(f"{self.address}: health: {name}")
        try:
            load = self._stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self._rpc_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return WorkerLoad(0, 0, None)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WorkerSlow(f"{self.address}: GetLoad: no answer within {self._rpc_timeout_s}s") from exc
            raise WorkerLost(f"{self.address}: {exc.code().name}: {exc.details()}") from exc
        return WorkerLoad(load.num_running, load.num_waiting, load.outstanding_tokens, load.kv_blocks_free,
                          load.kv_blocks_total)

    def close(self) -> None:
        self._channel.close()
