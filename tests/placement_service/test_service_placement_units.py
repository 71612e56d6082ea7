"""The placement service's plain classes, without gRPC: model info, config, registry, maps, db, fan-out."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.model_config import model_fingerprint
from epserve.placement_types import WorkerRole, WorkerState
from epserve.placement_service.broadcast import Broadcaster, SubscriptionClosed
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from epserve.placement_service.registry import WorkerRegistry
from epserve.placement_service.server import start_placement_server
from epserve.placement_service.state import LoadStats, MapHistory, balancedness
from epserve.placement_service.state_db import StateDB

pytestmark = pytest.mark.timeout(20)


# -- model info and config ----------------------------------------------------------------------
def test_moe_layers_follow_sparse_step_and_mlp_only_layers(tmp_path, write_model):
    info = PlacementConfig(str(write_model(tmp_path / "m", num_hidden_layers=8, decoder_sparse_step=2,
                                           mlp_only_layers=[3]))).model
    assert info.moe_layers == (1, 5, 7) and info.num_experts == 8
    deepseek = PlacementConfig(str(write_model(tmp_path / "ds", architectures=["DeepseekV3ForCausalLM"],
                                               model_type="deepseek_v3", num_hidden_layers=5, n_routed_experts=16,
                                               first_k_dense_replace=2))).model
    assert deepseek.moe_layers == (2, 3, 4) and deepseek.num_experts == 16
    with pytest.raises(ValueError, match=r"\['LlamaForCausalLM'\] is not supported"):
        PlacementConfig(str(write_model(tmp_path / "llama", architectures=["LlamaForCausalLM"], model_type="llama")))
    with pytest.raises(ValueError, match="no config.json"):
        PlacementConfig(str(tmp_path / "missing"))


def test_fingerprint_ignores_formatting_but_not_content(tmp_path, write_model, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    other = tmp_path / "reformatted"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(reversed(list(config.items())))))
    assert model_fingerprint(other) == model_fingerprint(model_dir)
    assert model_fingerprint(write_model(tmp_path / "bigger", num_experts=16)) != model_fingerprint(model_dir)


def test_config_errors_say_what_to_change(model_dir):
    with pytest.raises(ValueError, match=r"8 experts \+ 1 redundant = 9 slots.*--ep-num-redundant-experts"):
        PlacementConfig(str(model_dir), ep_size=2, ep_num_redundant_experts=1)
    with pytest.raises(ValueError, match="--heartbeat-timeout-ms"):
        PlacementConfig(str(model_dir), heartbeat_interval_ms=1000, heartbeat_timeout_ms=2000)
    with pytest.raises(ValueError, match="--moe-a2a-backend"):
        PlacementConfig(str(model_dir), moe_a2a_backend="nccl")
    with pytest.raises(ValueError, match="--dp-size"):
        PlacementConfig(str(model_dir), dp_size=0)
    with pytest.raises(ValueError, match="--init-expert-location"):
        PlacementConfig(str(model_dir), init_expert_location="/nonexistent/snapshot.json")
    config = PlacementConfig(str(model_dir), host="0.0.0.0", dp_size=3, ep_size=4)
    assert config.advertise_host == "127.0.0.1" and config.world_size == 7 and config.num_physical_slots == 8


# -- registry ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_registry_ranks_and_refusals():
    registry = WorkerRegistry(dp_size=2, ep_size=2, suspect_after_s=2, dead_after_s=5)
    assert registry.register("e0", WorkerRole.EXPERT, "a", 1.0, "cpu", -1)[0].rank == 2
    assert registry.register("a0", WorkerRole.ATTENTION, "a", 0.0, "cpu", 1)[0].rank == 1  # claims its old rank
    assert registry.register("a1", WorkerRole.ATTENTION, "a", 1.0, "cpu", -1)[0].rank == 0
    record, is_new = registry.register("e0", WorkerRole.EXPERT, "b", 2.0, "cuda:0", -1)
    assert (record.rank, is_new, record.address, record.capacity) == (2, False, "b", 2.0)
    assert registry.get("a0").capacity == 1.0  # 0 = default
    with pytest.raises(ResourceExhausted, match="--dp-size 2"):
        registry.register("a2", WorkerRole.ATTENTION, "a", 1.0, "cpu", -1)
    with pytest.raises(FailedPrecondition, match="held by worker e0"):
        registry.register("e1", WorkerRole.EXPERT, "a", 1.0, "cpu", 2)
    with pytest.raises(FailedPrecondition, match="cannot re-register as ATTENTION"):
        registry.register("e0", WorkerRole.ATTENTION, "a", 1.0, "cpu", -1)
    with pytest.raises(InvalidArgument, match="capacity"):
        registry.register("e1", WorkerRole.EXPERT, "a", -1.0, "cpu", -1)
    with pytest.raises(NotFound):
        registry.heartbeat("nobody")
    assert not registry.is_complete() and registry.is_complete(WorkerRole.ATTENTION)
    registry.register("e1", WorkerRole.EXPERT, "a", 1.0, "cpu", -1)
    assert registry.is_complete() and registry.expert_ids() == ("e0", "e1")


def test_registry_health_transitions_with_a_fake_clock():
    clock = FakeClock()
    registry = WorkerRegistry(dp_size=1, ep_size=1, suspect_after_s=2, dead_after_s=5, clock=clock)
    registry.register("a0", WorkerRole.ATTENTION, "", 1.0, "cpu", -1)
    registry.register("e0", WorkerRole.EXPERT, "", 1.0, "cpu", -1)
    clock.now += 1.5
    registry.heartbeat("a0")
    assert registry.check_health() == []
    clock.now += 1.0  # e0 silent 2.5 s
    assert [(r.worker_id, previous) for r, previous in registry.check_health()] == [("e0", WorkerState.ALIVE)]
    assert registry.get("e0").state == WorkerState.SUSPECT
    clock.now += 3.0  # e0 silent 5.5 s, a0 3.0 s
    changes = {r.worker_id: (previous, r.state) for r, previous in registry.check_health()}
    assert changes == {"e0": (WorkerState.SUSPECT, WorkerState.DEAD), "a0": (WorkerState.ALIVE, WorkerState.SUSPECT)}
    registry.heartbeat("e0")
    assert registry.get("e0").state == WorkerState.ALIVE


# -- maps and load -----------------------------------------------------------------------------
def test_map_history_is_append_only_and_versioned():
    history = MapHistory()
    with pytest.raises(Unavailable):
        history.get(0)
    first = history.next(ExpertMap.trivial(2, 4, 0).phy2log, 4, ("w0", "w1"))
    history.append(first)
    history.append(history.next(first.phy2log.flip(1), 4, ("w0", "w1")))
    assert history.current_version == 2 and history.versions() == [1, 2]
    assert history.get(0).version == 2 and torch.equal(history.get(1).phy2log, first.phy2log)
    with pytest.raises(NotFound, match="versions: \\[1, 2\\]"):
        history.get(3)
    with pytest.raises(ValueError, match="no replica"):
        history.next(torch.zeros(2, 4, dtype=torch.int64), 4, ("w0", "w1"))


def test_load_stats_and_balancedness():
    # 2 layers, 3 experts + 1 redundant over 2 workers; slot 3 replicates expert 0.
    expert_map = ExpertMap(torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0]]), 3, 1, ("w0", "w1"))
    stats = LoadStats()
    with pytest.raises(InvalidArgument, match="slot_token_counts has 7 entries"):
        stats.add(expert_map, 2, 4, [1] * 7, 1)
    with pytest.raises(InvalidArgument, match="num_layers"):
        stats.add(expert_map, 3, 4, [1] * 12, 1)
    with pytest.raises(InvalidArgument, match="negative"):
        stats.add(expert_map, 2, 4, [-1] + [1] * 7, 1)
    stats.add(expert_map, 2, 4, [4, 4, 4, 4, 8, 0, 0, 0], 2)
    stats.add(expert_map, 2, 4, [0, 0, 0, 0, 0, 0, 0, 8], 1)
    assert stats.physical(1).tolist() == [[4, 4, 4, 4], [8, 0, 0, 8]]
    assert stats.logical().tolist() == [[8, 4, 4], [16, 0, 0]]
    assert (stats.num_reports, stats.num_passes) == (2, 3)
    # Layer 0: workers 8 / 8 → 1.0; layer 1: 8 / 8 → 1.0.
    assert balancedness(expert_map, stats.physical(1)) == 1.0
    # Layer 0: 10 / 0 → mean 5 / max 10 = 0.5; layer 1 no load → 1.0; mean 0.75.
    assert balancedness(expert_map, torch.tensor([[10, 0, 0, 0], [0, 0, 0, 0]])) == pytest.approx(0.75)
    assert balancedness(expert_map, None) == 1.0


# -- persistence -------------------------------------------------------------------------------
def test_state_db_round_trip(tmp_path):
    db = StateDB(tmp_path / "state.db")
    registry = WorkerRegistry(dp_size=1, ep_size=1, suspect_after_s=1, dead_after_s=2)
    for worker_id, role in (("e0", WorkerRole.EXPERT), ("a0", WorkerRole.ATTENTION)):
        db.save_worker(registry.register(worker_id, role, f"{worker_id}:1", 1.5, "cpu", -1)[0])
    maps = [ExpertMap.trivial(3, 4, 2, ("e0",), version=1),
            ExpertMap(torch.tensor([[3, 2, 1, 0, 0, 1]] * 3), 4, 2, ("e0",))]
    for expert_map in maps:
        db.save_map(expert_map)
    db.save_settings({"dp_size": "1"})
    db.close()

    reopened = StateDB(tmp_path / "state.db")
    loaded = reopened.load_maps()
    assert [m.version for m in loaded] == [1, 2]
    assert all(torch.equal(a.phy2log, b.phy2log) and a.slot_owners == b.slot_owners for a, b in zip(loaded, maps))
    assert [(w.worker_id, w.role, w.rank, w.address, w.capacity) for w in reopened.load_workers()] == [
        ("a0", WorkerRole.ATTENTION, 0, "a0:1", 1.5), ("e0", WorkerRole.EXPERT, 1, "e0:1", 1.5)]
    assert reopened.settings() == {"dp_size": "1"}
    assert reopened._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_state_db_of_another_deployment_is_refused(tmp_path, model_dir):
    db = str(tmp_path / "state.db")
    start_placement_server(PlacementConfig(str(model_dir), dp_size=1, ep_size=2, state_db=db,
                                           shutdown_grace_s=0.1)).stop()
    with pytest.raises(ValueError, match="ep_size was 2, now 4.*fresh file"):
        start_placement_server(PlacementConfig(str(model_dir), dp_size=1, ep_size=4, state_db=db))


def test_restart_reuses_the_rendezvous_port_or_picks_another_when_taken(tmp_path, model_dir):
    db = str(tmp_path / "state.db")
    config = dict(model_path=str(model_dir), dp_size=1, ep_size=2, state_db=db, shutdown_grace_s=0.1)
    first = start_placement_server(PlacementConfig(**config))
    address = first.dist_init_addr
    first.stop()
    second = start_placement_server(PlacementConfig(**config))
    assert second.dist_init_addr == address
    second.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        squatter.listen()
        third = start_placement_server(PlacementConfig(**config))
        assert third.dist_init_addr != address
        third.stop()


# -- fan-out -----------------------------------------------------------------------------------
def test_a_slow_subscriber_is_cut_off_without_blocking_others():
    broadcaster: Broadcaster[int] = Broadcaster(max_pending=3)
    slow = broadcaster.subscribe("slow", [])  # never reads
    fast = broadcaster.subscribe("fast", [0])
    assert fast.get(timeout_s=1) == 0
    for item in range(1, 10):
        broadcaster.publish(item)  # returns at once although "slow" is full
        assert fast.get(timeout_s=1) == item
    assert slow.overflowed and broadcaster.num_subscribers == 1
    with pytest.raises(SubscriptionClosed):
        slow.get(timeout_s=0)
    assert fast.get(timeout_s=0.05) is None  # nothing queued: times out, no busy wait

    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(pytest.raises(SubscriptionClosed, fast.get)))
    waiter.start()
    broadcaster.close_all()  # wakes the blocked reader
    waiter.join(timeout=5)
    assert not waiter.is_alive() and waiter_result
    with pytest.raises(SubscriptionClosed):
        broadcaster.subscribe("too late", [])
