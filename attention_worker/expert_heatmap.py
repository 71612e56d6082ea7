"""Per-layer × expert-worker heatmap every N engine passes (``EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL``).

Legend: L MoE layers, P physical slots, W expert workers.

Flow: after each pass the engine thread hands the recorder's pass counts ``[L, P]`` and the map
the pass used to ``HeatmapCollector.add_pass``, which folds them onto workers (slot p belongs
to ``slot_owners[p // (P / W)]``) and adds them to the interval's ``[L, W]`` — O(L·P) per pass,
no I/O. Every N passes (or earlier, when the expert workers of the map change) it closes the
interval and hands a ``HeatmapInterval`` to ``HeatmapWriter``, whose own thread logs a one-line
summary and appends the matrix as one JSON line to ``<dir>/expert_heatmap_<worker id>.jsonl``.
A write error is logged and the next interval tried again: the heatmap never stops serving.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from epserve.expert_map import ExpertMap
from epserve.process import start_daemon_thread

logger = logging.getLogger(__name__)


def fold_to_workers(counts: torch.Tensor, num_workers: int) -> torch.Tensor:
    """counts [L, P] per slot → [L, W] per expert worker (slots split evenly, in worker order)."""
    num_layers, num_slots = counts.shape
    assert num_workers > 0 and num_slots % num_workers == 0, (num_slots, num_workers)
    return counts.view(num_layers, num_workers, num_slots // num_workers).sum(-1)


def layer_balancedness(heat: torch.Tensor) -> torch.Tensor:
    """heat [L, W] → [L] mean / max per layer (1 = even, 1/W = all on one worker; 1 for an idle layer)."""
    heat = heat.to(torch.float64)
    peak = heat.max(dim=1).values
    return torch.where(peak > 0, heat.mean(dim=1) / peak.clamp(min=1e-12), torch.ones_like(peak))


@dataclass(frozen=True)
class HeatmapInterval:
    """Token-expert choices per MoE layer and expert worker over passes [first_pass, last_pass]."""
    worker_id: str
    first_pass: int
    last_pass: int
    map_versions: tuple[int, ...]           # versions the interval's passes used, ascending
    expert_workers: tuple[str, ...]         # [W] column labels
    tokens: torch.Tensor                    # [L, W] int64

    @property
    def num_passes(self) -> int:
        return self.last_pass - self.first_pass + 1

    def to_json(self) -> dict:
        balance = layer_balancedness(self.tokens)
        return {"worker_id": self.worker_id, "time_unix_s": round(time.time(), 3), "first_pass": self.first_pass,
                "last_pass": self.last_pass, "num_passes": self.num_passes, "map_version": self.map_versions[-1],
                "map_versions": list(self.map_versions), "expert_workers": list(self.expert_workers),
                "tokens": self.tokens.tolist(), "layer_balancedness": [round(b, 4) for b in balance.tolist()]}

    def summary(self) -> str:
        """One log line: per-layer balancedness min (which layer) / mean, the hottest worker's share."""
        balance = layer_balancedness(self.tokens)
        per_worker = self.tokens.sum(0)
        total = int(per_worker.sum())
        hottest = int(per_worker.argmax())
        worst = int(balance.argmin())
        share = float(per_worker[hottest]) / total if total else 0.0
        return (f"expert heatmap passes {self.first_pass}-{self.last_pass} (map v{self.map_versions[-1]}): "
                f"layer balancedness min {float(balance[worst]):.3f} (MoE layer {worst}) mean "
                f"{float(balance.mean()):.3f}; hottest {self.expert_workers[hottest]} {share:.0%} of {total} choices")


class HeatmapCollector:
    """Engine-thread side: accumulates ``[L, W]`` over ``interval`` passes; ``emit`` gets each interval."""

    def __init__(self, worker_id: str, interval: int, emit: Callable[[HeatmapInterval], None]) -> None:
        assert interval > 0, interval
        self.worker_id, self.interval, self._emit = worker_id, interval, emit
        self.num_passes = 0                 # passes seen since start
        self._tokens: torch.Tensor | None = None
        self._owners: tuple[str, ...] = ()
        self._versions: list[int] = []
        self._first_pass = 0

    def add_pass(self, counts: torch.Tensor, expert_map: ExpertMap) -> None:
        """counts [L, P] of one pass routed with ``expert_map``."""
        owners = expert_map.slot_owners
        if self._tokens is not None and owners != self._owners:
            self._close()                   # columns would change meaning: close early
        if not owners:
            self.num_passes += 1
            return
        heat = fold_to_workers(counts, len(owners))
        if self._tokens is None:
            self._tokens, self._owners, self._versions, self._first_pass = heat, owners, [], self.num_passes
        else:
            self._tokens += heat
        if not self._versions or self._versions[-1] != expert_map.version:
            self._versions.append(expert_map.version)
        self.num_passes += 1
        if self.num_passes - self._first_pass >= self.interval:
            self._close()

    def _close(self) -> None:
        self._emit(HeatmapInterval(self.worker_id, self._first_pass, self.num_passes - 1,
                                   tuple(sorted(set(self._versions))), self._owners, self._tokens))
        self._tokens = None


class HeatmapWriter:
    """Logs and appends intervals from its own thread; ``put`` never blocks the engine."""

    def __init__(self, directory: str | Path, worker_id: str) -> None:
        self.directory = Path(directory)
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)
        self.path = self.directory / f"expert_heatmap_{safe_id}.jsonl"
        self._queue: queue.SimpleQueue[HeatmapInterval | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def check_writable(self) -> None:
        """At start-up: make the directory and open the file, or ValueError saying what to change."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a"):
                pass
        except OSError as exc:
            raise ValueError(f"--expert-distribution-dir: cannot write {self.path}: {exc.strerror or exc}; "
                             "choose a writable directory") from None

    def start(self) -> None:
        self._thread = start_daemon_thread(self._run, "expert-heatmap")

    def put(self, interval: HeatmapInterval) -> None:
        self._queue.put(interval)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while (interval := self._queue.get()) is not None:
            self.write(interval)

    def write(self, interval: HeatmapInterval) -> None:
        try:
            with open(self.path, "a") as out:
                out.write(json.dumps(interval.to_json(), separators=(",", ":")) + "\n")
        except OSError as exc:
            logger.error("%s; not written to %s: %s", interval.summary(), self.path, exc)
            return
        logger.info("%s; matrix in %s", interval.summary(), self.path)
