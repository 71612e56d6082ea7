"""Elastic EP in placement: the map functions, the failover decisions, and the protocol run on
fake workers (``test_rebalance_fakes``), with a probe the test controls. Real processes:
tests/e2e/test_elastic_ep.py.

Map used throughout: 8 experts + 4 redundant over 4 expert workers (S = 3), trivial layout —
slot p holds expert p % 8: worker 0 [0 1 2], worker 1 [3 4 5], worker 2 [6 7 0], worker 3
[1 2 3]. Experts 0-3 have two replicas, 4-7 one; losing worker 3 leaves every expert a live
replica, losing worker 1 leaves experts 4 and 5 with none.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epserve import elastic_map
from epserve.expert_map import ExpertMap
from epserve.placement_types import UpdatePhase, WorkerInfo, WorkerRole, WorkerState
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.failover import CannotPlan, Failover, plan_change, probe_address
from test_rebalance_fakes import FakeCluster, FakeWorker, make_service

E, W = 8, 4
OWNERS = tuple(f"expert-{i}" for i in range(W))


def trivial(num_layers: int = 3) -> torch.Tensor:
    return (torch.arange(E + 4) % E).repeat(num_layers, 1)


def live_except(*dead: int) -> torch.Tensor:
    return torch.tensor([w not in dead for w in range(W)])


def covered(phy2log: torch.Tensor, live: torch.Tensor) -> bool:
    return not bool(elastic_map.uncovered(phy2log, live, E).any())


# -- elastic_map ------------------------------------------------------------------------------

def test_uncovered_names_experts_without_a_live_replica() -> None:
    phy2log = trivial()
    assert not elastic_map.uncovered(phy2log, live_except(3), E).any()
    lost = elastic_map.uncovered(phy2log, live_except(1), E)
    assert lost.shape == (3, E) and [int(e) for e in lost[0].nonzero().flatten()] == [4, 5]


def test_routing_only_empties_lost_slots_where_a_live_replica_remains() -> None:
    routed = elastic_map.routing_only(trivial(), live_except(3), E)
    assert (routed[:, 9:] == -1).all() and torch.equal(routed[:, :9], trivial()[:, :9])
    ExpertMap(routed, E, 2, OWNERS)                                         # still a valid map
    partly = elastic_map.routing_only(trivial(), live_except(1), E)
    assert partly[0, 3:6].tolist() == [-1, 4, 5]     # expert 3 lives on worker 3; 4 and 5 stay (nowhere else)
    assert torch.equal(elastic_map.routing_only(partly, live_except(1), E), partly)


def test_reload_puts_orphans_on_survivors_and_empties_lost_slots() -> None:
    live = live_except(1)
    weight = torch.ones(3, E, dtype=torch.float64)
    weight[:, 0] = 10.0                                        # expert 0 is hot: keep both its replicas
    reloaded = elastic_map.reload_uncovered(elastic_map.routing_only(trivial(), live, E), live, E, weight)
    assert covered(reloaded, live) and (reloaded[:, 3:6] == -1).all()
    before, after = trivial(), reloaded
    changed = (before != after) & elastic_map.live_slots(E + 4, live)
    assert int(changed.sum()) == 3 * 2                                       # two slots per layer, no more
    assert (after[:, [0, 8]] == 0).all()                                     # the hot expert's replicas stay
    ExpertMap(reloaded, E, 3, OWNERS)


def test_reload_takes_empty_live_slots_first_and_refuses_too_few_slots() -> None:
    phy2log = trivial(1)
    phy2log[0, 9:] = -1                          # worker 3 drained: its slots are free...
    live = live_except(1)                        # ...and worker 1 dies: 4 and 5 go to worker 3's empty slots
    reloaded = elastic_map.reload_uncovered(phy2log, live, E)
    assert sorted(reloaded[0, 9:].tolist())[1:] == [4, 5] and torch.equal(reloaded[0, :3], phy2log[0, :3])
    with pytest.raises(ValueError, match="fewer than the 8 logical experts"):
        elastic_map.reload_uncovered(trivial(), torch.tensor([True, False, True, False]), E)


def test_extend_appends_empty_slots() -> None:
    extended = elastic_map.extend(trivial(), W, 1)
    assert extended.shape == (3, 15) and (extended[:, 12:] == -1).all()
    ExpertMap(extended, E, 2, OWNERS + ("expert-4",))


# -- plan_change ------------------------------------------------------------------------------

def workers(states: dict[str, WorkerState]) -> list[WorkerInfo]:
    return [WorkerInfo(worker_id, WorkerRole.EXPERT, "127.0.0.1:1", 2 + i, state)
            for i, (worker_id, state) in enumerate(states.items())]


def no_rebalance(current: ExpertMap) -> torch.Tensor:
    raise AssertionError("not expected to rebalance")


def test_plan_change_order_failover_reload_scale_out_rebalance() -> None:
    alive = {owner: WorkerState.ALIVE for owner in OWNERS}
    current = ExpertMap(trivial(), E, 1, OWNERS)
    assert plan_change(current, workers(alive), False, no_rebalance, None) is None

    dead1 = {**alive, "expert-1": WorkerState.DEAD}
    first = plan_change(current, workers(dead1), False, no_rebalance, None)
    assert first.operation == "failover" and first.target[0, 3:6].tolist() == [-1, 4, 5]
    second = plan_change(ExpertMap(first.target, E, 2, OWNERS), workers(dead1), False, no_rebalance, None)
    assert second.operation == "reload" and covered(second.target, live_except(1))

    rebalanced = torch.full_like(trivial(), 7)
    after_reload = ExpertMap(second.target, E, 3, OWNERS)
    assert plan_change(after_reload, workers(dead1), True, lambda m: second.target, None) is None
    third = plan_change(after_reload, workers(dead1), True, lambda m: rebalanced, None)
    assert third.operation == "elastic_rebalance" and third.target is rebalanced

    back = {**dead1, "expert-1": WorkerState.ALIVE}          # it restarted: holds nothing, gets experts
    assert plan_change(after_reload, workers(back), False, lambda m: rebalanced, None).operation == "elastic_rebalance"

    joined = {**alive, "expert-4": WorkerState.ALIVE}
    grow = plan_change(current, workers(joined), False, no_rebalance, None)
    assert grow.operation == "scale_out" and grow.slot_owners == OWNERS + ("expert-4",)
    assert grow.target.shape == (3, 15)


def test_plan_change_without_enough_live_slots() -> None:
    states = {**{owner: WorkerState.DEAD for owner in OWNERS}, "expert-0": WorkerState.ALIVE}
    current = ExpertMap(trivial(), E, 1, OWNERS)
    routed = plan_change(current, workers(states), False, no_rebalance, None).target
    with pytest.raises(CannotPlan, match="start more expert workers"):
        plan_change(ExpertMap(routed, E, 2, OWNERS), workers(states), False, no_rebalance, None)
    joined = {**states, "expert-4": WorkerState.ALIVE}                 # a new worker makes room first
    assert plan_change(ExpertMap(routed, E, 2, OWNERS), workers(joined), False, no_rebalance,
                       None).operation == "scale_out"


def test_probe_address() -> None:
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert probe_address(address, 0.5)
    assert not probe_address(address, 0.5)
    assert not probe_address("not-an-address", 0.5)


def test_config_elastic_rules(model_dir) -> None:
    config = PlacementConfig(str(model_dir), elastic_ep_backend="placement")
    assert config.elastic and config.eplb_algorithm == "elasticity_aware"
    assert PlacementConfig(str(model_dir), elastic_ep_backend="placement",
                           eplb_algorithm="movement_aware").eplb_algorithm == "movement_aware"
    with pytest.raises(ValueError, match="places nothing on lost workers"):
        PlacementConfig(str(model_dir), elastic_ep_backend="placement", eplb_algorithm="deepseek")
    with pytest.raises(ValueError, match="needs --moe-a2a-backend mooncake"):
        PlacementConfig(str(model_dir), elastic_ep_backend="mooncake")
    with pytest.raises(ValueError, match="unknown"):
        PlacementConfig(str(model_dir), elastic_ep_backend="ray")


# -- the failover on fake workers ---------------------------------------------------------------

class Probe:
    """The test decides which addresses answer."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls: list[str] = []

    def __call__(self, address: str, timeout_s: float) -> bool:
        self.calls.append(address)
        return address not in self.down


@pytest.fixture
def elastic(model_dir):
    svc = make_service(model_dir, ep_size=4, ep_num_redundant_experts=4, elastic_ep_backend="placement",
                       heartbeat_timeout_ms=60_000)
    cluster = FakeCluster(svc.controller, ep_size=4).start()
    probe = Probe()
    failover = Failover(svc.controller, svc.admin, svc.rebalancer, probe=probe)
    yield svc, cluster, failover, probe
    cluster.stop()
    svc.close()


def address_of(svc, worker_id: str) -> str:
    return svc.controller.worker(worker_id).address


def run_until_quiet(failover: Failover, limit: int = 6) -> list[str]:
    """Apply elastic changes until none is left; → the operations that made versions."""
    made = []
    for _ in range(limit):
        before = failover.controller.current_version
        if not failover.step():
            return made
        made.append(failover.controller.version_meta(failover.controller.current_version)[0])
        assert failover.controller.current_version > before
    raise AssertionError(f"still changing after {limit} steps: {made}")


def test_suspicion_probes_and_failover_keeps_every_expert_served(elastic) -> None:
    svc, cluster, failover, probe = elastic
    controller = svc.controller
    assert controller.config.eplb_algorithm == "elasticity_aware"
    # a suspect whose port answers is ALIVE again: the reporter re-forms its link
    assert failover.report_suspicion("attn-0", controller.worker("expert-3").rank, "PeerLost").state == \
        WorkerState.ALIVE
    assert run_until_quiet(failover) == []
    # worker 3 dies: one routing-only version around it, then a rebalance over the 3 survivors
    probe.down.add(address_of(svc, "expert-3"))
    verdict = failover.report_suspicion("attn-1", controller.worker("expert-3").rank, "PeerLost: closed")
    assert verdict.state == WorkerState.DEAD
    assert run_until_quiet(failover) == ["failover", "elastic_rebalance"]
    versions = controller.get_placement(0)[2]
    failed_over = controller.get_placement(versions[1])[0]
    assert (failed_over.phy2log[:, 9:] == -1).all()
    assert torch.equal(failed_over.phy2log[:, :9], trivial()[:, :9])          # routing only: nothing loaded
    final = controller.current_map()
    assert (final.phy2log[:, 9:] == -1).all() and covered(final.phy2log, live_except(3))
    assert cluster.violations == []
    # every fake switched and the older versions were retired (RETIRE reaches the fakes' watch threads
    # asynchronously, after the change that sends it has returned)
    assert all(a.version == final.version for a in cluster.attention)
    deadline = time.monotonic() + 10
    while UpdatePhase.RETIRE not in cluster.worker("expert-0").phases(final.version):
        assert time.monotonic() < deadline, cluster.worker("expert-0").phases(final.version)
        time.sleep(0.01)


def test_losing_the_only_replicas_reloads_them(elastic) -> None:
    svc, cluster, failover, probe = elastic
    controller = svc.controller
    probe.down.add(address_of(svc, "expert-1"))
    controller.mark_dead("expert-1", "test")
    assert run_until_quiet(failover) == ["failover", "reload", "elastic_rebalance"]
    history = controller.get_placement(0)[2]
    routed = controller.get_placement(history[1])[0].phy2log
    assert routed[0, 3:6].tolist() == [-1, 4, 5]                          # 4 and 5 wait for the reload
    reloaded = controller.get_placement(history[2])[0].phy2log
    assert covered(reloaded, live_except(1)) and (reloaded[:, 3:6] == -1).all()
    assert cluster.violations == []


def test_restarted_and_new_workers_receive_experts_and_drain_empties_one(elastic, model_dir) -> None:
    svc, cluster, failover, probe = elastic
    controller = svc.controller
    probe.down.add(address_of(svc, "expert-2"))
    controller.mark_dead("expert-2", "test")
    run_until_quiet(failover)
    assert controller.current_map().phy2log[:, 6:9].eq(-1).all()
    # expert-2 restarts: a new process registers (no previous rank), heartbeats, gets experts again
    probe.down.clear()
    fingerprint = controller.config.model.fingerprint
    controller.register("expert-2", int(WorkerRole.EXPERT), "127.0.0.1:40100", 1.0, "cpu", fingerprint, -1)
    assert run_until_quiet(failover) == ["elastic_rebalance"]
    assert (controller.current_map().phy2log[:, 6:9] >= 0).all()
    # a fifth expert worker joins: scale-out (slot owners grow), then it receives experts
    newcomer = FakeWorker(cluster, "expert-4", WorkerRole.EXPERT)
    cluster.experts.append(newcomer)
    controller.register("expert-4", int(WorkerRole.EXPERT), "127.0.0.1:40101", 1.0, "cpu", fingerprint, -1)
    assert controller.worker("expert-4").rank == 2 + 4
    subscription = controller.subscribe("expert-4")
    threading.Thread(target=cluster._watch, args=(newcomer, subscription), daemon=True).start()
    assert run_until_quiet(failover) == ["scale_out", "elastic_rebalance"]
    current = controller.current_map()
    assert current.slot_owners == OWNERS + ("expert-4",) and current.num_physical_slots == 15
    assert (current.phy2log[:, 12:] >= 0).all()
    assert cluster.violations == []
    # drain one: its slots empty, the failover leaves it be (drained is not "holding no expert")
    svc.admin.drain("expert-0")
    assert (controller.current_map().phy2log[:, :3] == -1).all()
    assert run_until_quiet(failover) == []
    controller.unsubscribe(subscription)
