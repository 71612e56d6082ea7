"""The cuda_ipc backend over host shared memory with real processes: 2 attention ranks + 2 expert ranks.

One world runs the whole plan below (spawning 4 processes costs seconds on 2 cores); the
parent checks each step's observations against the local backend, bit for bit, in float64.
The attention ranks' plan also drives the step path (``cuda_ipc_step``, what CUDA graphs replay)
over the same channels.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dataplane_worlds import (ERROR_LAYER, HANG_LAYER, HANG_S, HELD_VERSIONS, HIDDEN, KILL_LAYER, NUM_ATTENTION,
                              RUNNER_BATCHES, SLOTS_PER_WORKER, SLOW_LAYER, TOP_K, TRACE, WORKERS, TestExperts,
                              batch_seed, from_bytes, make_batch, to_bytes)
from epserve.dataplane import BatchHeader, DataPlaneTimeout, make_dispatcher, split_by_worker
from epserve.dataplane.torch_group import start_rendezvous_store

WORLD = NUM_ATTENTION + WORKERS
MAX_TOKENS = 3000
PARITY_BATCHES = [  # (layer, version, T, pattern); seed = 100 * rank + index
    (0, 1, 37, "random"), (1, 2, 5, "random"), (2, 1, 1, "random"), (3, 1, 64, "only0"), (4, 2, 0, "random"),
    (6, 1, MAX_TOKENS, "random"),
]
STEP_LAYERS = 3
STEP_TOKENS = 12
EXPERTS = [TestExperts(w) for w in range(WORKERS)]


def local_result(layer: int, version: int, seed: int, num_tokens: int, pattern: str = "random",
                 micro_batch: int = 0) -> torch.Tensor:
    hidden, slot_ids, weights = make_batch(seed, num_tokens, pattern=pattern)
    local = make_dispatcher("local", experts=EXPERTS)
    header = BatchHeader(version, layer, micro_batch, num_tokens)
    return local.combine(local.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), 1.0)


def failure(fn) -> tuple | None:
    """Run ``fn``; → None, or (exception name, message, peer_rank, held_versions, seconds it took)."""
    start = time.monotonic()
    try:
        fn()
        return None
    except Exception as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "peer_rank", None), getattr(exc, "held_versions", None),
                time.monotonic() - start)


# ---- what each spawned rank runs --------------------------------------------------------------

def attention_main(rank: int, port: int, results, barrier, control, readiness: str) -> None:
    torch.set_num_threads(1)
    obs: dict = {}
    try:
        dispatcher = make_dispatcher("cuda_ipc", rank=rank, world_size=WORLD, dist_init_addr=f"127.0.0.1:{port}",
                                     expert_ranks=list(range(NUM_ATTENTION, WORLD)), timeout_s=20, device="cpu",
                                     max_tokens=MAX_TOKENS, hidden_size=HIDDEN, top_k=TOP_K, dtype=torch.float64,
                                     readiness=readiness)
        run_plan(rank, dispatcher, obs, results, barrier, control)
        dispatcher.close()
    except BaseException:
        obs["error"] = traceback.format_exc()
    results.put(("attention", rank, to_bytes(obs)))


def run_plan(rank: int, dispatcher, obs: dict, results, barrier, control) -> None:
    def run(layer, version, seed, num_tokens, pattern="random", micro_batch=0, trace=b"", timeout_s=20.0):
        hidden, slot_ids, weights = make_batch(seed, num_tokens, pattern=pattern)
        header = BatchHeader(version, layer, micro_batch, num_tokens, trace)
        return dispatcher.combine(dispatcher.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), timeout_s)

    # 1. parity, both ranks at once (diagonal experts: exact under any batching); too many tokens
    obs["parity"] = [run(layer, v, batch_seed(rank, i), t, p) for i, (layer, v, t, p) in enumerate(PARITY_BATCHES)]
    obs["too_many"] = failure(lambda: run(0, 1, 0, MAX_TOKENS + 1))
    # 2. the real MoE runner, one rank at a time (each expert computes exactly one request per call)
    for turn in range(NUM_ATTENTION):
        barrier.wait(40)
        if turn == rank:
            obs["runner"] = [run(layer, v, batch_seed(rank, 50 + i), t, p)
                             for i, (layer, v, t, p) in enumerate(RUNNER_BATCHES)]
    barrier.wait(40)
    # 3. two micro-batches in flight, combined in both orders; a third (slot reuse); a dropped one
    batches = [make_batch(batch_seed(rank, 60 + i), 11 + i) for i in range(4)]
    headers = [BatchHeader(1, 5 + i % 2, i % 2, 11 + i) for i in range(4)]
    p0, p1 = (dispatcher.dispatch(headers[i], *batches[i], SLOTS_PER_WORKER) for i in (0, 1))
    obs["pingpong"] = [dispatcher.combine(p0, 20), dispatcher.combine(p1, 20)]
    p2, p3 = (dispatcher.dispatch(headers[i], *batches[i], SLOTS_PER_WORKER) for i in (2, 3))
    out3 = dispatcher.combine(p3, 20)
    obs["pingpong"] += [dispatcher.combine(p2, 20), out3]
    p0, p1 = (dispatcher.dispatch(headers[i], *batches[i], SLOTS_PER_WORKER) for i in (0, 1))
    p2 = dispatcher.dispatch(BatchHeader(1, 5, 2, 13), *batches[2], SLOTS_PER_WORKER)   # slot 0 again
    obs["three_in_flight"] = [dispatcher.combine(p, 20) for p in (p2, p1, p0)]
    dispatcher.dispatch(headers[0], *batches[0], SLOTS_PER_WORKER)                      # dropped at once
    obs["after_dropped"] = run(5, 1, batch_seed(rank, 62), 13, timeout_s=5)
    # 4. stale version, remote error; the channels stay usable
    obs["stale"] = failure(lambda: run(0, 7, batch_seed(rank, 70), 6))
    obs["remote_error"] = failure(lambda: run(ERROR_LAYER, 1, batch_seed(rank, 70), 6))
    obs["after_errors"] = run(0, 1, batch_seed(rank, 71), 7)
    # 5. trace context: a layer only this rank uses
    run(10 + rank, 1, batch_seed(rank, 72), 4, trace=TRACE[:40 + rank])
    # 6. the step path: STEP_LAYERS layers per step, two steps on micro-batch slot 1, then a stale one
    obs["steps"] = run_steps(rank, dispatcher)
    barrier.wait(40)
    # 7. batching: rank 0 keeps the experts busy (SLOW_LAYER), then both ranks send layer 12 at once
    if rank == 0:
        slow = dispatcher.dispatch(BatchHeader(1, SLOW_LAYER, 0, 8), *make_batch(batch_seed(0, 80), 8),
                                   SLOTS_PER_WORKER)
        time.sleep(0.1)                    # the experts are inside SLOW_LAYER's compute now
    barrier.wait(40)
    later = make_batch(batch_seed(rank, 81), 5 + rank)
    obs["batched"] = dispatcher.combine(dispatcher.dispatch(BatchHeader(1, 12, 1, 5 + rank), *later,
                                                            SLOTS_PER_WORKER), 20)
    if rank == 0:
        dispatcher.combine(slow, 20)
    barrier.wait(40)
    # 8. idle: the parent measures every rank's CPU time while all wait here
    results.put(("idle", rank, None))
    assert control.get(timeout=60) == "idle measured"
    barrier.wait(40)
    # 9. rank 0: expert 0 does not answer in time; a late answer is not taken for the next one
    if rank == 0:
        obs["timeout"] = failure(lambda: run(HANG_LAYER, 1, batch_seed(0, 90), 6, timeout_s=0.5))
        start = time.monotonic()
        obs["after_timeout"] = (run(0, 1, batch_seed(0, 91), 6), time.monotonic() - start)
    barrier.wait(40)
    # 10. rank 1: expert 1 is killed mid-exchange → PeerLost fast; rank 0 then sees worker 1 gone at dispatch
    if rank == 1:
        obs["killed"] = failure(lambda: run(KILL_LAYER, 1, batch_seed(1, 95), 6, "only1"))
    barrier.wait(40)
    if rank == 0:
        obs["after_kill"] = failure(lambda: run(1, 1, batch_seed(0, 96), 6, "only1", timeout_s=5))
        obs["worker0_still_ok"] = run(1, 1, batch_seed(0, 97), 6, "only0")
    barrier.wait(40)
    # 11. rank 1: the parent stops expert 0; the next exchange with it fails at once
    if rank == 1:
        results.put(("ready_for_stop", rank, None))
        assert control.get(timeout=30) == "experts stopped"
        obs["after_stop"] = failure(lambda: run(0, 1, batch_seed(1, 98), 6, "only0", timeout_s=5))


def step_batch(rank: int, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return make_batch(batch_seed(rank, 200 + 10 * step + layer), STEP_TOKENS)


def pair_batch(rank: int, micro_batch: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return make_batch(batch_seed(rank, 300 + 10 * micro_batch + layer), STEP_TOKENS - micro_batch)


def run_steps(rank: int, dispatcher) -> dict:
    """Two steps of STEP_LAYERS layers on micro-batch 1 through the step path, then a stale one, an
    abandoned one, another; then a step of two micro-batches (slots 0 and 1 announced as one group,
    their layers interleaved as ``run_micro_batches`` does)."""
    from epserve.dataplane import StaleMapVersion

    exchange = dispatcher.step_exchange(micro_batch=1, timeout_s=20)
    outs = []
    for step in range(2):
        exchange.begin_step(STEP_TOKENS, map_version=1, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                            weight_dtype=torch.float64)
        for layer in range(STEP_LAYERS):
            exchange.send(layer, *step_batch(rank, step, layer))
            outs.append(exchange.receive(layer).clone())
        exchange.finish_step()
    exchange.begin_step(STEP_TOKENS, map_version=7, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                        weight_dtype=torch.float64)
    for layer in range(STEP_LAYERS):
        exchange.send(layer, *step_batch(rank, 2, layer))
        exchange.receive(layer)
    try:
        exchange.finish_step()
        stale = None
    except StaleMapVersion as exc:
        stale = (exc.requested, exc.held_versions, exc.peer_rank)
    exchange.begin_step(STEP_TOKENS, map_version=1, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                        weight_dtype=torch.float64)       # abandoned after its first layer
    exchange.send(0, *step_batch(rank, 3, 0))
    exchange.receive(0)
    exchange.begin_step(STEP_TOKENS, map_version=1, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                        weight_dtype=torch.float64)
    for layer in range(STEP_LAYERS):
        exchange.send(layer, *step_batch(rank, 4, layer))
        outs.append(exchange.receive(layer).clone())
    exchange.finish_step()
    pair = [dispatcher.step_exchange(micro_batch=0, timeout_s=20), exchange]
    for m, ex in enumerate(pair):
        ex.begin_step(STEP_TOKENS - m, map_version=1, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                      weight_dtype=torch.float64, group=1, group_size=2)
    pair_outs: list[list[torch.Tensor]] = [[], []]
    for m, ex in enumerate(pair):
        ex.send(0, *pair_batch(rank, m, 0))
    for layer in range(STEP_LAYERS):
        for m, ex in enumerate(pair):
            pair_outs[m].append(ex.receive(layer).clone())
            if layer + 1 < STEP_LAYERS:
                ex.send(layer + 1, *pair_batch(rank, m, layer + 1))
    for ex in pair:
        ex.finish_step()
    # the overlap schedule: each step announced before the status of the one before it is read (a ring of two)
    ring_outs, ring_steps = [], []
    for step, version in ((5, 1), (6, 7), (7, 1)):
        ring_steps.append(exchange.begin_step(STEP_TOKENS, map_version=version, num_layers=STEP_LAYERS,
                                              slots_per_worker=SLOTS_PER_WORKER, weight_dtype=torch.float64))
        for layer in range(STEP_LAYERS):
            exchange.send(layer, *step_batch(rank, step, layer))
            ring_outs.append(exchange.receive(layer).clone())
        if step == 6:
            ring = {"first": failure(lambda: exchange.finish_step(ring_steps[0]))}
    ring["second"] = failure(lambda: exchange.finish_step(ring_steps[1]))
    ring["too_old"] = failure(lambda: exchange.finish_step(ring_steps[0]))
    ring["third"] = failure(lambda: exchange.finish_step(ring_steps[2]))
    # a step to expert worker 0 alone (what a map that empties worker 1's slots gives), twice, then to both
    subset_outs = []
    for step, workers in ((8, (0,)), (9, (0,)), (10, None)):
        exchange.begin_step(STEP_TOKENS, map_version=1, num_layers=STEP_LAYERS, slots_per_worker=SLOTS_PER_WORKER,
                            weight_dtype=torch.float64, workers=workers)
        for layer in range(STEP_LAYERS):
            exchange.send(layer, *subset_batch(rank, step, layer))
            subset_outs.append(exchange.receive(layer).clone())
        exchange.finish_step()
    return {"outs": outs, "stale": stale, "pair": pair_outs, "ring": ring, "ring_outs": ring_outs,
            "subset_outs": subset_outs}


def subset_batch(rank: int, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 8 and 9 route only to worker 0's slots; step 10 anywhere."""
    return make_batch(batch_seed(rank, 400 + 10 * step + layer), STEP_TOKENS,
                      pattern="only0" if step < 10 else "random")


def expert_main(rank: int, port: int, results, control) -> None:
    torch.set_num_threads(1)
    obs: dict = {}
    experts = TestExperts(rank - NUM_ATTENTION)
    try:
        from epserve.dataplane import make_expert_server

        server = make_expert_server("cuda_ipc", rank=rank, world_size=WORLD, dist_init_addr=f"127.0.0.1:{port}",
                                    attention_ranks=list(range(NUM_ATTENTION)), timeout_s=20)
        stopped_at = []

        def report_calls() -> None:   # this rank is about to die: report what it saw first
            results.put(("expert", rank, to_bytes({"calls": experts.calls})))
            results.close()
            results.join_thread()

        experts.before_kill = report_calls

        def stop_when_told() -> None:
            control.get()
            stopped_at.append(time.monotonic())
            server.stop()

        threading.Thread(target=stop_when_told, daemon=True).start()
        server.serve(experts)
        obs["serve_returned_after_stop_s"] = time.monotonic() - stopped_at[0]
        obs["num_requests"] = server.num_requests
    except BaseException:
        obs["error"] = traceback.format_exc()
    obs["calls"] = experts.calls
    results.put(("expert", rank, to_bytes(obs)))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_world(readiness: str, deadline_s: float = 150.0):
    """Runs the plan; → (attention observations by rank, expert observations by rank, idle CPU by pid, exit codes)."""
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(NUM_ATTENTION)
    control = {r: ctx.Queue() for r in range(WORLD)}
    procs = [ctx.Process(target=attention_main, args=(r, port, results, barrier, control[r], readiness))
             for r in range(NUM_ATTENTION)]
    procs += [ctx.Process(target=expert_main, args=(r, port, results, control[r])) for r in range(NUM_ATTENTION, WORLD)]
    for p in procs:
        p.start()
    attention, experts, idle_cpu, idle = {}, {}, {}, set()
    deadline = time.monotonic() + deadline_s
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
                    time.sleep(2.0)
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


# ---- the checks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["poll", "flags"])
def world(request):
    """readiness poll (host stores), and flags: the Triton flag kernels, interpreted on the shared memory."""
    if request.param == "flags" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("readiness flags on host memory runs under the Triton interpreter (CPU machines)")
    return run_world(request.param)


def test_parity_with_local_backend_float64(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        for i, (layer, version, t, pattern) in enumerate(PARITY_BATCHES):
            got = attention[rank]["parity"][i]
            assert got.shape == (t, HIDDEN) and got.dtype == torch.float64
            assert torch.equal(got, local_result(layer, version, batch_seed(rank, i), t, pattern)), (rank, i)
        for i, (layer, version, t, pattern) in enumerate(RUNNER_BATCHES):
            expected = local_result(layer, version, batch_seed(rank, 50 + i), t, pattern)
            assert torch.equal(attention[rank]["runner"][i], expected), (rank, i)
        assert torch.equal(attention[rank]["after_errors"], local_result(0, 1, batch_seed(rank, 71), 7))
        name, message, *_ = attention[rank]["too_many"]
        assert name == "ValueError" and "--max-num-batched-tokens" in message


def test_micro_batches_in_flight_slot_reuse_and_a_dropped_one(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        expected = [local_result(5 + i % 2, 1, batch_seed(rank, 60 + i), 11 + i, "random", i % 2) for i in range(4)]
        for got, want in zip(attention[rank]["pingpong"], expected):
            assert torch.equal(got, want)
        three = attention[rank]["three_in_flight"]
        assert torch.equal(three[0], expected[2]) and torch.equal(three[1], expected[1])
        assert torch.equal(three[2], expected[0])
        assert torch.equal(attention[rank]["after_dropped"], expected[2])


def test_stale_version_and_remote_error_are_typed(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        name, message, peer, held, _ = attention[rank]["stale"]
        assert name == "StaleMapVersion" and held == HELD_VERSIONS and peer == NUM_ATTENTION
        assert "map version 7" in message
        name, message, peer, _, _ = attention[rank]["remote_error"]
        assert name == "RemoteExpertError" and "refuses layer 50" in message and peer == NUM_ATTENTION


def test_trace_context_arrives_intact(world) -> None:
    _, experts, _, _ = world
    calls = experts[NUM_ATTENTION]["calls"]
    for rank in range(NUM_ATTENTION):
        assert {trace for layer, _, _, trace in calls if layer == 10 + rank} == {TRACE[:40 + rank]}


def test_requests_that_arrive_together_are_batched(world) -> None:
    attention, experts, _, _ = world
    sizes = [[s.num_tokens for s in split_by_worker(*make_batch(batch_seed(r, 81), 5 + r)[1:], SLOTS_PER_WORKER,
                                                    WORKERS)] for r in range(NUM_ATTENTION)]
    calls = experts[NUM_ATTENTION]["calls"]                    # worker 0 is the one still alive at the end
    assert [n for layer, _, n, _ in calls if layer == 12] == [sizes[0][0] + sizes[1][0]]
    for rank in range(NUM_ATTENTION):
        assert torch.equal(attention[rank]["batched"], local_result(12, 1, batch_seed(rank, 81), 5 + rank, "random", 1))


def test_zero_tokens_need_no_traffic(world) -> None:
    attention, experts, _, _ = world
    seen = {w: {layer for layer, _, _, _ in experts[NUM_ATTENTION + w]["calls"]} for w in range(WORKERS)}
    assert 4 not in seen[0] and 4 not in seen[1]
    assert 3 not in seen[1] and {0, 1, 2, 3} <= seen[0]           # layer 3 routes to worker 0 only


def test_step_path_equals_local_reports_stale_versions_and_survives_an_abandoned_step(world) -> None:
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        steps = attention[rank]["steps"]
        assert len(steps["outs"]) == 3 * STEP_LAYERS
        for i, got in enumerate(steps["outs"]):
            step, layer = divmod(i, STEP_LAYERS)
            step = 4 if step == 2 else step                       # the step after the abandoned one
            hidden, slot_ids, weights = step_batch(rank, step, layer)
            local = make_dispatcher("local", experts=EXPERTS)
            want = local.combine(local.dispatch(BatchHeader(1, layer, 1, STEP_TOKENS), hidden, slot_ids, weights,
                                                SLOTS_PER_WORKER), 1.0)
            assert torch.equal(got, want), (rank, step, layer)
        requested, held, peer = steps["stale"]
        assert requested == 7 and held == HELD_VERSIONS and peer in (NUM_ATTENTION, NUM_ATTENTION + 1)


def test_a_step_of_two_micro_batches_announced_as_one_group_equals_local(world) -> None:
    """Slots 0 and 1 in one step (the expert side's step thread serves them as one group,
    ``cuda_ipc_step_server``), their layers interleaved: each micro-batch's partials are the local backend's."""
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        for m, outs in enumerate(attention[rank]["steps"]["pair"]):
            assert len(outs) == STEP_LAYERS
            for layer, got in enumerate(outs):
                hidden, slot_ids, weights = pair_batch(rank, m, layer)
                local = make_dispatcher("local", experts=EXPERTS)
                want = local.combine(local.dispatch(BatchHeader(1, layer, m, STEP_TOKENS - m), hidden, slot_ids,
                                                    weights, SLOTS_PER_WORKER), 1.0)
                assert torch.equal(got, want), (rank, m, layer)


def test_the_step_path_keeps_two_steps_so_the_next_is_announced_before_a_status_is_read(world) -> None:
    """Steps 5, 6 (a map version the experts do not hold) and 7 on one slot, each announced and run before
    the status of the one before it is read: each status is its own step's, a status two steps old is gone,
    and the served steps' partials are the local backend's."""
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        steps = attention[rank]["steps"]
        ring = steps["ring"]
        assert ring["first"] is None and ring["third"] is None, ring
        assert ring["second"][0] == "StaleMapVersion" and "map version 7" in ring["second"][1], ring
        assert ring["too_old"][0] == "ValueError", ring
        for i, got in enumerate(steps["ring_outs"]):
            step, layer = divmod(i, STEP_LAYERS)
            if step == 1:
                continue                                          # the stale step: zeros
            hidden, slot_ids, weights = step_batch(rank, 5 + step, layer)
            local = make_dispatcher("local", experts=EXPERTS)
            want = local.combine(local.dispatch(BatchHeader(1, layer, 1, STEP_TOKENS), hidden, slot_ids, weights,
                                                SLOTS_PER_WORKER), 1.0)
            assert torch.equal(got, want), (rank, step, layer)


def test_a_step_goes_to_the_expert_workers_it_names_and_the_others_catch_up(world) -> None:
    """Two steps to worker 0 alone (its tokens route nowhere else), then one to both: worker 1 skipped two
    step numbers and its ring entries still hold older steps; every partial is the local backend's."""
    attention, _, _, _ = world
    for rank in range(NUM_ATTENTION):
        outs = attention[rank]["steps"]["subset_outs"]
        assert len(outs) == 3 * STEP_LAYERS
        for i, got in enumerate(outs):
            step, layer = 8 + i // STEP_LAYERS, i % STEP_LAYERS
            hidden, slot_ids, weights = subset_batch(rank, step, layer)
            local = make_dispatcher("local", experts=EXPERTS)
            want = local.combine(local.dispatch(BatchHeader(1, layer, 1, STEP_TOKENS), hidden, slot_ids, weights,
                                                SLOTS_PER_WORKER), 1.0)
            assert torch.equal(got, want), (rank, step, layer)


def test_idle_deployment_does_not_spin(world) -> None:
    _, _, idle_cpu, _ = world
    assert idle_cpu and max(idle_cpu.values()) < 0.1, idle_cpu     # < 5% of a core over 2 s, every process


def test_expert_that_never_answers_times_out_and_its_late_reply_is_ignored(world) -> None:
    attention, _, _, _ = world
    name, message, peer, _, elapsed = attention[0]["timeout"]
    assert name == "DataPlaneTimeout" and peer == NUM_ATTENTION and 0.5 <= elapsed < 0.9, attention[0]["timeout"]
    assert f"expert rank {NUM_ATTENTION}" in message and f"layer {HANG_LAYER}" in message
    out, elapsed = attention[0]["after_timeout"]      # waits behind the hung compute, gets its own answer
    assert torch.equal(out, local_result(0, 1, batch_seed(0, 91), 6)) and elapsed < HANG_S + 1.0


def test_killed_expert_gives_peer_lost_within_the_deadline(world) -> None:
    attention, experts, _, exitcodes = world
    assert "serve_returned_after_stop_s" not in experts[NUM_ATTENTION + 1] and -9 in exitcodes.values()
    name, _, peer, _, elapsed = attention[1]["killed"]
    assert name == "PeerLost" and peer == NUM_ATTENTION + 1 and elapsed < 1.0
    name, message, peer, _, elapsed = attention[0]["after_kill"]
    assert name == "PeerLost" and peer == NUM_ATTENTION + 1 and elapsed < 0.1 and "not sent" in message
    assert torch.equal(attention[0]["worker0_still_ok"], local_result(1, 1, batch_seed(0, 97), 6, "only0"))


def test_stop_returns_serve_and_fails_waiting_peers_at_once(world) -> None:
    attention, experts, _, _ = world
    assert experts[NUM_ATTENTION]["serve_returned_after_stop_s"] < 1.0
    name, _, peer, _, elapsed = attention[1]["after_stop"]
    assert name == "PeerLost" and peer == NUM_ATTENTION and elapsed < 0.5


def test_join_without_experts_times_out_naming_the_rank() -> None:
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    start = time.monotonic()
    with pytest.raises(DataPlaneTimeout, match="expert rank 1") as info:
        make_dispatcher("cuda_ipc", rank=0, world_size=2, dist_init_addr=f"127.0.0.1:{port}", expert_ranks=[1],
                        timeout_s=1.0, device="cpu", max_tokens=4, hidden_size=HIDDEN, top_k=TOP_K,
                        dtype=torch.float64)
    assert info.value.peer_rank == 1 and time.monotonic() - start < 5
