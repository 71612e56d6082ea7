"""The torch data plane on NCCL: one attention rank on cuda:0, one expert rank on cuda:1 (needs two GPUs).

The attention rank dispatches the parity batches' shapes of ``dataplane_worlds`` in float32 (every
slot on the one expert worker: pattern "only0") and combines the answers; the expert rank serves ``TestExperts`` on its GPU. Every result must equal what the local
backend computes on the CPU (float32 on both sides, so within float32 rounding of the device's sums).
Skipped where fewer than two GPUs are visible (CI, the one-GPU device machine).
"""

from __future__ import annotations

import queue

import pytest
import torch
import torch.multiprocessing as mp
from dataplane_worlds import (
    PARITY_BATCHES,
    SLOTS_PER_WORKER,
    TestExperts,
    batch_seed,
    make_batch,
)

from epserve.dataplane import BatchHeader, make_dispatcher
from epserve.dataplane.torch_group import start_rendezvous_store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
DTYPE = torch.float32


class ExpertsOnDevice(TestExperts):
    """TestExperts of worker 0 with their tensors on ``device``."""

    __test__ = False

    def __init__(self, device: str) -> None:
        super().__init__(0, DTYPE)
        for name in ("scale", "bias", "w13", "w2"):
            setattr(self, name, getattr(self, name).to(device))


def attention_main(port: int, results) -> None:
    try:
        dispatcher = make_dispatcher("torch", rank=0, world_size=2, dist_init_addr=f"127.0.0.1:{port}",
                                     expert_ranks=[1], timeout_s=60, device="cuda:0")
        outs = []
        for index, (layer, version, num_tokens, _) in enumerate(PARITY_BATCHES):
            hidden, slot_ids, weights = make_batch(batch_seed(0, index), num_tokens, DTYPE, pattern="only0")
            handle = dispatcher.dispatch(BatchHeader(version, layer, 0, num_tokens), hidden.cuda(0),
                                         slot_ids.cuda(0), weights.cuda(0), SLOTS_PER_WORKER)
            outs.append(dispatcher.combine(handle, 30.0).cpu())
        dispatcher.close()
        results.put(("attention", outs))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))


def expert_main(port: int, results, stop) -> None:
    try:
        import threading

        from epserve.dataplane import make_expert_server

        torch.cuda.set_device(1)
        server = make_expert_server("torch", rank=1, world_size=2, dist_init_addr=f"127.0.0.1:{port}",
                                    attention_ranks=[0], timeout_s=60, device="cuda:1")
        threading.Thread(target=lambda: (stop.get(), server.stop()), daemon=True).start()
        server.serve(ExpertsOnDevice("cuda:1"))
        results.put(("expert", "stopped"))
    except BaseException as exc:  # noqa: BLE001
        results.put(("error", repr(exc)))


def test_nccl_between_two_gpus_matches_the_local_backend():
    _store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=attention_main, args=(port, results)),
             ctx.Process(target=expert_main, args=(port, results, stop))]
    for p in procs:
        p.start()
    try:
        kind, payload = results.get(timeout=180)
        assert kind == "attention", payload
        stop.put("stop")
    except queue.Empty:
        pytest.fail("the NCCL world did not finish within 180 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    local = make_dispatcher("local", experts=[TestExperts(0, DTYPE)])
    for index, ((layer, version, num_tokens, _), got) in enumerate(zip(PARITY_BATCHES, payload)):
        hidden, slot_ids, weights = make_batch(batch_seed(0, index), num_tokens, DTYPE, pattern="only0")
        want = local.combine(local.dispatch(BatchHeader(version, layer, 0, num_tokens), hidden, slot_ids, weights,
                                            SLOTS_PER_WORKER), 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
