"""One way to start a gRPC server in every epserve process: health + reflection included.

``serve_grpc`` binds (port 0 picks a free port), registers the given servicers, the standard
``grpc.health.v1`` service and server reflection, starts, and returns a ``GrpcServer``
whose ``set_serving`` flips health between SERVING and NOT_SERVING.

Every server runs ``grpc_guard.GuardInterceptor`` (innermost, after the caller's interceptors):
the token check (``security.token``), INVALID_ARGUMENT for undecodable requests, INTERNAL (never
UNKNOWN) for a handler's exception, clipped status details. ``security`` with a certificate
serves TLS (mTLS with a CA; ``grpc_security.py``). ``max_message_bytes`` bounds a received
message (RESOURCE_EXHAUSTED past it, before the handler runs); ``max_concurrent_rpcs``, when
set, answers RPCs past it RESOURCE_EXHAUSTED instead of queueing them for a thread.
``abort_with`` answers a ``StatusError`` (epserve/status_error.py) with the status it carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epserve.grpc_guard import GuardInterceptor
from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.status_error import StatusError

# Generous message limits: expert maps and load reports of big models are a few MB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """GRPC_OPTIONS with received messages bounded by ``max_message_bytes``."""
    return [(key, max_message_bytes if key == "grpc.max_receive_message_length" else value)
            for key, value in GRPC_OPTIONS]


def abort_with(context: grpc.ServicerContext, error: StatusError) -> None:
    """End the call with the status ``error`` carries (raises, as ``context.abort`` does)."""
    context.abort(grpc.StatusCode[error.code], error.message)


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", status)
        for name in self.service_names:
            self.health.set(name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait(grace_s + 1.0)


def serve_grpc(registrations: Sequence[tuple[Callable[[object, grpc.Server], None], object, str]],
               host: str, port: int, *, max_workers: int = 64, serving: bool = True,
               interceptors: Sequence[grpc.ServerInterceptor] = (), security: Security = PLAINTEXT,
               max_message_bytes: int = MAX_MESSAGE_BYTES, max_concurrent_rpcs: int | None = None) -> GrpcServer:
    """registrations: (add_XServicer_to_server, servicer, full service name) triples."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=server_options(max_message_bytes),
                         interceptors=[*interceptors, GuardInterceptor(security.token)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    for add, servicer, _ in registrations:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(name for _, _, name in registrations)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = security.server_credentials()
    bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port} (port in use?)")
    server.start()
    result = GrpcServer(server, bound, health_servicer, names)
    result.set_serving(serving)
    return result


def wait_for_channel(address: str, timeout_s: float, security: Security = PLAINTEXT) -> grpc.Channel:
    """A channel to ``address`` that is ready, or grpc.FutureTimeoutError after ``timeout_s``."""
    channel = open_channel(address, security, GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
    return channel
