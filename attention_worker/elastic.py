"""Elastic EP on the attention side: redo an interrupted MoE layer (``RemoteExperts``) or step (the cuda_ipc
step path, ``StepExperts.recover``) instead of failing the step.

Threads: placement's watch thread ``publish``es every committed map to the ``MapBoard``; the
engine thread reads it and waits on it inside ``ElasticRecovery.recover``.

When a layer's exchange fails (``PeerLost``: an expert worker died or a link broke;
``DataPlaneTimeout``: no answer in time), ``RemoteExperts`` asks ``recover`` for the map to
redo it with:
1. the peer is reported to placement (ReportSuspicion), which probes it at once and answers
   DEAD, or ALIVE (a slow peer or a broken link);
2. a map newer than the failed one is on the board → adopt it (the rest of the step routes
   with it, and placement is told this worker switched) and redo the layer under it: placement
   publishes a routing-only version around a DEAD worker within milliseconds;
3. the peer is alive (or placement cannot be asked) → form a new link epoch with it
   (``reconnect``: nothing to do when another micro-batch re-formed it already) and redo the
   layer under the same version;
4. otherwise wait for a newer map (experts that had no other replica are being reloaded:
   requests wait, they do not fail), asking placement again now and then,
until ``timeout_s`` has passed; then the original error propagates (the engine exits and the
gateway retries its requests elsewhere). Each redo is a new attempt on the data plane (a new
attempt id and new sequence numbers), so a late answer to the aborted attempt is never taken
for it; the KV cache stays valid (the layer rewrites the same slots).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from epserve.dataplane import PeerLost
from epserve.expert_map import ExpertMap
from epserve.placement_types import WorkerState

logger = logging.getLogger(__name__)

REASK_S = 1.0                   # while waiting for a map, ask placement about the peer again this often
Report = Callable[[int, str, int], WorkerState | None]   # (peer rank, reason, map version) → verdict or None


class MapBoard:
    """The newest committed expert map this worker heard of."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._map: ExpertMap | None = None

    def publish(self, expert_map: ExpertMap) -> None:
        with self._cond:
            if self._map is None or expert_map.version > self._map.version:
                self._map = expert_map
                self._cond.notify_all()

    def latest(self) -> ExpertMap | None:
        with self._cond:
            return self._map

    def wait_newer(self, version: int, timeout_s: float) -> ExpertMap | None:
        """A map newer than ``version`` within ``timeout_s``, else None."""
        with self._cond:
            self._cond.wait_for(lambda: self._map is not None and self._map.version > version, timeout_s)
            return self._map if self._map is not None and self._map.version > version else None


class ElasticRecovery:
    """``report``: asks placement about a peer (None when placement cannot be reached);
    ``reconnect(peer_rank)``: a new link epoch with it (raises PeerLost), None when the data
    plane cannot form links again; ``on_adopt(map)``: the worker switched to ``map`` mid-step."""

    def __init__(self, board: MapBoard, report: Report, reconnect: Callable[[int], None] | None,
                 on_adopt: Callable[[ExpertMap], None], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.board, self.report, self.reconnect, self.on_adopt = board, report, reconnect, on_adopt
        self.timeout_s, self._clock = timeout_s, clock
        self._adopted: ExpertMap | None = None
        self.num_recoveries = 0

    def effective(self, expert_map: ExpertMap) -> ExpertMap:
        """The map to route with: ``expert_map`` unless a newer one was adopted mid-step."""
        adopted = self._adopted
        return adopted if adopted is not None and adopted.version > expert_map.version else expert_map

    def recover(self, failed: ExpertMap, error: Exception) -> ExpertMap:
        """The map to redo the failed layer with (see the module docstring); raises ``error``
        when none came within ``timeout_s``."""
        deadline = self._clock() + self.timeout_s
        peer = getattr(error, "peer_rank", None)
        reason = f"{type(error).__name__}: {error}"
        logger.warning("MoE exchange under map version %d failed (%s); recovering", failed.version, reason[:300])
        verdict = self._ask(peer, reason, failed.version)
        asked_at, backoff = self._clock(), 0.02
        while True:
            newest = self.board.latest()
            if newest is not None and newest.version > failed.version:
                return self._adopt(newest, failed)
            if verdict is not WorkerState.DEAD and peer is not None and self.reconnect is not None:
                try:
                    self.reconnect(peer)
                    self.num_recoveries += 1
                    logger.info("redoing the failed exchange under map version %d: rank %d is alive, its link "
                                "formed anew", failed.version, peer)
                    return failed
                except PeerLost as exc:
                    reason = f"PeerLost: {exc}"
                    verdict, asked_at = self._ask(peer, reason, failed.version), self._clock()
                    continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise error
            if self.board.wait_newer(failed.version, min(remaining, backoff)) is None and \
                    self._clock() - asked_at >= REASK_S:
                verdict, asked_at = self._ask(peer, reason, failed.version), self._clock()
            backoff = min(backoff * 2, REASK_S)

    def _ask(self, peer: int | None, reason: str, version: int) -> WorkerState | None:
        return None if peer is None else self.report(peer, reason, version)

    def _adopt(self, newest: ExpertMap, failed: ExpertMap) -> ExpertMap:
        self.num_recoveries += 1
        if self._adopted is None or newest.version > self._adopted.version:
            self._adopted = newest
            self.on_adopt(newest)
        logger.info("redoing the failed exchange under map version %d (was %d)", newest.version, failed.version)
        return newest
