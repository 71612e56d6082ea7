"""The torch backend with real processes on 127.0.0.1: 2 attention ranks + 2 expert ranks (gloo).

One world runs the whole plan of ``dataplane_worlds`` (spawning 4 processes costs seconds on
2 cores); each step's observations are checked here against the local backend, in float64.
"""

from __future__ import annotations

import os
import queue
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from dataplane_worlds import (HANG_LAYER, HELD_VERSIONS, NUM_ATTENTION, PARITY_BATCHES,
                              RUNNER_BATCHES, SLOTS_PER_WORKER, SLOW_LAYER, TRACE, WORKERS, TestExperts,
                              attention_rank_main, batch_seed, expert_rank_main, from_bytes, make_batch)
from epserve.dataplane import BatchHeader, DataPlaneTimeout, make_dispatcher
from epserve.dataplane.torch_group import start_rendezvous_store

WORLD = NUM_ATTENTION + WORKERS
EXPERTS = [TestExperts(w) for w in range(WORKERS)]


def local_result(layer: int, version: int, seed: int, num_tokens: int, pattern: str,
                 micro_batch: int = 0) -> torch.Tensor:
    hidden, slot_ids, weights = make_batch(seed, num_tokens, pattern=pattern)
    local = make_dispatcher("local", experts=EXPERTS)
    header = BatchHeader(version, layer, micro_batch, num_tokens)
    return local.combine(local.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), 1.0)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def world():
    """Runs the plan; → (attention observations by rank, expert observations by rank, idle CPU by pid)."""
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(NUM_ATTENTION)
    control = {r: ctx.Queue() for r in range(WORLD)}     # parent → rank: "go on" / "stop"
    procs = [ctx.Process(target=attention_rank_main, args=(r, port, results, barrier, control[r], WORLD))
             for r in range(NUM_ATTENTION)]
    procs += [ctx.Process(target=expert_rank_main, args=(r, port, results, control[r], WORLD))
              for r in range(NUM_ATTENTION, WORLD)]
    for p in procs:
        p.start()
    attention, experts, idle_cpu, idle = {}, {}, {}, set()
    deadline = time.monotonic() + 75
    try:
        while len(attention) < NUM_ATTENTION or len(experts) < WORKERS:
            try:
                kind, rank, payload = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail(f"the world did not finish in time; reported so far: {attention} {experts}")
            if kind == "idle":
                idle.add(rank)
                if len(idle) == NUM_ATTENTION:
                    time.sleep(0.3)
                    before = {p.pid: cpu_seconds(p.pid) for p in procs}
                    time.sleep(1.0)
                    idle_cpu = {pid: cpu_seconds(pid) - t for pid, t in before.items()}
                    for r in range(NUM_ATTENTION):
                        control[r].put("idle measured")
            elif kind == "ready_for_stop":
                for r in range(NUM_ATTENTION, WORLD):
                    control[r].put("stop")
            elif kind == "expert":
                experts[rank] = from_bytes(payload)
                if rank == NUM_ATTENTION:                   # expert 0 stopped → tell attention rank 1
                    control[1].put("experts stopped")
            else:
                attention[rank] = from_bytes(payload)
    finally:
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1))
            if p.is_alive():
                p.kill()
                p.join()
    for rank, obs in {**attention, **experts}.items():
        assert "error" not in obs, f"rank {rank} failed:\n{obs['error']}"
    return attention, experts, idle_cpu, {p.pid: p.exitcode for p in procs}


def test_parity_with_local_backend_float64(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        for i, (layer, version, t, pattern) in enumerate(PARITY_BATCHES):
            got = attention[rank]["parity"][i]
            assert got.shape == (t, 16) and got.dtype == torch.float64
            assert torch.equal(got, local_result(layer, version, batch_seed(rank, i), t, pattern)), (rank, i)
        for i, (layer, version, t, pattern) in enumerate(RUNNER_BATCHES):
            expected = local_result(layer, version, batch_seed(rank, 50 + i), t, pattern)
            assert torch.equal(attention[rank]["runner"][i], expected), (rank, i)
        assert torch.equal(attention[rank]["after_errors"], local_result(0, 1, batch_seed(rank, 71), 7, "random"))


def test_two_micro_batches_in_flight_and_an_abandoned_one(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        expected = [local_result(5 + i % 2, 1, batch_seed(rank, 60 + i), 11 + i, "random", i % 2) for i in range(4)]
        for got, want in zip(attention[rank]["pingpong"], expected):
            assert torch.equal(got, want)
        abandoned = attention[rank]["abandoned"]
        assert torch.equal(abandoned[0], expected[0])
        assert torch.equal(abandoned[1], local_result(5, 1, batch_seed(rank, 62), 13, "random"))
        assert torch.equal(abandoned[2], local_result(5, 1, batch_seed(rank, 63), 14, "random"))


def test_stale_version_and_remote_error_are_typed(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        name, message, held, peer = attention[rank]["stale"]
        assert name == "StaleMapVersion" and held == HELD_VERSIONS and peer == NUM_ATTENTION
        assert "map version 7" in message
        name, message, _, peer = attention[rank]["remote_error"]
        assert name == "RemoteExpertError" and "refuses layer 50" in message and peer == NUM_ATTENTION


def test_trace_context_arrives_intact(world) -> None:
    _, experts, _, _ = world
    calls = experts[NUM_ATTENTION]["calls"]
    for rank in range(NUM_ATTENTION):
        traces = {trace for layer, _, _, trace in calls if layer == 10 + rank}
        assert traces == {TRACE[:40 + rank]}


def test_requests_that_arrive_together_are_batched(world) -> None:
    attention, experts, _, _ = world
    sizes = attention[0]["batched_sizes"]                      # [micro-batch][worker]
    calls = experts[NUM_ATTENTION]["calls"]                    # worker 0 is the one still alive
    assert [n for layer, _, n, _ in calls if layer == 12] == [sizes[0][0] + sizes[1][0]]
    assert any(layer == SLOW_LAYER for layer, _, _, _ in calls)
    for i, got in enumerate(attention[0]["batched"][1:]):
        assert torch.equal(got, local_result(12, 1, batch_seed(0, 81 + i), 5 + i, "random", 1 + i))


def test_zero_tokens_need_no_traffic(world) -> None:
    attention, experts, _, _ = world
    for rank in range(NUM_ATTENTION):
        zero = attention[rank]["parity"][PARITY_BATCHES.index((4, 2, 0, "random"))]
        assert zero.shape == (0, 16)
    seen = {w: {layer for layer, _, _, _ in experts[NUM_ATTENTION + w]["calls"]} for w in range(WORKERS)}
    assert 4 not in seen[0] and 4 not in seen[1]     # a batch of 0 tokens sends nothing
    assert {0, 1, 2, 3} <= seen[0]
    assert 3 not in seen[1] and 2 not in seen[1]      # layer 3 routes only to worker 0, layer 2's token too
    assert 0 in seen[1]


def test_idle_deployment_does_not_spin(world) -> None:
    _, _, idle_cpu, _ = world
    assert idle_cpu and max(idle_cpu.values()) < 0.1, idle_cpu


def test_expert_that_never_answers_times_out_within_deadline(world) -> None:
    attention, _, _, _ = world
    elapsed, peer, layer, micro_batch, message = attention[0]["timeout"]
    assert 0.5 <= elapsed < 1.0 and peer == NUM_ATTENTION and layer == HANG_LAYER and micro_batch == 0
    assert f"expert rank {NUM_ATTENTION}" in message and f"layer {HANG_LAYER}" in message
    elapsed, peer = attention[0]["after_timeout"]              # the broken link fails fast ...
    assert elapsed < 0.1 and peer == NUM_ATTENTION
    expected = local_result(0, 1, batch_seed(0, 92), 6, "only1")  # ... and the other link still works
    assert torch.equal(attention[0]["worker1_still_ok"], expected)
    expected = local_result(0, 1, batch_seed(1, 94), 6, "only0")  # expert 0 still serves attention rank 1
    assert torch.equal(attention[1]["served_after_other_link_lost"], expected)


def test_killed_expert_gives_peer_lost_fast(world) -> None:
    attention, experts, _, exitcodes = world
    assert "serve_returned_after_stop_s" not in experts[NUM_ATTENTION + 1] and -9 in exitcodes.values()
    elapsed, name, peer, _ = attention[1]["killed"]
    assert name == "PeerLost" and peer == NUM_ATTENTION + 1 and elapsed < 2.0
    elapsed, name, peer = attention[0]["after_kill"]
    assert name == "PeerLost" and peer == NUM_ATTENTION + 1 and elapsed < 2.0


def test_stop_returns_serve_and_closes_links(world) -> None:
    attention, experts, _, _ = world
    assert experts[NUM_ATTENTION]["serve_returned_after_stop_s"] < 2.0
    elapsed, name, peer = attention[1]["after_stop"]
    assert name == "PeerLost" and peer == NUM_ATTENTION and elapsed < 1.0


def _join_alone(port: int, unreachable_port: int, results) -> None:
    from epserve.dataplane.torch_group import join_group

    out = []
    for addr, world_size in ((f"127.0.0.1:{unreachable_port}", 2), (f"127.0.0.1:{port}", 2)):
        start = time.monotonic()
        try:
            join_group(0, world_size, addr, 2.0, num_attention_ranks=1)
            out.append(("joined", time.monotonic() - start))
        except DataPlaneTimeout as exc:
            out.append((type(exc).__name__, time.monotonic() - start))
        except Exception as exc:  # reported, so the assertion shows what happened
            out.append((f"{type(exc).__name__}: {exc}", time.monotonic() - start))
    results.put(out)


def test_join_does_not_hang_when_peers_or_store_are_missing() -> None:
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    with socket.socket() as probe:      # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        unreachable = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_join_alone, args=(port, unreachable, results))
    proc.start()
    try:
        outcomes = results.get(timeout=40)
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    for name, elapsed in outcomes:
        assert name == "DataPlaneTimeout" and elapsed < 15, outcomes
