"""The worker registry: who is in the deployment, with which data-plane rank, and how alive.

Ranks: attention workers get [0, A), expert workers [A, A + W), lowest free rank first (so
arrival order for a fresh deployment). A known worker id always gets its old rank back; a
new id may claim ``previous_rank`` (a worker re-registering with a placement that forgot
it) when that rank is free.

Health: ``heartbeat`` marks a worker ALIVE; ``check_health`` (called periodically by the
monitor thread) marks it SUSPECT after ``suspect_after_s`` without a heartbeat and DEAD
after ``dead_after_s``. Nothing else reacts yet (elastic failover is a later step).
A *drained* expert worker (``set_drained``: every slot moved off it by DrainWorker) shows
DRAINING while it is heard from, DEAD when silent; EPLB plans place nothing on it.

Elastic EP (``elastic=True``): a new expert worker that finds every expert rank taken gets the
next rank (``ep_size`` grows: scale-out); ``suspect`` marks a worker a peer reported, and
``mark_dead`` / ``mark_alive`` record placement's probe of it, without waiting for the timers.

Not thread-safe: ``PlacementController`` calls it under its lock. Times come from the
injected clocks so tests can drive them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epserve.placement_types import WorkerInfo, WorkerRole, WorkerState
from epserve.placement_service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

logger = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    worker_id: str
    role: WorkerRole
    rank: int
    address: str
    capacity: float = 1.0
    device: str = ""
    state: WorkerState = WorkerState.ALIVE
    last_seen_s: float = 0.0  # monotonic clock, for timeouts
    last_heartbeat_unix_ms: int = 0  # wall clock, for people
    map_version: int = 0  # the newest version the worker acked COMMIT of
    drained: bool = False  # DrainWorker moved every slot off it
    heard: bool = True  # registered or heartbeated since this placement process started

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, self.role, self.address, self.rank, self.state, self.capacity,
                          self.device, self.last_heartbeat_unix_ms, self.map_version)


class WorkerRegistry:
    def __init__(self, dp_size: int, ep_size: int, suspect_after_s: float, dead_after_s: float,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 elastic: bool = False) -> None:
        assert 0 < suspect_after_s < dead_after_s
        self.dp_size, self.ep_size, self.elastic = dp_size, ep_size, elastic
        self.suspect_after_s, self.dead_after_s = suspect_after_s, dead_after_s
        self._clock, self._wall_clock = clock, wall_clock
        self._by_id: dict[str, WorkerRecord] = {}
        self._by_rank: dict[int, WorkerRecord] = {}

    @property
    def world_size(self) -> int:
        return self.dp_size + self.ep_size

    def rank_range(self, role: WorkerRole) -> range:
        return range(0, self.dp_size) if role == WorkerRole.ATTENTION else range(self.dp_size, self.world_size)

    # -- membership ------------------------------------------------------------------------
    def register(self, worker_id: str, role: int, address: str, capacity: float, device: str,
                 previous_rank: int) -> tuple[WorkerRecord, bool]:
        """Returns (record, is_new). Raises InvalidArgument / FailedPrecondition / ResourceExhausted."""
        if not worker_id:
            raise InvalidArgument("worker_id is empty; every worker needs a stable id")
        if role not in (WorkerRole.ATTENTION, WorkerRole.EXPERT):
            raise InvalidArgument(f"role {role} is not WORKER_ROLE_ATTENTION or WORKER_ROLE_EXPERT")
        role = WorkerRole(role)
        if capacity < 0:
            raise InvalidArgument(f"capacity must be >= 0 (0 = default 1.0), got {capacity}")
        if previous_rank < -1:
            raise InvalidArgument(f"previous_rank must be -1 (none) or a rank, got {previous_rank}")
        record = self._by_id.get(worker_id)
        if record is not None:
            if record.role != role:
                raise FailedPrecondition(f"worker {worker_id} is registered as {record.role.name}; "
                                         f"it cannot re-register as {role.name}")
            if previous_rank not in (-1, record.rank):
                logger.warning("worker %s asked for rank %d but holds rank %d; keeping %d",
                               worker_id, previous_rank, record.rank, record.rank)
            record.address, record.capacity, record.device = address, capacity or 1.0, device
            self._touch(record)
            return record, False
        rank = self._choose_rank(worker_id, role, previous_rank)
        record = WorkerRecord(worker_id, role, rank, address, capacity or 1.0, device)
        self._touch(record)
        self._by_id[worker_id] = record
        self._by_rank[rank] = record
        return record, True

    def _choose_rank(self, worker_id: str, role: WorkerRole, previous_rank: int) -> int:
        ranks = self.rank_range(role)
        if previous_rank >= 0:
            if previous_rank not in ranks:
                raise InvalidArgument(f"previous_rank {previous_rank} is outside the {role.name} ranks "
                                      f"[{ranks.start}, {ranks.stop})")
            holder = self._by_rank.get(previous_rank)
            if holder is not None:
                raise FailedPrecondition(f"previous_rank {previous_rank} is held by worker {holder.worker_id}")
            return previous_rank
        free = [rank for rank in ranks if rank not in self._by_rank]
        if not free and self.elastic and role == WorkerRole.EXPERT:
            self.ep_size += 1          # scale-out: the new expert worker gets the next rank
            logger.info("expert worker %s is one more than the %d expert ranks: expert ranks grow to %d",
                        worker_id, self.ep_size - 1, self.ep_size)
            return ranks.stop
        if not free:
            flag = "--dp-size" if role == WorkerRole.ATTENTION else "--ep-size"
            raise ResourceExhausted(f"all {len(ranks)} {role.name} ranks are taken ({flag} {len(ranks)}); "
                                    f"worker {worker_id} is one too many")
        return free[0]

    def restore(self, records: Iterable[WorkerRecord]) -> None:
        """Workers loaded from the state db: presumed ALIVE as of now (workers keep serving while
        placement is down; a gateway listing them meanwhile must not drop them), not yet
        ``heard``; the usual timers make a silent one SUSPECT, then DEAD."""
        for record in records:
            if self.elastic and record.role == WorkerRole.EXPERT:
                self.ep_size = max(self.ep_size, record.rank - self.dp_size + 1)   # grown by a scale-out
            assert record.rank in self.rank_range(record.role), (
                f"stored rank {record.rank} of {record.worker_id} is out of range")
            record.state = WorkerState.ALIVE
            record.heard = False
            record.last_seen_s = self._clock()
            self._by_id[record.worker_id] = record
            self._by_rank[record.rank] = record

    def get(self, worker_id: str) -> WorkerRecord:
        record = self._by_id.get(worker_id)
        if record is None:
            raise NotFound(f"worker {worker_id!r} is not registered; call Register first")
        return record

    def workers(self) -> list[WorkerRecord]:
        """Every registered worker, by rank (attention ranks first)."""
        return [self._by_rank[rank] for rank in sorted(self._by_rank)]

    def count(self, role: WorkerRole) -> int:
        return sum(1 for record in self._by_id.values() if record.role == role)

    def is_complete(self, role: WorkerRole | None = None) -> bool:
        roles = (role,) if role is not None else (WorkerRole.ATTENTION, WorkerRole.EXPERT)
        return all(self.count(r) == len(self.rank_range(r)) for r in roles)

    def expert_ids(self) -> tuple[str, ...]:
        """Expert worker ids in rank order: the slot owners of a new map."""
        return tuple(r.worker_id for r in self.workers() if r.role == WorkerRole.EXPERT)

    def set_drained(self, worker_id: str, drained: bool) -> None:
        record = self.get(worker_id)
        record.drained = drained
        if record.state != WorkerState.DEAD:
            record.state = WorkerState.DRAINING if drained else WorkerState.ALIVE

    # -- health ----------------------------------------------------------------------------
    def heartbeat(self, worker_id: str) -> WorkerRecord:
        record = self.get(worker_id)
        self._touch(record)
        return record

    def _touch(self, record: WorkerRecord) -> None:
        if record.state in (WorkerState.SUSPECT, WorkerState.DEAD):
            logger.info("worker %s (rank %d) is alive again (was %s)", record.worker_id, record.rank, record.state.name)
        record.state = WorkerState.DRAINING if record.drained else WorkerState.ALIVE
        record.heard = True
        record.last_seen_s = self._clock()
        record.last_heartbeat_unix_ms = int(self._wall_clock() * 1000)

    def by_rank(self, rank: int) -> WorkerRecord:
        record = self._by_rank.get(rank)
        if record is None:
            raise NotFound(f"no worker holds data-plane rank {rank}")
        return record

    def suspect(self, worker_id: str) -> WorkerState:
        """A peer reported ``worker_id`` (data-plane timeout or broken link): ALIVE → SUSPECT until
        placement's probe (``mark_dead`` / ``mark_alive``) or its next heartbeat says otherwise."""
        record = self.get(worker_id)
        if record.state == WorkerState.ALIVE:
            record.state = WorkerState.SUSPECT
        return record.state

    def mark_dead(self, worker_id: str) -> WorkerState:
        """Placement's probe found nothing listening: DEAD now (a heartbeat from a restarted
        process makes it ALIVE again). Returns the previous state."""
        record = self.get(worker_id)
        previous, record.state = record.state, WorkerState.DEAD
        return previous

    def mark_alive(self, worker_id: str) -> None:
        """Placement's probe reached the suspect: back to ALIVE (DRAINING when drained)."""
        record = self.get(worker_id)
        if record.state == WorkerState.SUSPECT:
            record.state = WorkerState.DRAINING if record.drained else WorkerState.ALIVE

    def check_health(self) -> list[tuple[WorkerRecord, WorkerState]]:
        """Downgrade silent workers. Returns (record, previous state) for each change."""
        now = self._clock()
        changes = []
        for record in self._by_id.values():
            silent_s = now - record.last_seen_s
            if silent_s > self.dead_after_s:
                new_state = WorkerState.DEAD
            elif silent_s > self.suspect_after_s and record.state == WorkerState.ALIVE:
                new_state = WorkerState.SUSPECT
            else:
                continue
            if new_state != record.state:
                changes.append((record, record.state))
                record.state = new_state
        return changes
