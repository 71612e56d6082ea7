"""The make-before-break protocol with fake workers (no gRPC): versions, phases, rollback,
timeouts, chunking, one change at a time, and a placement restart in the middle."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epserve.placement_types import UpdatePhase
from epserve.placement_service.errors import Aborted, FailedPrecondition, Unavailable
from epserve.placement_service.rebalancer import next_chunk
from test_rebalance_fakes import FakeCluster, make_service, report_load, skewed_counts

pytestmark = pytest.mark.timeout(60)

P, C, R, X = UpdatePhase.PREPARE, UpdatePhase.COMMIT, UpdatePhase.RETIRE, UpdatePhase.ROLLBACK


def wait_until(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return value


@pytest.fixture
def service(model_dir):
    made = []

    def make(**overrides):
        made.append(make_service(model_dir, **overrides))
        return made[-1]

    yield make
    for svc in made:
        svc.close()


def started(svc, **options) -> FakeCluster:
    cluster = FakeCluster(svc.controller, **options).start()
    wait_until(lambda: all(a.version == 1 for a in cluster.attention))
    return cluster


def test_rebalance_prepares_commits_retires_in_order(service):
    svc = service()
    cluster = started(svc)
    report_load(svc.controller, skewed_counts(svc.controller))
    before = svc.controller.current_map()
    result = svc.admin.rebalance()
    after = svc.controller.current_map()
    assert (result.previous_version, result.version, result.num_versions) == (1, 2, 1)
    assert after.version == 2 and torch.equal(after.phy2log, result.plan.phy2log)
    assert not torch.equal(after.phy2log, before.phy2log)
    assert result.plan.balancedness_after > result.plan.balancedness_before
    wait_until(lambda: all(e.phases(2) == [P, C, R] for e in cluster.experts))
    wait_until(lambda: all(a.version == 2 for a in cluster.attention))
    assert all(a.phases(2) == [C] for a in cluster.attention)  # PREPARE / RETIRE go to expert workers only
    wait_until(lambda: all(e.held == {2} for e in cluster.experts))  # version 1 retired
    assert cluster.violations == []
    assert svc.controller.stat("num_rebalances") == 1 and svc.rebalancer.durations_ms
    assert svc.controller.version_meta(2) == ("rebalance", 1)


def test_failed_prepare_rolls_back_and_never_reuses_the_number(service):
    svc = service()
    cluster = started(svc, expert_options={"expert-1": {"prepare": "fail"}})
    report_load(svc.controller, skewed_counts(svc.controller))
    before = svc.controller.current_map()
    with pytest.raises(Aborted, match="expert-1 could not prepare version 2: out of memory.*version 1 stays"):
        svc.admin.rebalance()
    current = svc.controller.current_map()
    assert current.version == 1 and torch.equal(current.phy2log, before.phy2log)
    assert svc.controller.get_placement(0)[2] == [1]  # the history has nothing half-applied
    wait_until(lambda: all(e.phases(2) == [P, X] for e in cluster.experts))
    assert all(a.version == 1 for a in cluster.attention) and all(2 not in e.held for e in cluster.experts)
    assert svc.controller.stat("num_rollbacks") == 1
    assert svc.controller.load_json("operation") is None and svc.controller.load_json("prepare_version") is None
    svc.controller.ack("expert-0", 2, P, True, "")  # a late PREPARE ack of the rolled-back version: no effect
    assert svc.controller.worker("expert-0").map_version == 1

    cluster.worker("expert-1").prepare = "ok"
    result = svc.admin.rebalance()
    assert result.version == 3  # 2 was handed out once; never again
    assert svc.controller.get_placement(0)[2] == [1, 3]
    assert cluster.violations == []


def test_prepare_timeout_rolls_back(service):
    svc = service(eplb_prepare_timeout_s=0.3)
    cluster = started(svc, expert_options={"expert-0": {"prepare": "silent"}})
    report_load(svc.controller, skewed_counts(svc.controller))
    start = time.monotonic()
    with pytest.raises(Aborted, match=r"\['expert-0'\] did not ack PREPARE of version 2 within 0.3 s"):
        svc.admin.rebalance()
    assert time.monotonic() - start < 3
    assert svc.controller.current_map().version == 1
    wait_until(lambda: cluster.worker("expert-1").phases(2) == [P, X])
    assert cluster.violations == []


def test_chunks_change_a_few_layers_per_version(service):
    svc = service(eplb_rebalance_layers_per_chunk=1)
    cluster = started(svc)
    report_load(svc.controller, skewed_counts(svc.controller))
    plan = svc.admin.plan()
    assert plan.changed_layers == (0, 1, 2)
    result = svc.admin.rebalance()
    assert (result.version, result.num_versions) == (4, 3)
    maps = [svc.controller.get_placement(v)[0] for v in (1, 2, 3, 4)]
    for layer, (older, newer) in enumerate(zip(maps, maps[1:])):
        differs = (older.phy2log != newer.phy2log).any(dim=1).nonzero().flatten().tolist()
        assert differs == [layer]  # each version changes exactly one more layer
    assert torch.equal(maps[-1].phy2log, plan.phy2log)
    expert = cluster.experts[0]
    wait_until(lambda: len(expert.events) >= 1 + 3 * 3)
    assert expert.events[1:] == [(P, 2), (C, 2), (R, 2), (P, 3), (C, 3), (R, 3), (P, 4), (C, 4), (R, 4)]
    assert cluster.violations == []
    assert next_chunk(maps[0].phy2log, plan.phy2log, 2) == (0, 1)
    assert next_chunk(maps[0].phy2log, torch.zeros(3, 10, dtype=torch.int64), 1) == (0, 1, 2)


def test_failure_in_a_later_chunk_keeps_earlier_chunks(service):
    svc = service(eplb_rebalance_layers_per_chunk=1)
    cluster = started(svc)
    report_load(svc.controller, skewed_counts(svc.controller))
    expert = cluster.worker("expert-0")
    original = expert.handle

    def fail_from_version_3(phase, version):
        expert.prepare = "fail" if version >= 3 else "ok"
        original(phase, version)

    expert.handle = fail_from_version_3
    with pytest.raises(Aborted, match="1 earlier chunk.*rollback returns to version 1"):
        svc.admin.rebalance()
    assert svc.controller.current_map().version == 2 and svc.controller.get_placement(0)[2] == [1, 2]
    # Rollback undoes the whole partial change: back to version 1's map, as a new version.
    expert.handle = original
    expert.prepare = "ok"
    result = svc.admin.rollback()
    assert result.version == 4
    assert torch.equal(svc.controller.current_map().phy2log, svc.controller.get_placement(1)[0].phy2log)
    assert cluster.violations == []


def test_attention_lag_stops_after_the_commit_without_retiring(service):
    svc = service(eplb_rebalance_layers_per_chunk=1, eplb_commit_timeout_s=0.3)
    cluster = started(svc, attention_options={"attn-1": {"commit": "silent"}})
    report_load(svc.controller, skewed_counts(svc.controller))
    result = svc.admin.rebalance()
    assert (result.version, result.num_versions) == (2, 1)
    assert "['attn-1'] had not switched to version 2" in result.message and "layers [1, 2]" in result.message
    time.sleep(0.2)
    assert all(R not in e.phases(2) for e in cluster.experts) and all(1 in e.held for e in cluster.experts)
    assert cluster.violations == []


def test_one_change_at_a_time(service):
    svc = service(eplb_prepare_timeout_s=2.0)
    cluster = started(svc, expert_options={"expert-0": {"prepare": "silent"}})
    report_load(svc.controller, skewed_counts(svc.controller))
    errors = []
    first = threading.Thread(target=lambda: errors.append(pytest.raises(Aborted, svc.admin.rebalance)))
    first.start()
    wait_until(lambda: cluster.worker("expert-1").phases(2) == [P])
    with pytest.raises(FailedPrecondition, match="already running"):
        svc.admin.set_redundancy(2)
    assert svc.admin.plan().experts_moved > 0  # a dry run is fine meanwhile
    first.join()
    assert errors and svc.controller.current_map().version == 1


def test_restart_mid_prepare_rolls_back_then_completes(model_dir, tmp_path):
    db = tmp_path / "placement.db"
    first = make_service(model_dir, db_path=db, eplb_prepare_timeout_s=30)
    cluster = started(first, expert_options={"expert-0": {"prepare": "silent"}})
    report_load(first.controller, skewed_counts(first.controller))
    target = first.admin.plan().phy2log
    failures = []
    runner = threading.Thread(target=lambda: failures.append(pytest.raises(Unavailable, first.admin.rebalance)))
    runner.start()
    wait_until(lambda: cluster.worker("expert-1").phases(2) == [P])
    first.close()  # placement stops mid-prepare: nothing more is written
    runner.join(timeout=5)
    assert failures and "resumes" in str(failures[0].value)
    cluster.stop()

    second = make_service(model_dir, db_path=db)
    try:
        assert second.controller.current_map().version == 1
        revived = FakeCluster(second.controller).start()
        result = second.rebalancer.resume_interrupted(heard_timeout_s=5)
        assert result is not None and (result.previous_version, result.version) == (1, 3)
        assert torch.equal(second.controller.current_map().phy2log, target)  # completed
        wait_until(lambda: all(e.phases(3) == [P, C, R] for e in revived.experts))
        assert all(X in e.phases(2) for e in revived.experts)  # the orphan was rolled back
        assert second.controller.get_placement(0)[2] == [1, 3]
        assert second.controller.load_json("operation") is None
        assert revived.violations == []
        revived.stop()
    finally:
        second.close()


def test_restart_after_a_commit_retires_it_and_completes_the_rest(model_dir, tmp_path):
    db = tmp_path / "placement.db"
    first = make_service(model_dir, db_path=db, eplb_rebalance_layers_per_chunk=1, eplb_commit_timeout_s=30)
    cluster = started(first, attention_options={"attn-0": {"commit": "silent"}})
    report_load(first.controller, skewed_counts(first.controller))
    target = first.admin.plan().phy2log
    runner = threading.Thread(target=lambda: pytest.raises(Unavailable, first.admin.rebalance))
    runner.start()
    wait_until(lambda: cluster.worker("attn-1").version == 2)  # committed, attn-0 lags
    first.close()
    runner.join(timeout=5)
    cluster.stop()

    second = make_service(model_dir, db_path=db, eplb_rebalance_layers_per_chunk=1)
    try:
        assert second.controller.current_map().version == 2  # the commit survived
        revived = FakeCluster(second.controller).start()
        result = second.rebalancer.resume_interrupted(heard_timeout_s=5)
        assert (result.previous_version, result.version, result.num_versions) == (1, 4, 2)
        assert torch.equal(second.controller.current_map().phy2log, target)
        wait_until(lambda: all(e.phases(2)[-1] == R for e in revived.experts))  # version 2 retired first
        assert second.controller.get_placement(0)[2] == [1, 2, 3, 4]
        assert second.controller.version_meta(4) == ("rebalance", 1)
        assert revived.violations == []
        revived.stop()
    finally:
        second.close()


def test_nothing_to_resume_without_an_interrupted_change(service):
    svc = service()
    started(svc)
    assert svc.rebalancer.resume_interrupted(heard_timeout_s=0.1) is None
