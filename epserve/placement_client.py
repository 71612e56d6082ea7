"""What a worker uses to talk to the placement service (the types both sides share are in
epserve/placement_types.py).

``PlacementClient`` owns one gRPC channel and up to two daemon threads:

- heartbeat thread (started by the first successful ``register()``): every
  ``heartbeat_interval_ms`` (told by placement) it sends a Heartbeat with a deadline. When
  placement answers NOT_FOUND (it restarted and forgot this worker) or UNAVAILABLE (down or
  shutting down) it cancels the watch stream and re-registers, with backoff, asking for its
  old rank back.
- watch thread (``watch(callback)``): runs the WatchPlacement stream and calls
  ``callback(phase, ExpertMap, DataPlaneInfo)`` for each distinct update. When the stream
  ends or breaks it reconnects with backoff; the current COMMIT placement sends again on
  reconnecting is not handed to the callback twice, but re-acked when this worker acked it
  before (a restarted placement learns each worker's map version from COMMIT acks only).
  The stream itself has no deadline (it lives as long as placement); a dead placement is
  noticed by the heartbeat thread, which cancels it.

An exception escaping either thread (a bug, or a raising callback) logs and exits the
process: a worker must not keep serving half-connected. Unary RPCs all carry ``timeout_s``.

Workers register with ``model_fingerprint`` (epserve/model_config.py), the one definition of "the
same model" for both sides.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from epserve.expert_map import ExpertMap
from epserve.expert_map_codec import expert_map_from_proto
from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.grpc_server import GRPC_OPTIONS
from epserve.placement_types import DataPlaneInfo, UpdatePhase, WorkerRole, WorkerState, data_plane_from_proto
from epserve.process import start_daemon_thread
from epserve.protos import placement_pb2, placement_pb2_grpc

logger = logging.getLogger(__name__)

# Reconnect quickly after a placement restart instead of gRPC's default (up to 2 minutes).
CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Registration:
    """What placement told this worker at its last registration."""
    rank: int
    world_size: int
    dist_init_addr: str
    heartbeat_interval_ms: int
    backend: str
    elastic_ep_backend: str = "none"    # placement's --elastic-ep-backend


WatchCallback = Callable[[UpdatePhase, ExpertMap, DataPlaneInfo], None]


class Backoff:
    """Exponential backoff with jitter: 0.1 s doubling up to ``max_s``."""

    def __init__(self, initial_s: float = 0.1, max_s: float = 2.0) -> None:
        self.initial_s, self.max_s, self._next_s = initial_s, max_s, initial_s

    def next(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next_s = self.initial_s


class PlacementClient:
    def __init__(self, address: str, worker_id: str, role: WorkerRole, worker_address: str,
                 capacity: float = 1.0, device: str = "cpu", model_fingerprint: str = "",
                 timeout_s: float = 5.0, security: Security = PLAINTEXT) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address, self.worker_id, self.role = address, worker_id, WorkerRole(role)
        self.worker_address, self.capacity, self.device = worker_address, capacity, device
        self.model_fingerprint, self.timeout_s = model_fingerprint, timeout_s
        self._channel = open_channel(address, security, CHANNEL_OPTIONS)     # TLS and the deployment's token
        self._stub = placement_pb2_grpc.PlacementStub(self._channel)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._registration: Registration | None = None
        self._num_registrations = 0
        self._acked_commit = 0          # the newest map version this worker acked COMMIT of
        self._heartbeat_thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._watch_call: grpc.Future | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def registration(self) -> Registration | None:
        return self._registration

    @property
    def num_registrations(self) -> int:
        """How many times Register succeeded (> 1 after automatic re-registrations)."""
        return self._num_registrations

    # -- registration and heartbeats -------------------------------------------------------
    def register(self, deadline_s: float = 60.0) -> Registration:
        """Register, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff for ``deadline_s``.

        Raises grpc.RpcError for a refusal (wrong model, too many workers, bad fields) and
        TimeoutError when placement did not answer in time. Starts the heartbeat thread.
        """
        deadline = time.monotonic() + deadline_s
        backoff = Backoff()
        while True:
            if self._closed.is_set():
                raise RuntimeError("PlacementClient is closed")
            try:
                registration = self._register_once(min(self.timeout_s, max(deadline - time.monotonic(), 0.01)))
                break
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"placement at {self.address} did not accept Register within "
                                       f"{deadline_s} s: {exc.code().name} {exc.details()}") from exc
                self._closed.wait(min(backoff.next(), remaining))
        with self._lock:
            if self._heartbeat_thread is None:
                self._heartbeat_thread = start_daemon_thread(self._heartbeat_loop, f"placement-heartbeat-{self.worker_id}")
        return registration

    def _register_once(self, timeout_s: float) -> Registration:
        previous = self._registration.rank if self._registration is not None else -1
        request = placement_pb2.RegisterRequest(
            worker_id=self.worker_id, role=int(self.role), address=self.worker_address,
            capacity=self.capacity, device=self.device, model_fingerprint=self.model_fingerprint,
            previous_rank=previous)
        response = self._stub.Register(request, timeout=timeout_s)
        registration = Registration(response.rank, response.world_size, response.dist_init_addr,
                                    response.heartbeat_interval_ms, response.backend,
                                    response.elastic_ep_backend or "none")
        if previous >= 0 and registration.rank != previous:
            logger.error("placement gave worker %s rank %d, it had rank %d: its data-plane group is stale",
                         self.worker_id, registration.rank, previous)
        with self._lock:
            self._registration = registration
            self._num_registrations += 1
        logger.info("worker %s registered with placement %s: rank %d of %d", self.worker_id,
                    self.address, registration.rank, registration.world_size)
        return registration

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(max(self._registration.heartbeat_interval_ms, 10) / 1000):
            request = placement_pb2.HeartbeatRequest(worker_id=self.worker_id)
            try:
                self._stub.Heartbeat(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    logger.warning("placement answered heartbeat with %s (%s); re-registering",
                                   exc.code().name, exc.details())
                    self._cancel_watch()
                    self._reregister()
                else:
                    logger.warning("heartbeat to placement failed: %s %s", exc.code().name, exc.details())

    def _reregister(self) -> None:
        """Register until it works or the client closes; refusals are logged and retried slowly."""
        backoff = Backoff()
        while not self._closed.is_set():
            try:
                self._register_once(self.timeout_s)
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    logger.error("placement refused re-registration of %s: %s %s", self.worker_id,
                                 exc.code().name, exc.details())
                self._closed.wait(backoff.next())

    # -- the watch stream ------------------------------------------------------------------
    def watch(self, callback: WatchCallback) -> None:
        """Start the watch thread; ``callback(phase, expert_map, data_plane)`` runs on it."""
        with self._lock:
            if self._watch_thread is not None:
                raise RuntimeError("watch() is already running for this client")
            self._watch_thread = start_daemon_thread(lambda: self._watch_loop(callback),
                                               f"placement-watch-{self.worker_id}")

    def _watch_loop(self, callback: WatchCallback) -> None:
        backoff = Backoff()
        last_key = None
        request = placement_pb2.WatchPlacementRequest(worker_id=self.worker_id)
        while not self._closed.is_set():
            call = self._stub.WatchPlacement(request)
            with self._lock:
                self._watch_call = call
            if self._closed.is_set():
                call.cancel()
                return
            try:
                for update in call:
                    backoff.reset()
                    data_plane = data_plane_from_proto(update.data_plane)
                    key = (update.phase, update.map.version, update.map.checksum, data_plane.dist_init_addr,
                           tuple((w.worker_id, w.rank, w.address) for w in data_plane.workers))
                    if key == last_key:   # the same update again after a reconnect: not handled twice, but a
                        if update.phase == UpdatePhase.COMMIT and update.map.version <= self._acked_commit:
                            self.ack_nowait(update.map.version)   # restarted placement hears the version again
                        continue
                    last_key = key
                    callback(UpdatePhase(update.phase), expert_map_from_proto(update.map), data_plane)
                logger.info("placement ended the watch stream; reconnecting")
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                logger.info("watch stream broke (%s); reconnecting", exc.code().name)
            self._closed.wait(backoff.next())

    def _cancel_watch(self) -> None:
        with self._lock:
            call = self._watch_call
        if call is not None:
            call.cancel()

    # -- one-shot RPCs ---------------------------------------------------------------------
    def ack(self, version: int, phase: UpdatePhase = UpdatePhase.COMMIT, ok: bool = True, error: str = "") -> None:
        self._stub.AckPlacement(self._ack_request(version, phase, ok, error), timeout=self.timeout_s)
        if phase is UpdatePhase.COMMIT and ok:
            self._acked_commit = max(self._acked_commit, version)

    def ack_nowait(self, version: int, phase: UpdatePhase = UpdatePhase.COMMIT) -> None:
        """Send an ok ack without waiting for the answer (the engine thread's COMMIT ack: a slow or
        restarting placement never delays a step). A failed one is logged: after a placement
        restart the watch delivers the current map again and it is acked again."""
        try:
            future = self._stub.AckPlacement.future(self._ack_request(version, phase, True, ""), timeout=self.timeout_s)
        except ValueError:          # the channel is closed: this worker is shutting down
            return

        def log_failure(done: grpc.Future) -> None:
            error = None if done.cancelled() else done.exception()
            if isinstance(error, grpc.RpcError):
                logger.warning("%s ack of map version %d failed: %s", phase.name, version, error.code().name)

        future.add_done_callback(log_failure)
        if phase is UpdatePhase.COMMIT:
            self._acked_commit = max(self._acked_commit, version)

    def _ack_request(self, version: int, phase: UpdatePhase, ok: bool, error: str) -> placement_pb2.AckPlacementRequest:
        return placement_pb2.AckPlacementRequest(worker_id=self.worker_id, version=version, phase=int(phase), ok=ok,
                                                 error=error)

    def report_load(self, map_version: int, slot_token_counts: torch.Tensor, num_passes: int) -> None:
        """slot_token_counts: [L, P] tokens routed to each physical slot during the window."""
        if slot_token_counts.dim() != 2:
            raise ValueError(f"slot_token_counts must be [L, P], got shape {tuple(slot_token_counts.shape)}")
        num_layers, num_slots = slot_token_counts.shape
        self._stub.ReportLoad(placement_pb2.ReportLoadRequest(
            worker_id=self.worker_id, map_version=map_version, num_layers=num_layers,
            num_physical_slots=num_slots, slot_token_counts=slot_token_counts.flatten().tolist(),
            num_passes=num_passes), timeout=self.timeout_s)

    def report_suspicion(self, suspect_rank: int, reason: str, map_version: int = 0) -> tuple[WorkerState, int]:
        """Elastic EP: the peer at ``suspect_rank`` failed a data-plane exchange. → (its state after
        placement probed it, the newest map version). Raises grpc.RpcError."""
        response = self._stub.ReportSuspicion(placement_pb2.ReportSuspicionRequest(
            worker_id=self.worker_id, suspect_rank=suspect_rank, reason=reason[:500], map_version=map_version),
            timeout=self.timeout_s)
        return WorkerState(response.state), response.current_version

    def close(self) -> None:
        """Stop both threads (bounded wait) and close the channel. Idempotent."""
        self._closed.set()
        self._cancel_watch()
        for thread in (self._heartbeat_thread, self._watch_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self.timeout_s)
        self._channel.close()
