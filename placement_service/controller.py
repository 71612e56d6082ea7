"""PlacementController: the placement service's logic, free of gRPC.

One lock (``self._lock``) guards the worker registry, the map history and the load stats,
so every request sees and leaves a consistent state; the state db is written inside the
same critical section, in the order the state changes. Requests arrive on gRPC threads;
``check_health`` runs on the monitor thread.

Flow: Register → rank. Once all N expert workers are registered, map version 1 is built
(the initial placement with expert workers as slot owners, in rank order) and persisted.
Once every worker of both roles is registered the deployment is *ready*: every watcher
gets the current map (COMMIT) with the full DataPlaneInfo, and every later ``push_map``
version is fanned out through the ``Broadcaster`` (one queue per watcher).
"""

from __future__ import annotations

import logging
import threading

import torch

from epserve.expert_map import ExpertMap
from epserve.placement_client import DataPlaneInfo, UpdatePhase, WorkerInfo, WorkerRole
from placement_service.broadcast import Broadcaster, Subscription, SubscriptionClosed
from placement_service.config import PlacementConfig
from placement_service.errors import FailedPrecondition, InvalidArgument, Unavailable
from placement_service.registry import WorkerRegistry
from placement_service.state import LoadStats, MapHistory, PlacementUpdate, balancedness
from placement_service.state_db import StateDB

logger = logging.getLogger(__name__)


class PlacementController:
    def __init__(self, config: PlacementConfig, dist_init_addr: str, initial_phy2log: torch.Tensor,
                 db: StateDB | None = None) -> None:
        """initial_phy2log: [L, P], the placement of version 1 (from --init-expert-location)."""
        model = config.model
        assert tuple(initial_phy2log.shape) == (model.num_moe_layers, config.num_physical_slots), initial_phy2log.shape
        self.config, self.dist_init_addr, self._db = config, dist_init_addr, db
        self._initial_phy2log = initial_phy2log
        self._lock = threading.RLock()
        self._registry = WorkerRegistry(config.dp_size, config.ep_size, config.suspect_after_ms / 1000,
                                        config.heartbeat_timeout_ms / 1000)
        self._maps = MapHistory()
        self._load = LoadStats()
        self._watchers: Broadcaster[PlacementUpdate] = Broadcaster()
        self._ready = False
        self._closing = False
        if db is not None:
            self._registry.restore(db.load_workers())
            self._maps.restore(db.load_maps())
            if self._maps.current is not None:
                logger.info("resumed from %s at map version %d with %d workers", db.path,
                            self._maps.latest_version, len(self._registry.workers()))
        with self._lock:
            self._advance()

    # -- worker RPCs -----------------------------------------------------------------------
    def register(self, worker_id: str, role: int, address: str, capacity: float, device: str,
                 model_fingerprint: str, previous_rank: int) -> int:
        """Returns the worker's rank. Raises PlacementError subclasses."""
        if model_fingerprint != self.config.model.fingerprint:
            raise FailedPrecondition(f"model_fingerprint {model_fingerprint!r} does not match placement's model "
                                     f"{self.config.model_path} ({self.config.model.fingerprint}); start the "
                                     "worker on the same model")
        with self._lock:
            self._check_open()
            record, is_new = self._registry.register(worker_id, role, address, capacity, device, previous_rank)
            if self._db is not None:
                self._db.save_worker(record)
            logger.info("%s worker %s at %s %s rank %d (%d/%d attention, %d/%d expert)", record.role.name.lower(),
                        worker_id, address, "got" if is_new else "re-registered with", record.rank,
                        self._registry.count(WorkerRole.ATTENTION), self.config.dp_size,
                        self._registry.count(WorkerRole.EXPERT), self.config.ep_size)
            self._advance()
            return record.rank

    def heartbeat(self, worker_id: str, map_version: int) -> int:
        """Returns the latest map version (0 while none exists)."""
        with self._lock:
            self._check_open()
            self._registry.heartbeat(worker_id, map_version)
            return self._maps.latest_version

    def ack(self, worker_id: str, version: int, phase: int, ok: bool, error: str) -> None:
        with self._lock:
            self._check_open()
            record = self._registry.get(worker_id)
            _check_version("version", version)
            if phase not in set(UpdatePhase):
                raise InvalidArgument(f"phase {phase} is not an UPDATE_PHASE_* value")
            self._maps.get(version)  # NotFound for an unknown version
            if ok:
                record.map_version = max(record.map_version, version)
                logger.debug("worker %s acked version %d phase %s", worker_id, version, UpdatePhase(phase).name)
            else:
                logger.warning("worker %s failed version %d phase %s: %s", worker_id, version,
                               UpdatePhase(phase).name, error)

    def report_load(self, worker_id: str, map_version: int, num_layers: int, num_physical_slots: int,
                    slot_token_counts: list[int], num_passes: int) -> None:
        with self._lock:
            self._check_open()
            self._registry.get(worker_id)
            _check_version("map_version", map_version)
            expert_map = self._maps.get(map_version)
            self._load.add(expert_map, num_layers, num_physical_slots, slot_token_counts, num_passes)

    def subscribe(self, name: str) -> Subscription[PlacementUpdate]:
        """A watcher's queue, primed with the current map once the deployment is ready."""
        with self._lock:
            self._check_open()
            initial = [self._update(UpdatePhase.COMMIT, self._maps.current)] if self._ready else []
            try:
                return self._watchers.subscribe(name, initial)
            except SubscriptionClosed:
                raise Unavailable("placement is shutting down") from None

    def unsubscribe(self, subscription: Subscription[PlacementUpdate]) -> None:
        self._watchers.unsubscribe(subscription)

    # -- admin -----------------------------------------------------------------------------
    def get_placement(self, version: int) -> tuple[ExpertMap, float, list[int]]:
        """(map, balancedness of its recorded load, all versions); version 0 = current."""
        with self._lock:
            expert_map = self._maps.get(version)
            return expert_map, balancedness(expert_map, self._load.physical(expert_map.version)), self._maps.versions()

    def list_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [record.info() for record in self._registry.workers()]

    def data_plane(self) -> DataPlaneInfo:
        with self._lock:
            return DataPlaneInfo(self.config.moe_a2a_backend, self.dist_init_addr, self.config.world_size,
                                 tuple(self.list_workers()))

    @property
    def is_ready(self) -> bool:
        """A map exists and every worker of both roles has registered."""
        return self._ready

    @property
    def num_watchers(self) -> int:
        return self._watchers.num_subscribers

    # -- new versions ----------------------------------------------------------------------
    def push_map(self, phy2log: torch.Tensor, phase: UpdatePhase = UpdatePhase.COMMIT,
                 slot_owners: tuple[str, ...] | None = None) -> ExpertMap:
        """Append phy2log [L, P] as the next version, persist it, and send it to every watcher
        (once the deployment is ready). Raises ValueError for an invalid map."""
        with self._lock:
            self._check_open()
            current = self._maps.current
            if current is None:
                raise Unavailable("no initial map yet: all expert workers must register first")
            expert_map = self._maps.next(phy2log, current.num_logical_experts,
                                         current.slot_owners if slot_owners is None else slot_owners)
            self._append(expert_map)
            if self._ready:
                self._watchers.publish(self._update(phase, expert_map))
            return expert_map

    # -- health ----------------------------------------------------------------------------
    def check_health(self) -> None:
        """Called periodically by the monitor thread: SUSPECT / DEAD silent workers."""
        with self._lock:
            for record, previous in self._registry.check_health():
                logger.warning("worker %s (%s rank %d) is %s (was %s): last heartbeat at unix ms %d",
                               record.worker_id, record.role.name.lower(), record.rank, record.state.name,
                               previous.name, record.last_heartbeat_unix_ms)

    def close(self) -> None:
        """Refuse further requests (UNAVAILABLE) and end every watch stream."""
        with self._lock:
            self._closing = True
        self._watchers.close_all()

    # -- internals (call with the lock held) -----------------------------------------------
    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("placement is shutting down")

    def _advance(self) -> None:
        """Build map version 1 once all expert workers are in; announce once everyone is in."""
        if self._maps.current is None and self._registry.is_complete(WorkerRole.EXPERT):
            expert_map = self._maps.next(self._initial_phy2log, self.config.model.num_experts,
                                         self._registry.expert_ids())
            self._append(expert_map)
            logger.info("initial expert map version %d: %d layers, %d slots over %d expert workers (%s)",
                        expert_map.version, expert_map.num_layers, expert_map.num_physical_slots,
                        expert_map.num_workers, self.config.init_expert_location)
        if not self._ready and self._maps.current is not None and self._registry.is_complete():
            self._ready = True
            logger.info("all %d workers registered; publishing map version %d", self.config.world_size,
                        self._maps.latest_version)
            self._watchers.publish(self._update(UpdatePhase.COMMIT, self._maps.current))

    def _append(self, expert_map: ExpertMap) -> None:
        if self._db is not None:
            self._db.save_map(expert_map)
        self._maps.append(expert_map)

    def _update(self, phase: UpdatePhase, expert_map: ExpertMap) -> PlacementUpdate:
        return PlacementUpdate(phase, expert_map, self.data_plane())


def _check_version(field_name: str, version: int) -> None:
    if version < 1:
        raise InvalidArgument(f"{field_name} must be a map version (>= 1), got {version}")
