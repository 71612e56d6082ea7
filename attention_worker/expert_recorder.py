"""Expert-load recording on the attention side (``--expert-distribution-recorder-mode``).

Legend: L MoE layers, P physical slots, T tokens, K top-k.

- ``stat``: a per-window ``[L, P]`` count of tokens routed to each physical slot; the window is
  closed and reported to placement (``ReportLoad``) every ``--load-report-interval-s``.
- ``per_pass``: ``stat`` plus, kept in memory until dumped, one ``[L, P]`` count per pass.
- ``per_token``: ``stat`` plus the physical slot ids ``[T, K]`` of every token of every layer.

With ``track_passes`` (``--enable-expert-distribution-metrics`` or the heatmap is on),
``end_pass`` also returns the pass's per-slot counts ``[L, P]``, from which the engine derives
tokens per expert worker (metrics) and the per-layer heatmap.

``record`` runs on the engine thread; ``take_window``/``dump`` may be called from other threads.
A new map version resets the window: counts are per physical slot of one map. Per-pass and
per-token entries carry the map version they were routed with. Slot id -1 (a padding row, or a
choice routed nowhere) is not counted.

On a GPU, ``record`` adds into a device-side ``[L, P]`` count (no host sync, so it runs inside
CUDA graphs); ``end_pass`` — on the engine thread, after the step's tokens reached the host —
folds it into the host counts once per step. Where passes need not be exact (``stat`` without
``track_passes``: ``exact_passes`` false) the fold does not wait: the count's copy to the host is
queued behind the step the engine launched ahead (its overlap schedule) and added to the window at
the next fold (or ``take_window``), by when that step has finished. Where they must be exact, the
engine launches no step ahead, since a step's count would otherwise hold the next step's too.
``per_token`` needs every token's slots on the host, which a graph cannot provide: the GPU engine runs
without CUDA graphs in that mode.
"""

from __future__ import annotations

import enum
import threading
import time
from pathlib import Path

import torch


class RecorderMode(enum.Enum):
    STAT = "stat"
    PER_PASS = "per_pass"
    PER_TOKEN = "per_token"


class ExpertLoadRecorder:
    def __init__(self, mode: RecorderMode, num_layers: int, num_slots: int, track_passes: bool = False,
                 map_version: int = 0) -> None:
        self.mode = mode
        self._track_passes = track_passes
        self._pass_counts: torch.Tensor | None = None   # [L, P] this pass (track_passes only)
        self._lock = threading.Lock()
        self._reset(num_layers, num_slots, map_version)
        self._passes: list[torch.Tensor] = []           # per_pass: [L, P] per pass
        self._pass_versions: list[int] = []
        self._tokens: list[tuple[int, torch.Tensor]] = []   # per_token: (layer, physical [T, K])
        self._token_versions: list[int] = []
        self._current_pass: torch.Tensor | None = None
        self._num_passes_undumped = 0
        self._device_counts: torch.Tensor | None = None   # [L, P + 1] on the GPU (column P: the -1s)
        self._in_transit: tuple[torch.Tensor, torch.cuda.Event] | None = None   # [L, P] pinned, its copy's event

    @property
    def exact_passes(self) -> bool:
        """Whether each pass's counts must be that pass's alone (per-pass records or metrics, per-token)."""
        return self._track_passes or self.mode is not RecorderMode.STAT

    def _reset(self, num_layers: int, num_slots: int, map_version: int = 0) -> None:
        self.window = torch.zeros(num_layers, num_slots, dtype=torch.int64)
        self.num_passes = 0
        self.map_version = map_version

    def record(self, moe_layer: int, physical: torch.Tensor) -> None:
        """physical [T, K] slot ids chosen for one MoE layer of one micro-batch (-1: not counted)."""
        if physical.device.type != "cpu" and self.mode is not RecorderMode.PER_TOKEN:
            self._record_on_device(moe_layer, physical)
            return
        flat = physical.flatten().cpu()
        counts = torch.bincount(flat[flat >= 0], minlength=self.window.shape[1])
        self._add(moe_layer, counts, physical)

    def _record_on_device(self, moe_layer: int, physical: torch.Tensor) -> None:
        num_layers, num_slots = self.window.shape
        if self._device_counts is None or self._device_counts.device != physical.device \
                or self._device_counts.shape[1] != num_slots + 1:
            self._device_counts = torch.zeros(num_layers, num_slots + 1, dtype=torch.int64, device=physical.device)
        flat = physical.flatten().long()
        # column P collects the -1s; one scatter, no host sync
        self._device_counts[moe_layer].index_add_(0, torch.where(flat >= 0, flat, num_slots),
                                                  torch.ones_like(flat))

    def _fold_device_counts(self) -> None:
        """Engine thread, between steps: the device counts join the host ones, then restart at 0 (without
        waiting for the device unless ``exact_passes``)."""
        if self._device_counts is None:
            return
        self._fold_in_transit()
        counts = self._device_counts[:, :-1]                                         # [L, P]
        if self.exact_passes or not counts.is_cuda:
            with self._lock:
                self._add_layers(counts.cpu())
        else:
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            with self._lock:
                self._in_transit = (host, event)
        self._device_counts.zero_()

    def _fold_in_transit(self) -> None:
        """Any thread: the count copied at the last fold joins the window it was counted in (waiting for
        its copy: by then at most the step launched ahead of that fold)."""
        with self._lock:
            if self._in_transit is not None:
                (host, event), self._in_transit = self._in_transit, None
                event.synchronize()
                self._add_layers(host)

    def _add_layers(self, counts: torch.Tensor) -> None:
        """counts [L, P]; the caller holds the lock."""
        for layer in counts.nonzero()[:, 0].unique().tolist():
            self._add_locked(layer, counts[layer], None)

    def discard_device_counts(self) -> None:
        """Forget what was recorded on the device and not folded yet (warm-up passes)."""
        self._in_transit = None
        if self._device_counts is not None:
            self._device_counts.zero_()

    def _add(self, moe_layer: int, counts: torch.Tensor, physical: torch.Tensor | None) -> None:
        with self._lock:
            self._add_locked(moe_layer, counts, physical)

    def _add_locked(self, moe_layer: int, counts: torch.Tensor, physical: torch.Tensor | None) -> None:
        self.window[moe_layer] += counts
        if self._track_passes:
            if self._pass_counts is None or self._pass_counts.shape[1] != counts.shape[0]:
                self._pass_counts = torch.zeros(self.window.shape[0], counts.shape[0], dtype=torch.int64)
            self._pass_counts[moe_layer] += counts
        if self.mode is RecorderMode.PER_PASS:
            if self._current_pass is None:
                self._current_pass = torch.zeros_like(self.window)
            self._current_pass[moe_layer] += counts
        elif self.mode is RecorderMode.PER_TOKEN and physical is not None:
            self._tokens.append((moe_layer, physical.cpu().clone()))
            self._token_versions.append(self.map_version)

    def switch_map(self, map_version: int, num_slots: int) -> None:
        """The engine switched maps at a step boundary: counts of another map (or another slot
        count) never share a window."""
        self._fold_in_transit()                 # the last steps under the old map (the engine drained them)
        with self._lock:
            if map_version != self.map_version or num_slots != self.window.shape[1]:
                self._reset(self.window.shape[0], num_slots, map_version)
                self._pass_counts = None

    def end_pass(self, map_version: int, num_slots: int) -> torch.Tensor | None:
        """Called once per engine step with the map the step used; a new version starts a new window.
        Returns the pass's per-slot counts [L, P] with ``track_passes`` (None otherwise or if nothing
        was recorded)."""
        self._fold_device_counts()
        with self._lock:
            pass_counts, self._pass_counts = self._pass_counts, None
            if self._current_pass is not None:
                self._passes.append(self._current_pass)
                self._pass_versions.append(map_version)
                self._current_pass = None
            self._num_passes_undumped += 1
            if map_version != self.map_version or num_slots != self.window.shape[1]:
                self._reset(self.window.shape[0], num_slots, map_version)
            else:
                self.num_passes += 1
        return pass_counts

    def take_window(self) -> tuple[torch.Tensor, int, int]:
        """(counts [L, P], passes, map version) of the window; starts a new window."""
        self._fold_in_transit()
        with self._lock:
            window, passes, version = self.window, self.num_passes, self.map_version
            self._reset(*window.shape, version)
        return window, passes, version

    def dump(self, path: str | Path, extra: dict | None = None) -> dict:
        """Write what per_pass / per_token recorded since the last dump (and the open window) to
        ``path`` with ``torch.save``; entries are dropped only once the file is written, so a failed
        write (OSError) loses nothing. Returns the record written (``extra`` merged in); its keys
        are listed in docs/observability.md."""
        with self._lock:
            passes, pass_versions = list(self._passes), list(self._pass_versions)
            tokens, token_versions = list(self._tokens), list(self._token_versions)
            num_passes = self._num_passes_undumped
            record = {"mode": self.mode.value, "time_unix_s": time.time(), "num_passes": num_passes,
                      "num_token_records": len(tokens), "window": self.window.clone(),
                      "window_num_passes": self.num_passes, "window_map_version": self.map_version,
                      "per_pass": passes, "per_pass_map_version": pass_versions,
                      "per_token": tokens, "per_token_map_version": token_versions, **(extra or {})}
        with open(Path(path), "wb") as out:          # OSError (not torch's RuntimeError) when unwritable
            torch.save(record, out)
        with self._lock:
            del self._passes[:len(passes)], self._pass_versions[:len(passes)]
            del self._tokens[:len(tokens)], self._token_versions[:len(tokens)]
            self._num_passes_undumped -= num_passes
        return record
