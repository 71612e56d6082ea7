"""Router: least outstanding tokens, ties round-robin."""

from __future__ import annotations

from epserve.gateway.router import Router

WORKERS = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]


def test_no_candidates() -> None:
    assert Router().route("r", [], 10) is None


def test_ties_take_turns() -> None:
    router = Router()
    picks = [router.pick(WORKERS) for _ in range(6)]
    assert picks == WORKERS * 2


def test_least_outstanding_tokens_wins() -> None:
    router = Router()
    assert router.route("a", WORKERS, 100) == WORKERS[0]
    assert router.route("b", WORKERS, 50) == WORKERS[1]
    assert router.route("c", WORKERS, 10) == WORKERS[2]
    assert router.route("d", WORKERS, 1) == WORKERS[2]            # 10 < 50 < 100
    router.consume("a", 95)                                        # a: 5 left
    assert router.load(WORKERS[0]) == 5
    assert router.route("e", WORKERS, 1) == WORKERS[0]
    router.release("b")
    assert router.load(WORKERS[1]) == 0
    assert router.pick(WORKERS) == WORKERS[1]


def test_rerouting_moves_the_charge() -> None:
    router = Router()
    first = router.route("a", WORKERS[:2], 100)
    second = router.route("a", [w for w in WORKERS[:2] if w != first], 80)
    assert router.load(first) == 0 and router.load(second) == 80


def test_reported_load_counts_when_larger() -> None:
    router = Router()
    router.set_reported_load(WORKERS[0], 1000)
    router.route("a", WORKERS[1:2], 10)
    assert router.pick(WORKERS[:2]) == WORKERS[1]
    router.set_reported_load(WORKERS[0], None)
    assert router.pick(WORKERS[:2]) == WORKERS[0]
