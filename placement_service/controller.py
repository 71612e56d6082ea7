"""PlacementController: the placement service's logic and state, free of gRPC.

One lock (``self._lock``) guards the worker registry, the map history and the load stats,
so every request sees and leaves a consistent state; the state db is written inside the
same critical section, in the order the state changes. Requests arrive on gRPC threads;
``check_health`` runs on the monitor thread; map changes are driven by the ``Rebalancer``
(``rebalancer.py``) through the transition methods below, on an admin RPC's thread or the
rebalancer thread. Nothing here waits: waiting for acks is the rebalancer's, on the
``AckBoard`` (whose lock is never taken while holding ``self._lock``).

Flow: Register → rank. Once all W expert workers are registered, map version 1 is built
(the initial placement with expert workers as slot owners, in rank order; re-planned for their
capacities when those differ, ``initial_placement.py``) and persisted.
Once every worker of both roles is registered the deployment is *ready*: every watcher
gets the current map (COMMIT) with the full DataPlaneInfo, and every later version is
fanned out through the ``Broadcaster`` (one queue per watcher). PREPARE, RETIRE and
ROLLBACK go to every watcher but attention workers (they act on COMMIT only). A watcher
that subscribes while a PREPARE is in flight gets it right after the current map, so a
worker that reconnects mid-rebalance still prepares.

Colocated deployments (``--moe-a2a-backend local``, ``--ep-size 0``): attention workers hold
every expert themselves, so there is no map at all. The deployment is ready once every attention
worker registered; nothing is ever published; reading or changing the map (and ReportLoad,
which feeds EPLB) raises FailedPrecondition (``check_has_placement``). Registry, health and
ListWorkers (the gateway's discovery) work as for every deployment.

Elastic EP (``--elastic-ep-backend``): ``on_membership`` (set by ``failover.Failover``) is called,
outside the lock, after anything that may call for a new map: a registration, a health change,
a probe's verdict. A restarted expert worker (it registers with no previous rank: a new process)
that had been drained is drained no more: starting it again is how an operator takes it back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from epserve.expert_map import ExpertMap
from epserve.placement_types import DataPlaneInfo, UpdatePhase, WorkerInfo, WorkerRole, WorkerState
from epserve.placement_service.ack_board import AckBoard
from epserve.placement_service.broadcast import Broadcaster, Subscription, SubscriptionClosed
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from epserve.placement_service.initial_placement import capacity_aware_phy2log
from epserve.placement_service.registry import WorkerRegistry
from epserve.placement_service.state import LoadStats, MapHistory, PlacementUpdate, balancedness
from epserve.placement_service.state_db import StateDB

logger = logging.getLogger(__name__)

NO_PLACEMENT = ("this is a colocated deployment (--moe-a2a-backend local): every attention worker holds all "
                "experts itself, so there is no expert placement to read or change")

# JSON-valued settings of the map-change machinery (state_db.py describes each).
JSON_SETTINGS = ("last_reserved_version", "prepare_version", "operation", "eplb_paused", "drained_workers",
                 "num_rebalances", "num_rollbacks", "last_rebalance_ms")


class PlacementController:
    def __init__(self, config: PlacementConfig, dist_init_addr: str, initial_phy2log: torch.Tensor,
                 db: StateDB | None = None, initial_load: torch.Tensor | None = None) -> None:
        """initial_phy2log: [L, P], the placement of version 1 (from --init-expert-location);
        initial_load: [L, E] to re-plan it from when the expert workers' capacities differ
        (initial_placement.py; None: use initial_phy2log as is)."""
        model = config.model
        assert tuple(initial_phy2log.shape) == (model.num_moe_layers, config.num_physical_slots), initial_phy2log.shape
        self.config, self.dist_init_addr, self._db = config, dist_init_addr, db
        self._initial_phy2log, self._initial_load = initial_phy2log, initial_load
        self._lock = threading.RLock()
        self._registry = WorkerRegistry(config.dp_size, config.ep_size, config.suspect_after_ms / 1000,
                                        config.heartbeat_timeout_ms / 1000, elastic=config.elastic)
        self._maps = MapHistory()
        self._meta: dict[int, tuple[str, int]] = {}  # version -> (operation, base version)
        self._load = LoadStats()
        self._watchers: Broadcaster[PlacementUpdate] = Broadcaster()
        self.acks = AckBoard()
        self._preparing: PlacementUpdate | None = None  # the PREPARE in flight, for late subscribers
        self._ready = False
        self._closing = False
        self.on_load_report: Callable[[], None] | None = None  # set by the EPLB loop
        self.on_membership: Callable[[], None] | None = None  # set by the elastic failover
        self._settings: dict[str, object] = {}  # JSON_SETTINGS, mirrored in the db
        if db is not None:
            self._settings = {key: value for key in JSON_SETTINGS
                              if (value := db.load_json(key)) is not None}
            self._registry.restore(db.load_workers())
            self._maps.restore(db.load_maps(), int(self._settings.get("last_reserved_version", 0)))
            self._meta = db.load_meta()
            for worker_id in self._settings.get("drained_workers", []):
                self._registry.set_drained(worker_id, True)
            if self._maps.current is not None:
                logger.info("resumed from %s at map version %d with %d workers", db.path,
                            self._maps.current_version, len(self._registry.workers()))
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
        if self.config.colocated and role == WorkerRole.EXPERT:
            raise FailedPrecondition(f"expert worker {worker_id} refused: this is a colocated deployment "
                                     "(--moe-a2a-backend local, --ep-size 0): every attention worker holds all "
                                     "experts itself and there are no expert workers")
        with self._lock:
            self._check_open()
            record, is_new = self._registry.register(worker_id, role, address, capacity, device, previous_rank)
            if self._db is not None:
                self._db.save_worker(record)
            if not is_new and previous_rank == -1 and record.drained and self.config.elastic:
                self._undrain(record.worker_id)
            logger.info("%s worker %s at %s %s rank %d (%d/%d attention, %d/%d expert)", record.role.name.lower(),
                        worker_id, address, "got" if is_new else "re-registered with", record.rank,
                        self._registry.count(WorkerRole.ATTENTION), self.config.dp_size,
                        self._registry.count(WorkerRole.EXPERT), self.config.ep_size)
            self._advance()
            rank = record.rank
        self.acks.poke()
        self._membership_changed()
        return rank

    def heartbeat(self, worker_id: str) -> None:
        """The worker is alive (its map version comes with its COMMIT acks, ``ack``)."""
        with self._lock:
            self._check_open()
            self._registry.heartbeat(worker_id)
        self.acks.poke()

    def ack(self, worker_id: str, version: int, phase: int, ok: bool, error: str) -> None:
        """Any version handed out so far may be acked (a prepared one is not in the history yet,
        a rolled-back one never will be). Only COMMIT acks move the worker's map_version."""
        with self._lock:
            self._check_open()
            record = self._registry.get(worker_id)
            _check_version("version", version)
            if phase not in set(UpdatePhase):
                raise InvalidArgument(f"phase {phase} is not an UPDATE_PHASE_* value")
            if version > self._maps.last_reserved:
                self._maps.get(version)  # NotFound (or Unavailable before any map)
            phase = UpdatePhase(phase)
            if ok:
                if phase is UpdatePhase.COMMIT:
                    record.map_version = max(record.map_version, version)
                logger.debug("worker %s acked version %d phase %s", worker_id, version, phase.name)
            else:
                logger.warning("worker %s failed version %d phase %s: %s", worker_id, version, phase.name, error)
        self.acks.record(worker_id, version, phase, ok, error)

    def report_load(self, worker_id: str, map_version: int, num_layers: int, num_physical_slots: int,
                    slot_token_counts: list[int], num_passes: int) -> None:
        self.check_has_placement()
        with self._lock:
            self._check_open()
            self._registry.get(worker_id)
            _check_version("map_version", map_version)
            expert_map = self._maps.get(map_version)
            self._load.add(expert_map, num_layers, num_physical_slots, slot_token_counts, num_passes, worker_id)
        if self.on_load_report is not None:
            self.on_load_report()

    def subscribe(self, name: str) -> Subscription[PlacementUpdate]:
        """A watcher's queue, primed with the current map once the deployment is ready (and the
        PREPARE in flight, if any)."""
        with self._lock:
            self._check_open()
            has_map = self._ready and self._maps.current is not None      # never in a colocated deployment
            initial = [self._update(UpdatePhase.COMMIT, self._maps.current)] if has_map else []
            if self._ready and self._preparing is not None and not self._is_attention(name):
                initial.append(self._preparing)
            try:
                return self._watchers.subscribe(name, initial)
            except SubscriptionClosed:
                raise Unavailable("placement is shutting down") from None

    def unsubscribe(self, subscription: Subscription[PlacementUpdate]) -> None:
        self._watchers.unsubscribe(subscription)

    # -- reads -----------------------------------------------------------------------------
    def get_placement(self, version: int) -> tuple[ExpertMap, float, list[int]]:
        """(map, balancedness of its recorded load, all versions); version 0 = current."""
        self.check_has_placement()
        with self._lock:
            expert_map = self._maps.get(version)
            return expert_map, balancedness(expert_map, self._load.physical(expert_map.version)), self._maps.versions()

    def current_map(self) -> ExpertMap:
        """Raises Unavailable before the first map, FailedPrecondition in a colocated deployment."""
        self.check_has_placement()
        with self._lock:
            return self._maps.get(0)

    def version_meta(self, version: int) -> tuple[str, int]:
        """(operation that made ``version``, version in service when it began); ("", 0) if unknown."""
        with self._lock:
            return self._meta.get(version, ("", 0))

    def list_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [record.info() for record in self._registry.workers()]

    def worker(self, worker_id: str) -> WorkerInfo:
        """Raises NotFound."""
        with self._lock:
            return self._registry.get(worker_id).info()

    @property
    def current_version(self) -> int:
        """The newest committed map version (0 before the first map)."""
        with self._lock:
            return self._maps.current_version

    @property
    def world_size(self) -> int:
        """Attention + expert ranks: ``--dp-size + --ep-size``, plus expert workers added by scale-out."""
        with self._lock:
            return self._registry.world_size

    def data_plane(self) -> DataPlaneInfo:
        with self._lock:
            return DataPlaneInfo(self.config.moe_a2a_backend, self.dist_init_addr, self._registry.world_size,
                                 tuple(self.list_workers()))

    def load_window(self) -> tuple[torch.Tensor | None, int]:
        """(tokens per logical expert [L, E] since the last EPLB decision or None, passes in it)."""
        with self._lock:
            window, passes = self._load.window()
            return (None if window is None else window.clone()), passes

    def load_total(self) -> torch.Tensor | None:
        """Tokens per logical expert [L, E] since start-up (all versions), or None."""
        with self._lock:
            total = self._load.logical()
            return None if total is None else total.clone()

    def reset_load_window(self) -> None:
        with self._lock:
            self._load.reset_window()

    def slot_owner_states(self, expert_map: ExpertMap) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(live [W] bool: the slot owner may hold experts, i.e. neither drained nor DEAD;
        capacity [W] float64, or None when all equal)."""
        with self._lock:
            records = [self._registry.get(worker_id) for worker_id in expert_map.slot_owners]
            live = torch.tensor([not r.drained and r.state != WorkerState.DEAD for r in records])
            capacity = torch.tensor([r.capacity for r in records], dtype=torch.float64)
        return live, (None if bool((capacity == capacity[0]).all()) else capacity)

    def check_has_placement(self) -> None:
        """FailedPrecondition in a colocated deployment: it has no expert map to read or change."""
        if self.config.colocated:
            raise FailedPrecondition(NO_PLACEMENT)

    @property
    def is_ready(self) -> bool:
        """A map exists and every worker of both roles has registered (colocated: every attention
        worker has registered; there is no map)."""
        return self._ready

    @property
    def is_closing(self) -> bool:
        return self._closing

    def unheard_workers(self) -> list[str]:
        """Workers (not DEAD) not heard from since this process started, or not watching placement."""
        watching = self._watchers.subscriber_names()
        with self._lock:
            return [r.worker_id for r in self._registry.workers() if r.state != WorkerState.DEAD
                    and (not r.heard or r.worker_id not in watching)]

    # -- map changes (driven by the Rebalancer) ----------------------------------------------
    def reserve_version(self) -> int:
        """A version number no map has had or will have again (persisted before it is used)."""
        with self._lock:
            self._check_open()
            version = self._maps.reserve()
            self._save_json({"last_reserved_version": version})
            return version

    def waiting_for_prepare(self, version: int) -> tuple[list[str], list[str]]:
        """(expert workers expected to ack PREPARE ``version`` that have not acked ok, those DEAD)."""
        acked = self.acks.acks(version, UpdatePhase.PREPARE)
        with self._lock:
            experts = [r for r in self._registry.workers() if r.role == WorkerRole.EXPERT]
        dead = [r.worker_id for r in experts if r.state == WorkerState.DEAD]
        waiting = [r.worker_id for r in experts if r.state != WorkerState.DEAD
                   and not (r.worker_id in acked and acked[r.worker_id].ok)]
        return waiting, dead

    def attention_behind(self, version: int) -> list[str]:
        """Attention workers (not DEAD) that have not yet switched to ``version`` or later."""
        with self._lock:
            return [r.worker_id for r in self._registry.workers()
                    if r.role == WorkerRole.ATTENTION and r.state != WorkerState.DEAD and r.map_version < version]

    def publish_prepare(self, expert_map: ExpertMap) -> None:
        with self._lock:
            self._check_open()
            self._check_ready()
            self._save_json({"prepare_version": {"version": expert_map.version,
                                                 "phy2log": expert_map.phy2log.tolist(),
                                                 "slot_owners": list(expert_map.slot_owners)}})
            self._preparing = self._update(UpdatePhase.PREPARE, expert_map)
            self._watchers.publish(self._preparing, skip=self._is_attention)

    def publish_rollback(self, expert_map: ExpertMap) -> None:
        """Tell expert workers to drop the prepared ``expert_map``; forget it was in flight."""
        with self._lock:
            if self._preparing is not None and self._preparing.expert_map.version == expert_map.version:
                self._preparing = None
            self._save_json({"prepare_version": None, "num_rollbacks": self.stat("num_rollbacks") + 1})
            self._watchers.publish(self._update(UpdatePhase.ROLLBACK, expert_map), skip=self._is_attention)

    def commit(self, expert_map: ExpertMap, operation: str, base_version: int, drain: tuple[str, ...] = ()) -> None:
        """Append the prepared map to the history and publish COMMIT: attention workers switch
        at their next step boundary. Drained workers afterwards: those drained before or being
        drained (``drain``), less any other worker the new map gives slots to (persisted with
        the map in one transaction)."""
        with self._lock:
            self._check_open()
            per = expert_map.slots_per_worker
            holders = {owner for index, owner in enumerate(expert_map.slot_owners)
                       if bool((expert_map.phy2log[:, index * per:(index + 1) * per] >= 0).any())}
            before = {r.worker_id for r in self._registry.workers() if r.drained}
            drained = (before | set(drain)) - (holders - set(drain))
            settings = {"prepare_version": None, "drained_workers": sorted(drained)}
            if self._db is not None:
                self._db.save_map(expert_map, operation, base_version, settings)
            self._mirror(settings)
            for worker_id in before ^ drained:
                self._registry.set_drained(worker_id, worker_id in drained)
            self._maps.append(expert_map)
            self._meta[expert_map.version] = (operation, base_version)
            self._preparing = None
            self._watchers.publish(self._update(UpdatePhase.COMMIT, expert_map))

    def publish_retire(self, expert_map: ExpertMap) -> None:
        """No attention worker routes with versions older than ``expert_map`` any more."""
        with self._lock:
            self._watchers.publish(self._update(UpdatePhase.RETIRE, expert_map), skip=self._is_attention)
        self.acks.forget_below(expert_map.version)

    def save_json(self, values: dict[str, object]) -> None:
        with self._lock:
            self._save_json(values)

    def load_json(self, key: str, default=None):
        """One of JSON_SETTINGS (persisted with --state-db, else kept in memory)."""
        with self._lock:
            return self._settings.get(key, default)

    def stat(self, key: str) -> int:
        """A persisted counter (num_rebalances, num_rollbacks)."""
        return int(self.load_json(key, 0))

    # -- health ----------------------------------------------------------------------------
    def check_health(self) -> None:
        """Called periodically by the monitor thread: SUSPECT / DEAD silent workers."""
        with self._lock:
            changes = self._registry.check_health()
            for record, previous in changes:
                logger.warning("worker %s (%s rank %d) is %s (was %s): last heartbeat at unix ms %d",
                               record.worker_id, record.role.name.lower(), record.rank, record.state.name,
                               previous.name, record.last_heartbeat_unix_ms)
        if changes:
            self.acks.poke()
            self._membership_changed()

    def suspect(self, reporter_id: str, suspect_rank: int, reason: str) -> WorkerInfo:
        """A worker reports the peer of ``suspect_rank`` (elastic EP). Raises NotFound for an
        unknown reporter or rank."""
        with self._lock:
            self._check_open()
            self._registry.get(reporter_id)
            record = self._registry.by_rank(suspect_rank)
            previous = record.state
            state = self._registry.suspect(record.worker_id)
            if state != previous:
                logger.warning("worker %s (rank %d) is SUSPECT: %s reported %s", record.worker_id, record.rank,
                               reporter_id, reason)
            return record.info()

    def mark_dead(self, worker_id: str, reason: str) -> None:
        """DEAD now (placement's probe found nothing listening), not after the heartbeat timeout."""
        with self._lock:
            previous = self._registry.mark_dead(worker_id)
            if previous != WorkerState.DEAD:
                logger.warning("worker %s is DEAD (was %s): %s", worker_id, previous.name, reason)
        self.acks.poke()
        self._membership_changed()

    def mark_alive(self, worker_id: str) -> None:
        with self._lock:
            self._registry.mark_alive(worker_id)
        self._membership_changed()

    def _membership_changed(self) -> None:
        if self.on_membership is not None:
            self.on_membership()

    def close(self) -> None:
        """Refuse further requests (UNAVAILABLE), stop waiters and end every watch stream."""
        with self._lock:
            self._closing = True
        self.acks.close()
        self._watchers.close_all()

    # -- internals (call with the lock held) -----------------------------------------------
    def _is_attention(self, name: str) -> bool:
        """Attention workers act on COMMIT only: PREPARE / RETIRE / ROLLBACK are not sent to them
        (less work on their watch thread, which shares the engine's process)."""
        try:
            return self._registry.get(name).role == WorkerRole.ATTENTION
        except NotFound:
            return False

    def _undrain(self, worker_id: str) -> None:
        drained = sorted(r.worker_id for r in self._registry.workers() if r.drained and r.worker_id != worker_id)
        self._save_json({"drained_workers": drained})
        self._registry.set_drained(worker_id, False)
        logger.info("expert worker %s was drained and started again: it takes experts again", worker_id)

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("placement is shutting down")

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable(f"the deployment is not complete yet ({self._registry.count(WorkerRole.ATTENTION)}/"
                              f"{self.config.dp_size} attention, {self._registry.count(WorkerRole.EXPERT)}/"
                              f"{self.config.ep_size} expert workers registered)")

    def _advance(self) -> None:
        """Build map version 1 once all expert workers are in; announce once everyone is in.
        Colocated: ready once every attention worker is in; no map is built or announced."""
        if self.config.colocated:
            if not self._ready and self._registry.is_complete():
                self._ready = True
                logger.info("all %d attention workers registered (colocated: no expert workers, no expert map)",
                            self.config.dp_size)
            return
        if self._maps.current is None and self._registry.is_complete(WorkerRole.EXPERT):
            owners = self._registry.expert_ids()[:self.config.ep_size]    # elastic: later ones come by scale-out
            phy2log = self._initial_phy2log
            capacity = torch.tensor([self._registry.get(w).capacity for w in owners], dtype=torch.float64)
            if self._initial_load is not None and not bool((capacity == capacity[0]).all()):
                phy2log = capacity_aware_phy2log(self.config, phy2log, self._initial_load, capacity)
                logger.info("expert workers' capacities %s differ: map version 1 is %s", capacity.tolist(),
                            "the trivial one (no faster plan)" if phy2log is self._initial_phy2log
                            else "planned for them")
            expert_map = self._maps.next(phy2log, self.config.model.num_experts, owners)
            self._append(expert_map, "initial", 0)
            logger.info("initial expert map version %d: %d layers, %d slots over %d expert workers (%s)",
                        expert_map.version, expert_map.num_layers, expert_map.num_physical_slots,
                        expert_map.num_workers, self.config.init_expert_location)
        if not self._ready and self._maps.current is not None and self._registry.is_complete():
            self._ready = True
            logger.info("all %d workers registered; publishing map version %d", self.config.world_size,
                        self._maps.current_version)
            self._watchers.publish(self._update(UpdatePhase.COMMIT, self._maps.current))

    def _append(self, expert_map: ExpertMap, operation: str, base_version: int) -> None:
        if self._db is not None:
            self._db.save_map(expert_map, operation, base_version)
        self._maps.append(expert_map)
        self._meta[expert_map.version] = (operation, base_version)

    def _save_json(self, values: dict[str, object]) -> None:
        """None deletes a key. Persisted first: memory never runs ahead of the db."""
        assert set(values) <= set(JSON_SETTINGS), values.keys()
        if self._db is not None:
            self._db.save_json(values)
        self._mirror(values)

    def _mirror(self, values: dict[str, object]) -> None:
        for key, value in values.items():
            if value is None:
                self._settings.pop(key, None)
            else:
                self._settings[key] = value

    def _update(self, phase: UpdatePhase, expert_map: ExpertMap) -> PlacementUpdate:
        return PlacementUpdate(phase, expert_map, self.data_plane())


def _check_version(field_name: str, version: int) -> None:
    if version < 1:
        raise InvalidArgument(f"{field_name} must be a map version (>= 1), got {version}")
