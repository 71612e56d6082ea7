"""The EPLB loop's decisions (pass counting, utilization threshold, gain rule, pause) and the
planner's pure functions, with fake workers (no gRPC)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epserve.placement_service.planner import (PlanSettings, RebalancePlan, count_moved, plan_rebalance,
                                       predicted_balancedness, worth_applying)
from test_rebalance_fakes import FakeCluster, make_service, report_load, skewed_counts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def service(model_dir):
    made = []

    def make(**overrides):
        svc = make_service(model_dir, **overrides)
        cluster = FakeCluster(svc.controller).start()
        deadline = time.monotonic() + 5
        while not all(a.version == 1 for a in cluster.attention):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        made.append((svc, cluster))
        return svc

    yield make
    for svc, cluster in made:
        cluster.stop()
        svc.close()


def test_decides_every_n_passes_counted_per_attention_worker(service):
    svc = service(enable_eplb=True, eplb_rebalance_num_iterations=30, eplb_min_gain=0.0)
    counts = skewed_counts(svc.controller)
    report_load(svc.controller, counts, passes=20, worker_id="attn-0")
    report_load(svc.controller, counts, passes=20, worker_id="attn-1")
    assert svc.eplb.decide().action == "waiting"  # 20 passes each, not 40
    report_load(svc.controller, counts, passes=10, worker_id="attn-0")
    decision = svc.eplb.decide()
    assert decision.action == "rebalanced" and decision.version == 2, decision
    assert svc.controller.load_window() == (None, 0)  # the window closed
    assert svc.eplb.decide().action == "waiting"


def test_utilization_threshold_and_gain_rule_skip(service):
    svc = service(enable_eplb=True, eplb_rebalance_num_iterations=1, eplb_min_rebalancing_utilization_threshold=0.2)
    report_load(svc.controller, skewed_counts(svc.controller))
    decision = svc.eplb.decide()
    assert decision.action == "balanced" and "threshold 0.2" in decision.detail
    svc.controller.config.eplb_min_rebalancing_utilization_threshold = 1.0
    svc.controller.config.eplb_min_gain = 100.0
    report_load(svc.controller, skewed_counts(svc.controller))
    decision = svc.eplb.decide()
    assert decision.action == "not_worth" and "--eplb-min-gain 100" in decision.detail
    assert svc.controller.current_map().version == 1
    # Balanced load: the plan gains nothing, so nothing moves even with no gain threshold.
    svc.controller.config.eplb_min_gain = 0.0
    report_load(svc.controller, torch.full((3, 8), 5, dtype=torch.int64))
    assert svc.eplb.decide().action in ("balanced", "not_worth")
    assert svc.controller.current_map().version == 1


def test_pause_resume_disabled_and_thread_wakes_on_reports(service):
    svc = service(enable_eplb=True, eplb_rebalance_num_iterations=5, eplb_min_gain=0.0)
    svc.eplb.pause()
    report_load(svc.controller, skewed_counts(svc.controller), passes=50)
    assert svc.eplb.decide().action == "paused" and svc.eplb.paused
    stop = threading.Event()
    thread = threading.Thread(target=svc.eplb.run, args=(stop,), daemon=True)
    thread.start()
    try:
        svc.eplb.resume()  # wakes the thread: the window is full
        deadline = time.monotonic() + 5
        while svc.controller.current_map().version == 1:
            assert time.monotonic() < deadline, svc.eplb.decisions
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert svc.eplb.decisions[-1].action == "rebalanced"
    svc.controller.config.enable_eplb = False
    assert svc.eplb.decide().action == "disabled"


# -- planner -------------------------------------------------------------------------------------
def test_plan_keeps_unrequested_layers_and_experts_in_place():
    current = torch.arange(8).repeat(3, 1)  # [L=3, P=8], 2 workers
    weight = torch.ones(3, 8, dtype=torch.float64)
    weight[:, 0] = weight[:, 1] = 40  # both hot experts on worker 0
    plan = plan_rebalance(weight, current, 2, PlanSettings("deepseek", expert_bytes=10), layers=[1])
    assert plan.changed_layers == (1,)
    assert torch.equal(plan.phy2log[[0, 2]], current[[0, 2]])
    assert plan.balancedness_after > plan.balancedness_before
    assert plan.bytes_moved == plan.experts_moved * 10 and plan.algorithm == "deepseek"
    # A global plan is relabelled so experts keep their slots where the packing allows: here
    # deepseek's packing exchanges two pairs between the workers; the other 4 slots stay.
    assert plan.experts_moved == 4
    assert (plan.phy2log[1] == current[1]).sum() == 4


def test_slot_count_change_counts_replicas_to_load():
    current = torch.arange(8).repeat(2, 1)  # P=8 over 2 workers: worker 0 holds 0-3, worker 1 4-7
    bigger = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 7, 4]).repeat(2, 1)  # P=10: each worker adds one replica
    assert count_moved(current, bigger, 2) == 2 * 2  # per layer: a 2nd 0 on worker 0, a 2nd 4 on worker 1
    weight = torch.ones(2, 8, dtype=torch.float64)
    plan = plan_rebalance(weight, current, 2, PlanSettings("deepseek"), num_physical_slots=10)
    assert plan.phy2log.shape == (2, 10) and plan.changed_layers == (0, 1)


def test_gain_rule_and_predicted_balancedness():
    def plan(before, after, moved):
        return RebalancePlan(torch.zeros(1, 1), "deepseek", before, after, moved, 0, 0.0, ())

    assert worth_applying(plan(0.5, 0.6, 100), min_gain=0.1, num_slots=100)  # moves all, gains 0.1
    assert not worth_applying(plan(0.5, 0.59, 100), min_gain=0.1, num_slots=100)
    assert worth_applying(plan(0.5, 0.51, 10), min_gain=0.1, num_slots=100)  # moves a tenth, gains 0.01
    assert not worth_applying(plan(0.5, 0.5, 1), min_gain=0.0, num_slots=100)  # no gain
    assert not worth_applying(plan(0.5, 0.9, 0), min_gain=0.0, num_slots=100)  # nothing moves
    phy2log = torch.arange(4).reshape(1, 4)
    assert predicted_balancedness(phy2log, None, 2) == 1.0
    assert predicted_balancedness(phy2log, torch.tensor([[3.0, 1.0, 0.0, 0.0]]), 2) == pytest.approx(0.5)
