"""The attention workers the gateway knows and which of them answer.

Known workers: the static --attention-workers plus, with --placement, the ALIVE attention workers
placement lists (re-listed every refresh; the last list is kept while placement does not
answer, and a worker placement stops listing stays known while it answers its probes: a
restarted placement lists nobody until the workers re-register). Reachable: passed the last probe and was not lost since. A worker whose stream
broke is marked lost at once (``mark_lost``) and comes back when a probe answers again. A probe
is the worker's grpc.health.v1 Check (SERVING once it has its expert map) plus GetLoad (its
outstanding tokens, for the router).

Threads: ``run_refresh_loop`` runs on its own thread (started by server.py) and probes all
workers in parallel each round; servicer threads call ``reachable``/``client``/``mark_lost``.
``on_health(bool)`` is called after every round: True while at least one worker is reachable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from epserve.gateway.config import GatewayConfig
from epserve.gateway.discovery import DiscoveryError, PlacementDiscovery
from epserve.gateway.router import Router
from epserve.gateway.worker_api import WorkerLoad, WorkerLost, WorkerSlow
from epserve.gateway.worker_client import GrpcWorkerClient

logger = logging.getLogger(__name__)

SLOW = "slow"
MAX_SLOW_ROUNDS = 2


class WorkerPool:
    def __init__(self, config: GatewayConfig, router: Router, discovery: PlacementDiscovery | None,
                 on_health: Callable[[bool], None],
                 intercept: Callable[[grpc.Channel], grpc.Channel] | None = None) -> None:
        self._config = config
        self._intercept = intercept
        self._router = router
        self._discovery = discovery
        self._on_health = on_health
        self._lock = threading.Lock()
        self._clients: dict[str, GrpcWorkerClient] = {}   # every worker ever known (kept for in-flight streams)
        self._known: tuple[str, ...] = tuple(config.attention_workers)
        self._reachable: set[str] = set()
        self._loads: dict[str, WorkerLoad | None] = {}     # the last probe of each known worker
        self._slow_rounds: dict[str, int] = {}             # consecutive probes that got no answer in time
        self.num_expert_workers: int | None = None        # known only from placement
        self._probe_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-probe")

    def loads(self) -> dict[str, WorkerLoad | None]:
        """The last probe's load of each known worker (None: it did not answer)."""
        with self._lock:
            return dict(self._loads)

    def known(self) -> tuple[str, ...]:
        with self._lock:
            return self._known

    def reachable(self) -> list[str]:
        with self._lock:
            return [a for a in self._known if a in self._reachable]

    def client(self, address: str) -> GrpcWorkerClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = GrpcWorkerClient(address, self._config.rpc_timeout_s,
                                                                    self._intercept, self._config.security)
            return client

    def mark_lost(self, address: str, reason: str) -> None:
        with self._lock:
            was_reachable = address in self._reachable
            self._reachable.discard(address)
            healthy = bool(self._reachable)
        if was_reachable:
            logger.warning("attention worker %s lost: %s", address, reason)
        self._router.set_reported_load(address, None)
        self._on_health(healthy)

    def refresh(self) -> None:
        """One round: re-list from placement, probe every known worker, report health."""
        if self._discovery is not None:
            try:
                found = self._discovery.list_workers()
            except DiscoveryError as exc:
                logger.warning("%s; keeping the last list of workers", exc)
            else:
                with self._lock:
                    # A worker placement does not list (yet: a restarted placement before the workers
                    # re-register) stays while it answers its probes; one that stops drops out.
                    answering = [a for a in self._known if a in self._reachable]
                    known = tuple(dict.fromkeys((*self._config.attention_workers, *found.attention, *answering)))
                    if known != self._known:
                        logger.info("attention workers: %s", ", ".join(known) or "none")
                    self._known = known
                    self.num_expert_workers = found.num_expert_workers
        addresses = self.known()
        results = list(self._probe_pool.map(self._probe, addresses))
        loads = [r if isinstance(r, WorkerLoad) else None for r in results]
        with self._lock:
            self._loads = dict(zip(addresses, loads))
        with self._lock:
            before = set(self._reachable)
            for address, result in zip(addresses, results):
                self._slow_rounds[address] = self._slow_rounds.get(address, 0) + 1 if result == SLOW else 0
            # A reachable worker that answers one probe late (CPU contention) stays routable for a
            # round; refused connections, NOT_SERVING and a second late round take it out at once.
            self._reachable = {a for a, load, result in zip(addresses, loads, results)
                               if load is not None or (result == SLOW and a in before
                                                       and self._slow_rounds[a] < MAX_SLOW_ROUNDS)}
            healthy = bool(self._reachable)
            newly = self._reachable - before
        for address, load in zip(addresses, loads):
            self._router.set_reported_load(address, load.outstanding_tokens if load is not None else None)
        if newly:
            logger.info("attention workers reachable: %s", ", ".join(sorted(newly)))
        self._on_health(healthy)

    def _probe(self, address: str) -> WorkerLoad | str | None:
        """The worker's load; SLOW when it did not answer in time; None when it is lost."""
        try:
            return self.client(address).probe()
        except WorkerSlow as exc:
            logger.debug("probe late: %s", exc)
            return SLOW
        except WorkerLost as exc:
            logger.debug("probe failed: %s", exc)
            return None

    def run_refresh_loop(self, stop: threading.Event) -> None:
        """Refreshes every --refresh-interval-s until ``stop`` is set (the first round is the caller's)."""
        while not stop.wait(self._config.refresh_interval_s):
            self.refresh()

    def close(self) -> None:
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()
        if self._discovery is not None:
            self._discovery.close()
