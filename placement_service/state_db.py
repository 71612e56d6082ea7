"""StateDB: the placement service's persisted state (``--state-db PATH``, SQLite in WAL mode).

Every write the service makes to disk is a method of this class; each is one transaction.
Tables:

- ``settings``     key → value: the deployment the db belongs to (model fingerprint, sizes)
                   and the rendezvous port; a restart with other settings is refused. Also
                   the map-change state (JSON values): ``last_reserved_version`` (version
                   numbers are never reused), ``prepare_version`` (a PREPARE in flight),
                   ``operation`` (the map change in progress: its target and base version),
                   ``eplb_paused``, ``drained_workers``, ``num_rebalances``, ``num_rollbacks``.
- ``map_versions`` one row per committed expert-map version: phy2log [L, P] as little-endian
                   int32 bytes, slot owners (JSON), checksum, created time.
- ``map_version_meta`` per committed version: the operation that made it and the version
                   ``Rollback`` returns to from it (the version in service when that operation
                   began; for a rollback, where the restored version would roll back to).
- ``workers``      the registry: id, role, rank, address, capacity, device.

A restarted service loads them all, so it resumes at the same map version and gives every
worker its old rank. Calls come from gRPC threads; an internal lock serializes them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import torch

from epserve.expert_map import ExpertMap
from epserve.placement_types import WorkerRole
from epserve.placement_service.registry import WorkerRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS map_versions (
    version INTEGER PRIMARY KEY,
    num_layers INTEGER NOT NULL,
    num_physical_slots INTEGER NOT NULL,
    num_logical_experts INTEGER NOT NULL,
    phy2log BLOB NOT NULL,
    slot_owners TEXT NOT NULL,
    checksum TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS map_version_meta (
    version INTEGER PRIMARY KEY,
    operation TEXT NOT NULL,
    base_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    role INTEGER NOT NULL,
    rank INTEGER NOT NULL UNIQUE,
    address TEXT NOT NULL,
    capacity REAL NOT NULL,
    device TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL
);
"""


class StateDB:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock, self._conn:
            self._conn.executescript(SCHEMA)

    # -- reads -----------------------------------------------------------------------------
    def settings(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, value FROM settings").fetchall())

    def load_maps(self) -> list[ExpertMap]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT version, num_layers, num_physical_slots, num_logical_experts, phy2log, slot_owners, "
                "checksum FROM map_versions ORDER BY version").fetchall()
        maps = []
        for version, num_layers, num_slots, num_logical, blob, owners, checksum in rows:
            phy2log = torch.from_numpy(np.frombuffer(blob, dtype="<i4").astype(np.int64)).reshape(num_layers, num_slots)
            expert_map = ExpertMap(phy2log, num_logical, version, tuple(json.loads(owners)))
            if expert_map.checksum != checksum:
                raise ValueError(f"{self.path}: map version {version} is corrupt (checksum {checksum} "
                                 f"!= {expert_map.checksum}); restore the db or start with a fresh --state-db")
            maps.append(expert_map)
        return maps

    def load_meta(self) -> dict[int, tuple[str, int]]:
        """version → (operation, base version) of every committed version that has them."""
        with self._lock:
            rows = self._conn.execute("SELECT version, operation, base_version FROM map_version_meta").fetchall()
        return {version: (operation, base) for version, operation, base in rows}

    def load_json(self, key: str, default=None):
        """A JSON-valued setting, or ``default`` when absent."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def load_workers(self) -> list[WorkerRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT worker_id, role, rank, address, capacity, device FROM workers ORDER BY rank").fetchall()
        return [WorkerRecord(worker_id, WorkerRole(role), rank, address, capacity, device)
                for worker_id, role, rank, address, capacity, device in rows]

    # -- writes (the only ones) ------------------------------------------------------------
    def save_settings(self, settings: dict[str, str]) -> None:
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                                   list(settings.items()))

    def save_map(self, expert_map: ExpertMap, operation: str = "", base_version: int = 0,
                 json_settings: dict[str, object] | None = None) -> None:
        """Commit a version, with its operation meta and JSON settings (None values delete the
        key), in one transaction: a crash leaves either all of it or none."""
        blob = expert_map.phy2log.numpy().astype("<i4").tobytes()
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO map_versions (version, num_layers, num_physical_slots, num_logical_experts, "
                "phy2log, slot_owners, checksum, created_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (expert_map.version, expert_map.num_layers, expert_map.num_physical_slots,
                 expert_map.num_logical_experts, blob, json.dumps(list(expert_map.slot_owners)),
                 expert_map.checksum, _now_ms()))
            if operation:
                self._conn.execute("INSERT OR REPLACE INTO map_version_meta (version, operation, base_version) "
                                   "VALUES (?, ?, ?)", (expert_map.version, operation, base_version))
            self._write_json(json_settings or {})

    def save_json(self, values: dict[str, object]) -> None:
        """JSON-valued settings in one transaction; a None value deletes the key."""
        with self._lock, self._conn:
            self._write_json(values)

    def _write_json(self, values: dict[str, object]) -> None:
        for key, value in values.items():
            if value is None:
                self._conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                self._conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                                   (key, json.dumps(value)))

    def save_worker(self, record: WorkerRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO workers (worker_id, role, rank, address, capacity, device, "
                "updated_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.worker_id, int(record.role), record.rank, record.address, record.capacity,
                 record.device, _now_ms()))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
