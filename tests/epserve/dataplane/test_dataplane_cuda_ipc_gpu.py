"""cuda_ipc on one GPU with real processes: 1 attention rank + 2 expert ranks, channels in GPU memory
shared by CUDA IPC handle, readiness by device flags and by IPC events; bf16 outputs equal the local
backend's bit for bit (diagonal test experts on the GPU). The step path (device flags in both cases)
runs eagerly and replayed from a CUDA graph. Skipped without CUDA."""

from __future__ import annotations

import queue
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dataplane_worlds import HIDDEN, SLOTS_PER_WORKER, TOP_K, WORKERS, TestExperts, from_bytes, make_batch, to_bytes
from epserve.dataplane import BatchHeader, make_dispatcher
from epserve.dataplane.torch_group import start_rendezvous_store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORLD = 1 + WORKERS
DTYPE = torch.bfloat16
BATCHES = [(0, 1, "random"), (1, 37, "random"), (2, 300, "only0"), (3, 64, "only1")]   # (layer, T, pattern)
STEP_TOKENS, STEP_LAYERS = 8, 3


def gpu_experts() -> list[TestExperts]:
    experts = [TestExperts(w, DTYPE) for w in range(WORKERS)]
    for e in experts:
        e.scale, e.bias = e.scale.cuda(), e.bias.cuda()
    return experts


def gpu_batch(seed: int, num_tokens: int, pattern: str = "random"):
    hidden, slot_ids, weights = make_batch(seed, num_tokens, pattern=pattern)
    return hidden.to("cuda", DTYPE), slot_ids.cuda(), weights.to("cuda", torch.float32)


def local_out(experts, layer: int, micro_batch: int, batch) -> torch.Tensor:
    local = make_dispatcher("local", experts=experts)
    header = BatchHeader(1, layer, micro_batch, batch[0].shape[0])
    return local.combine(local.dispatch(header, *batch, SLOTS_PER_WORKER), 5.0)


def attention_main(port: int, readiness: str, results) -> None:
    obs: dict = {}
    try:
        torch.cuda.set_device(0)
        experts = gpu_experts()
        dispatcher = make_dispatcher("cuda_ipc", rank=0, world_size=WORLD, dist_init_addr=f"127.0.0.1:{port}",
                                     expert_ranks=[1, 2], timeout_s=60, device="cuda", max_tokens=512,
                                     hidden_size=HIDDEN, top_k=TOP_K, dtype=DTYPE, readiness=readiness)
        equal = []
        for layer, t, pattern in BATCHES:
            batch = gpu_batch(layer, t, pattern)
            out = dispatcher.combine(dispatcher.dispatch(BatchHeader(1, layer, 0, t), *batch, SLOTS_PER_WORKER), 60)
            equal.append(torch.equal(out, local_out(experts, layer, 0, batch)))
        batches = [gpu_batch(10 + i, 9 + i) for i in range(2)]
        pending = [dispatcher.dispatch(BatchHeader(1, 5, i, 9 + i), *batches[i], SLOTS_PER_WORKER) for i in range(2)]
        for i in (1, 0):
            equal.append(torch.equal(dispatcher.combine(pending[i], 60), local_out(experts, 5, i, batches[i])))
        obs["host_path_equal"] = equal
        try:
            dispatcher.combine(dispatcher.dispatch(BatchHeader(7, 0, 0, 3), *gpu_batch(20, 3), SLOTS_PER_WORKER), 60)
        except Exception as exc:
            obs["stale"] = (type(exc).__name__, getattr(exc, "held_versions", None))
        obs["steps_equal"] = run_steps(dispatcher, experts)     # device flags with either per-message kind
        dispatcher.check_device_errors()
        dispatcher.close()
    except BaseException:
        obs["error"] = traceback.format_exc()
    results.put(("attention", 0, to_bytes(obs)))


def run_steps(dispatcher, experts) -> list[bool]:
    """Two eager steps, then three graph replays of a captured step, each layer against local."""
    exchange = dispatcher.step_exchange(micro_batch=1, timeout_s=60)
    equal = []

    def check(step_inputs, outs) -> None:
        for layer, (batch, out) in enumerate(zip(step_inputs, outs)):
            equal.append(torch.equal(out, local_out(experts, layer, 1, batch)))

    for step in range(2):
        inputs = [gpu_batch(100 + 10 * step + layer, STEP_TOKENS) for layer in range(STEP_LAYERS)]
        exchange.begin_step(STEP_TOKENS, 1, STEP_LAYERS, SLOTS_PER_WORKER)
        outs = []
        for layer, batch in enumerate(inputs):
            exchange.send(layer, *batch)
            outs.append(exchange.receive(layer).clone())
        exchange.finish_step()
        check(inputs, outs)
    static = [tuple(t.clone() for t in gpu_batch(0, STEP_TOKENS)) for _ in range(STEP_LAYERS)]
    exchange.begin_step(STEP_TOKENS, 1, STEP_LAYERS, SLOTS_PER_WORKER)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = []
        for layer, batch in enumerate(static):
            exchange.send(layer, *batch)
            outs.append(exchange.receive(layer))
    for step in range(3):
        if step:
            exchange.begin_step(STEP_TOKENS, 1, STEP_LAYERS, SLOTS_PER_WORKER)
        inputs = [gpu_batch(200 + 10 * step + layer, STEP_TOKENS) for layer in range(STEP_LAYERS)]
        for dst, src in zip(static, inputs):
            for d, s in zip(dst, src):
                d.copy_(s)
        graph.replay()
        exchange.finish_step()
        check(inputs, [o.clone() for o in outs])
    return equal


def expert_main(rank: int, port: int, results, stop) -> None:
    obs: dict = {}
    try:
        torch.cuda.set_device(0)
        from epserve.dataplane import make_expert_server

        server = make_expert_server("cuda_ipc", rank=rank, world_size=WORLD, dist_init_addr=f"127.0.0.1:{port}",
                                    attention_ranks=[0], timeout_s=60)
        import threading

        threading.Thread(target=lambda: (stop.get(), server.stop()), daemon=True).start()
        server.serve(gpu_experts()[rank - 1])
        obs["num_requests"] = server.num_requests
    except BaseException:
        obs["error"] = traceback.format_exc()
    results.put(("expert", rank, to_bytes(obs)))


@pytest.mark.parametrize("readiness", ["flags", "events"])
def test_two_processes_on_one_gpu_equal_local(readiness: str) -> None:
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    stops = {r: ctx.Queue() for r in (1, 2)}
    procs = [ctx.Process(target=attention_main, args=(port, readiness, results))]
    procs += [ctx.Process(target=expert_main, args=(r, port, results, stops[r])) for r in (1, 2)]
    for p in procs:
        p.start()
    observed: dict = {}
    deadline = time.monotonic() + 240
    try:
        while len(observed) < WORLD:
            try:
                kind, rank, payload = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail(f"the GPU world did not finish in time; reported: {observed}")
            observed[(kind, rank)] = from_bytes(payload)
            if kind == "attention":
                for q in stops.values():
                    q.put("stop")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for key, obs in observed.items():
        assert "error" not in obs, f"{key} failed:\n{obs['error']}"
    attention = observed[("attention", 0)]
    assert attention["host_path_equal"] and all(attention["host_path_equal"]), attention["host_path_equal"]
    assert attention["stale"] == ("StaleMapVersion", (1, 2))
    assert len(attention["steps_equal"]) == 5 * STEP_LAYERS and all(attention["steps_equal"])
