"""Expert-load recording on the attention side (``--expert-distribution-recorder-mode``).

Legend: L MoE layers, P physical slots, T tokens, K top-k.

- ``stat``: a per-window ``[L, P]`` count of tokens routed to each physical slot; the window is
  closed and reported to placement (``ReportLoad``) every ``report_every_passes`` forward
  passes.
- ``per_pass``: ``stat`` plus, kept in memory until dumped, one ``[L, P]`` count per pass.
- ``per_token``: ``stat`` plus the physical slot ids ``[T, K]`` of every token of every layer.

With ``track_passes`` (the worker's metrics are on), ``end_pass`` also returns the pass's
per-slot counts ``[P]``, from which the engine derives tokens per expert worker.

``record`` runs on the engine thread; ``take_window``/``dump`` may be called from other threads.
A new map version resets the window: counts are per physical slot of one map.
"""

from __future__ import annotations

import enum
import threading
from pathlib import Path

import torch


class RecorderMode(enum.Enum):
    STAT = "stat"
    PER_PASS = "per_pass"
    PER_TOKEN = "per_token"


class ExpertLoadRecorder:
    def __init__(self, mode: RecorderMode, num_layers: int, num_slots: int, track_passes: bool = False) -> None:
        self.mode = mode
        self._track_passes = track_passes
        self._pass_slots: torch.Tensor | None = None    # [P] this pass, all layers (track_passes only)
        self._lock = threading.Lock()
        self._reset(num_layers, num_slots)
        self._passes: list[torch.Tensor] = []
        self._tokens: list[tuple[int, torch.Tensor]] = []
        self._current_pass: torch.Tensor | None = None

    def _reset(self, num_layers: int, num_slots: int, map_version: int = 0) -> None:
        self.window = torch.zeros(num_layers, num_slots, dtype=torch.int64)
        self.num_passes = 0
        self.map_version = map_version

    def record(self, moe_layer: int, physical: torch.Tensor) -> None:
        """physical [T, K] slot ids chosen for one MoE layer of one micro-batch."""
        counts = torch.bincount(physical.flatten().cpu(), minlength=self.window.shape[1])
        with self._lock:
            self.window[moe_layer] += counts
            if self._track_passes:
                if self._pass_slots is None or self._pass_slots.shape != counts.shape:
                    self._pass_slots = counts.clone()
                else:
                    self._pass_slots += counts
            if self.mode is RecorderMode.PER_PASS:
                if self._current_pass is None:
                    self._current_pass = torch.zeros_like(self.window)
                self._current_pass[moe_layer] += counts
            elif self.mode is RecorderMode.PER_TOKEN:
                self._tokens.append((moe_layer, physical.cpu().clone()))

    def switch_map(self, map_version: int, num_slots: int) -> None:
        """The engine switched maps at a step boundary: counts of another map (or another slot
        count) never share a window."""
        with self._lock:
            if map_version != self.map_version or num_slots != self.window.shape[1]:
                self._reset(self.window.shape[0], num_slots, map_version)
                self._pass_slots = None

    def end_pass(self, map_version: int, num_slots: int) -> torch.Tensor | None:
        """Called once per engine step with the map the step used; a new version starts a new window.
        Returns the pass's per-slot counts [P] with ``track_passes`` (None otherwise or if nothing was
        recorded)."""
        with self._lock:
            pass_slots, self._pass_slots = self._pass_slots, None
            if self._current_pass is not None:
                self._passes.append(self._current_pass)
                self._current_pass = None
            if map_version != self.map_version or num_slots != self.window.shape[1]:
                self._reset(self.window.shape[0], num_slots, map_version)
            else:
                self.num_passes += 1
        return pass_slots

    def take_window(self) -> tuple[torch.Tensor, int, int]:
        """(counts [L, P], passes, map version) of the window; starts a new window."""
        with self._lock:
            window, passes, version = self.window, self.num_passes, self.map_version
            self._reset(*window.shape, version)
        return window, passes, version

    def dump(self, path: str | Path) -> Path:
        """Write what per_pass / per_token recorded (and the open window) to a .pt file."""
        with self._lock:
            record = {"mode": self.mode.value, "window": self.window.clone(), "num_passes": self.num_passes,
                      "per_pass": list(self._passes), "per_token": list(self._tokens)}
            self._passes, self._tokens = [], []
        path = Path(path)
        torch.save(record, path)
        return path
