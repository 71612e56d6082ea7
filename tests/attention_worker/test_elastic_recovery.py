"""The attention side of elastic EP without processes: ``RemoteExperts`` with ``ElasticRecovery``
over a fake data plane whose expert workers can die. Real processes: tests/e2e/test_elastic_ep.py.

Map: 4 experts + 2 redundant over 2 workers (S = 3): worker 0 [0 1 2], worker 1 [3 0 1]; the
attention rank routes ``static`` with replica 1, so experts 0 and 1 go to worker 1. The routing-only
version around a dead worker 1 is [0 1 2] [3 -1 -1]: expert 3 keeps its only replica there until
it is reloaded.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epserve.attention_worker.elastic import ElasticRecovery, MapBoard
from epserve.attention_worker.expert_routing import DispatchAlgorithm, ExpertRouter
from epserve.attention_worker.moe_executor import RemoteExperts
from epserve.dataplane import DataPlaneTimeout, PeerLost, PendingCombine, split_by_worker
from epserve.expert_map import ExpertMap
from epserve.models.decoder import MoECall
from epserve.placement_types import WorkerState

OWNERS = ("expert-0", "expert-1")
V1 = ExpertMap(torch.tensor([[0, 1, 2, 3, 0, 1]]), 4, 1, OWNERS)
ROUTED = ExpertMap(torch.tensor([[0, 1, 2, 3, -1, -1]]), 4, 2, OWNERS)    # routing only: worker 1 keeps expert 3
RANK_OF = {0: 2, 1: 3}                                                     # worker index → data-plane rank


class FakeDataPlane:
    """Experts compute ``hidden * (slot + 1)`` summed with the weights; dead workers fail."""

    def __init__(self) -> None:
        self.dead: set[int] = set()
        self.headers = []
        self.reconnected: list[int] = []

    def dispatch(self, header, hidden, slot_ids, weights, slots_per_worker) -> PendingCombine:
        self.headers.append(header)
        pending = PendingCombine(header, hidden.shape[1], hidden.dtype, hidden.device)
        pending.shares = [s for s in split_by_worker(slot_ids, weights, slots_per_worker, 2) if s.num_tokens]
        pending.inputs = (hidden, slot_ids, weights)
        return pending

    def combine(self, pending: PendingCombine, timeout_s: float) -> torch.Tensor:
        for share in pending.shares:
            if share.worker in self.dead:
                raise PeerLost(f"worker {share.worker} is gone", peer_rank=RANK_OF[share.worker])
        hidden, slot_ids, weights = pending.inputs
        return (hidden.unsqueeze(1) * (slot_ids.unsqueeze(2) + 1) * weights.unsqueeze(2)).sum(1)

    def reconnect(self, peer_rank: int) -> None:
        worker = {rank: w for w, rank in RANK_OF.items()}[peer_rank]
        if worker in self.dead:
            raise PeerLost("no answer", peer_rank=peer_rank)
        self.reconnected.append(peer_rank)

    def close(self) -> None:
        pass


def call(experts: list[int]) -> MoECall:
    topk = torch.tensor([[e, experts[(i + 1) % len(experts)]] for i, e in enumerate(experts)])
    return MoECall(0, torch.arange(len(experts) * 4, dtype=torch.float64).reshape(len(experts), 4), topk,
                   torch.full((len(experts), 2), 0.5, dtype=torch.float64))


class Harness:
    def __init__(self, verdict: WorkerState | None, publish_on_report: ExpertMap | None, timeout_s: float = 2.0,
                 rank: int = 1):
        self.plane = FakeDataPlane()
        self.board = MapBoard()
        self.board.publish(V1)
        self.reports, self.adopted, self.recorded = [], [], []
        self.verdict, self.publish_on_report = verdict, publish_on_report
        self.recovery = ElasticRecovery(self.board, self.report, self.plane.reconnect, self.adopted.append, timeout_s)
        self.experts = RemoteExperts(self.plane, ExpertRouter(DispatchAlgorithm.STATIC, rank), timeout_s=1.0,
                                     record_load=lambda layer, slots: self.recorded.append(slots),
                                     recovery=self.recovery)

    def report(self, peer: int, reason: str, version: int) -> WorkerState | None:
        self.reports.append((peer, version))
        if self.publish_on_report is not None:          # placement commits the routing-only version
            self.board.publish(self.publish_on_report)
        return self.verdict

    def run(self, moe_call: MoECall, expert_map: ExpertMap = V1) -> torch.Tensor:
        return self.experts.combine(self.experts.dispatch(moe_call, expert_map, 0))


def reference(moe_call: MoECall, expert_map: ExpertMap, rank: int = 1) -> torch.Tensor:
    experts = RemoteExperts(FakeDataPlane(), ExpertRouter(DispatchAlgorithm.STATIC, rank), timeout_s=1.0)
    return experts.combine(experts.dispatch(moe_call, expert_map, 0))


def test_a_dead_worker_is_routed_around_under_the_new_version() -> None:
    h = Harness(WorkerState.DEAD, publish_on_report=ROUTED)
    h.plane.dead.add(1)
    moe_call = call([0, 1, 2])     # static rank 1 takes replica 1: experts 0 and 1 on worker 1 under version 1
    out = h.run(moe_call)
    assert h.reports == [(3, 1)] and h.adopted == [ROUTED]
    assert [hd.map_version for hd in h.plane.headers] == [1, 2]
    assert [hd.attempt for hd in h.plane.headers] == [1, 2]        # a new attempt id for the redo
    assert torch.equal(out, reference(moe_call, ROUTED))
    assert len(h.recorded) == 1                  # the redo is not counted twice
    # the rest of the step (the engine still passes version 1) routes with the adopted version
    h.run(call([0, 1]))
    assert h.plane.headers[-1].map_version == 2 and len(h.recorded) == 1


def test_a_live_peer_gets_a_new_link_and_the_same_version() -> None:
    h = Harness(WorkerState.ALIVE, publish_on_report=None)
    original = h.plane.combine
    failures = iter([DataPlaneTimeout("slow", peer_rank=3)])

    def flaky(pending, timeout_s):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return original(pending, timeout_s)

    h.plane.combine = flaky
    out = h.run(call([0, 1, 2]))
    assert h.plane.reconnected == [3] and h.adopted == [] and h.reports == [(3, 1)]
    assert [hd.map_version for hd in h.plane.headers] == [1, 1]
    assert torch.equal(out, reference(call([0, 1, 2]), V1))


def test_requests_wait_for_a_usable_map_then_go_on() -> None:
    """The routing-only version keeps expert 3 on the dead worker (its only replica): the redo
    fails again and waits until placement commits a map that serves it (here: the worker came
    back, as a restarted process holding it again)."""
    h = Harness(WorkerState.DEAD, publish_on_report=ROUTED, timeout_s=5.0)
    h.plane.dead.add(1)
    moe_call = call([3, 2])
    back = ExpertMap(V1.phy2log, 4, 3, OWNERS)

    def restart() -> None:
        h.plane.dead.clear()
        h.board.publish(back)

    started = time.monotonic()
    threading.Timer(0.3, restart).start()
    out = h.run(moe_call)
    assert 0.25 < time.monotonic() - started < 3.0
    assert [hd.map_version for hd in h.plane.headers] == [1, 2, 3] and h.adopted == [ROUTED, back]
    assert torch.equal(out, reference(moe_call, back))


def test_no_usable_map_in_time_raises_the_original_error() -> None:
    h = Harness(WorkerState.DEAD, publish_on_report=None, timeout_s=0.3)
    h.plane.dead.add(1)
    started = time.monotonic()
    with pytest.raises(PeerLost):
        h.run(call([0, 1]))
    assert time.monotonic() - started < 2.0 and len(h.reports) >= 1


def test_without_recovery_errors_propagate_as_before() -> None:
    plane = FakeDataPlane()
    plane.dead.add(1)
    experts = RemoteExperts(plane, ExpertRouter(DispatchAlgorithm.STATIC, 1), timeout_s=1.0)
    with pytest.raises(PeerLost):
        experts.combine(experts.dispatch(call([0, 1]), V1, 0))


def test_map_board_waits_for_newer_versions() -> None:
    board = MapBoard()
    assert board.wait_newer(0, 0.01) is None
    board.publish(V1)
    assert board.wait_newer(0, 0.01) is V1 and board.wait_newer(1, 0.01) is None
    board.publish(ExpertMap(V1.phy2log, 4, 0, OWNERS))            # older: ignored
    assert board.latest() is V1
    threading.Timer(0.05, lambda: board.publish(ROUTED)).start()
    assert board.wait_newer(1, 2.0) is ROUTED
