"""Versioned expert maps and the expert load reported against them.

Legend: L MoE layers, E logical experts, P physical slots, W expert workers.

``MapHistory`` is append-only: version 1 is the initial map, every later committed plan
(EPLB, admin, failover) is appended and pushed by ``PlacementController``; old versions stay
readable (GetPlacement by number, load reports that lag a switch). Version numbers are
never reused: a version prepared and then rolled back keeps its number (``reserve``), so
the history may skip it (e.g. 1, 2, 4) and no worker can confuse two maps of one number.

``LoadStats`` accumulates ReportLoad windows per map version: physical counts [L, P]
(slot numbers only mean something under their own map) and logical counts [L, E] summed
over all versions. It also keeps the *EPLB window*: logical counts [L, E] and forward
passes per attention worker since the last EPLB decision (``reset_window``), which is what
a rebalancing plan consumes.

Neither class locks; ``PlacementController`` serializes access. Neither touches disk;
persistence is ``state_db.StateDB``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.expert_map import ExpertMap
from epserve.placement_types import DataPlaneInfo, UpdatePhase
from epserve.placement_service.errors import InvalidArgument, NotFound, Unavailable


class MapHistory:
    def __init__(self) -> None:
        self._maps: dict[int, ExpertMap] = {}
        self._last_reserved = 0

    def restore(self, maps: list[ExpertMap], last_reserved: int = 0) -> None:
        for expert_map in maps:
            assert expert_map.version >= 1 and expert_map.version not in self._maps, expert_map.version
            self._maps[expert_map.version] = expert_map
        self._last_reserved = max(self._last_reserved, last_reserved)

    @property
    def last_reserved(self) -> int:
        """The highest version number handed out so far (committed or not)."""
        return max(self.current_version, self._last_reserved)

    def reserve(self) -> int:
        """A fresh version number for a map to be prepared; it is never handed out again."""
        self._last_reserved = self.last_reserved + 1
        return self._last_reserved

    @property
    def current_version(self) -> int:
        """The newest committed version, the current map's (0 while no map exists)."""
        return max(self._maps, default=0)

    @property
    def current(self) -> ExpertMap | None:
        return self._maps.get(self.current_version)

    def versions(self) -> list[int]:
        return sorted(self._maps)

    def get(self, version: int) -> ExpertMap:
        """version 0 = current. Raises Unavailable before the first map, NotFound for unknown versions."""
        if not self._maps:
            raise Unavailable("no expert map yet: waiting for all expert workers to register")
        if version == 0:
            return self._maps[self.current_version]
        if version not in self._maps:
            raise NotFound(f"map version {version} does not exist; versions: {self.versions()}")
        return self._maps[version]

    def next(self, phy2log: torch.Tensor, num_logical: int, slot_owners: tuple[str, ...]) -> ExpertMap:
        """The map that ``append`` would accept as the next version (validated, not stored)."""
        return ExpertMap(phy2log, num_logical, self.last_reserved + 1, slot_owners)

    def append(self, expert_map: ExpertMap) -> None:
        assert expert_map.version > self.current_version, (
            f"version {expert_map.version} does not follow {self.current_version}")
        current = self.current
        if current is not None:
            assert expert_map.num_layers == current.num_layers, "layer count cannot change between versions"
            assert expert_map.num_logical_experts == current.num_logical_experts
        self._maps[expert_map.version] = expert_map
        self._last_reserved = max(self._last_reserved, expert_map.version)


class LoadStats:
    def __init__(self) -> None:
        self._physical: dict[int, torch.Tensor] = {}  # version -> [L, P] int64
        self._logical: torch.Tensor | None = None  # [L, E] int64, over all versions
        self.num_reports = 0
        self.num_passes = 0
        self._window: torch.Tensor | None = None  # [L, E] int64, since the last reset_window
        self._window_passes: dict[str, int] = {}  # attention worker -> passes since the last reset

    def add(self, expert_map: ExpertMap, num_layers: int, num_physical_slots: int,
            slot_token_counts: list[int], num_passes: int, worker_id: str = "") -> None:
        """One ReportLoad window measured under ``expert_map`` by ``worker_id``. Raises
        InvalidArgument naming the field."""
        if num_layers != expert_map.num_layers:
            raise InvalidArgument(f"num_layers {num_layers} != {expert_map.num_layers} MoE layers of map "
                                  f"version {expert_map.version}")
        if num_physical_slots != expert_map.num_physical_slots:
            raise InvalidArgument(f"num_physical_slots {num_physical_slots} != {expert_map.num_physical_slots} "
                                  f"slots of map version {expert_map.version}")
        expected = num_layers * num_physical_slots
        if len(slot_token_counts) != expected:
            raise InvalidArgument(f"slot_token_counts has {len(slot_token_counts)} entries, expected "
                                  f"num_layers * num_physical_slots = {num_layers} * {num_physical_slots} = {expected}")
        if num_passes < 0:
            raise InvalidArgument(f"num_passes must be >= 0, got {num_passes}")
        counts = torch.tensor(slot_token_counts, dtype=torch.int64).reshape(num_layers, num_physical_slots)  # [L, P]
        if (counts < 0).any():
            raise InvalidArgument("slot_token_counts has negative entries")
        version = expert_map.version
        self._physical[version] = self._physical.get(version, torch.zeros_like(counts)) + counts
        if self._logical is None:
            self._logical = torch.zeros(num_layers, expert_map.num_logical_experts, dtype=torch.int64)
        valid = expert_map.phy2log >= 0  # [L, P]
        layer_index = torch.arange(num_layers).unsqueeze(1).expand_as(counts)
        logical = torch.zeros_like(self._logical)  # [L, E]
        logical.index_put_((layer_index[valid], expert_map.phy2log[valid]), counts[valid], accumulate=True)
        self._logical += logical
        self._window = logical if self._window is None else self._window + logical
        self._window_passes[worker_id] = self._window_passes.get(worker_id, 0) + num_passes
        self.num_reports += 1
        self.num_passes += num_passes

    def window(self) -> tuple[torch.Tensor | None, int]:
        """(tokens per logical expert [L, E] since the last ``reset_window`` or None, forward
        passes in it: the most any one reporting worker ran)."""
        return self._window, max(self._window_passes.values(), default=0)

    def reset_window(self) -> None:
        self._window = None
        self._window_passes = {}

    def physical(self, version: int) -> torch.Tensor | None:
        """[L, P] tokens per slot reported under ``version``, or None if nothing was reported."""
        return self._physical.get(version)

    def logical(self) -> torch.Tensor | None:
        """[L, E] tokens per logical expert over every version, or None if nothing was reported."""
        return self._logical


def balancedness(expert_map: ExpertMap, slot_load: torch.Tensor | None) -> float:
    """Mean over layers of (mean / max) tokens per expert worker; 1.0 = perfectly even.

    slot_load: [L, P] or None. Layers without load count as balanced; no load at all → 1.0.
    """
    if slot_load is None:
        return 1.0
    num_workers = max(expert_map.num_workers, 1)
    per_worker = slot_load.reshape(expert_map.num_layers, num_workers, -1).sum(dim=2).double()  # [L, W]
    peak = per_worker.max(dim=1).values  # [L]
    ratio = torch.where(peak > 0, per_worker.mean(dim=1) / peak.clamp(min=1), torch.ones_like(peak))
    return float(ratio.mean())


@dataclass(frozen=True)
class PlacementUpdate:
    """What a WatchPlacement subscriber receives."""
    phase: UpdatePhase
    expert_map: ExpertMap
    data_plane: DataPlaneInfo
