"""What the spawned ranks of test_dataplane_torch_elastic.py run (importable by spawn).

Legend: T tokens, D hidden, K top-k, S slots per worker.

One attention rank (rank 0) and expert ranks 1, 2 (and 3 later), torch backend joined lazily:
links are formed on first use and formed again after a peer restarts, a wait timed out, the
store restarted, or the attention side itself started over. The parent drives the plan through
``control`` queues and kills / starts expert processes between the steps.
"""

from __future__ import annotations

import time
import traceback

import torch

from dataplane_worlds import HANG_LAYER, SLOTS_PER_WORKER, TestExperts, to_bytes
from epserve.dataplane import BatchHeader

NUM_WORKERS_LATER = 3          # expert rank 3 joins mid-way (scale-out)


def batch(seed: int, num_tokens: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, D], slot_ids [T, 3] over ``num_workers`` × S slots, weights [T, 3] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 16, generator=gen, dtype=torch.float64)
    slot_ids = torch.rand(num_tokens, num_workers * SLOTS_PER_WORKER, generator=gen).topk(3, dim=1).indices
    weights = torch.rand(num_tokens, 3, generator=gen, dtype=torch.float64).softmax(dim=1)
    return hidden, slot_ids.to(torch.int64), weights


def expected(layer: int, seed: int, num_tokens: int, num_workers: int) -> torch.Tensor:
    from epserve.dataplane import make_dispatcher

    local = make_dispatcher("local", experts=[TestExperts(w) for w in range(num_workers)])
    hidden, slot_ids, weights = batch(seed, num_tokens, num_workers)
    pending = local.dispatch(BatchHeader(1, layer, 0, num_tokens), hidden, slot_ids, weights, SLOTS_PER_WORKER)
    return local.combine(pending, 1.0)


def expert_main(rank: int, port: int, num_attention: int) -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format=f"%(relativeCreated)d expert {rank}: %(message)s")
    torch.set_num_threads(1)
    from epserve.dataplane import make_expert_server

    server = make_expert_server("torch", rank=rank, world_size=rank + 1, dist_init_addr=f"127.0.0.1:{port}",
                                attention_ranks=list(range(num_attention)), timeout_s=5, eager=False)
    server.serve(TestExperts(rank - num_attention))


def attention_main(port: int, control, results) -> None:
    """Runs the plan; puts ("step", name, observation bytes) after each step and waits for "go"."""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d attention: %(message)s")
    torch.set_num_threads(1)
    from epserve.dataplane import PeerLost, make_dispatcher

    def new_dispatcher():
        return make_dispatcher("torch", rank=0, world_size=3, dist_init_addr=f"127.0.0.1:{port}",
                               expert_ranks=[1, 2], timeout_s=5, eager=False)

    def run(dispatcher, layer, seed, num_tokens=9, num_workers=2, timeout_s=5.0, attempt=0):
        hidden, slot_ids, weights = batch(seed, num_tokens, num_workers)
        header = BatchHeader(1, layer, 0, num_tokens, attempt=attempt)
        return dispatcher.combine(dispatcher.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), timeout_s)

    def until_ok(call, within_s=8.0):
        """Retry ``call`` on PeerLost (a peer or the store is still coming back); → (result, tries)."""
        deadline, tries = time.monotonic() + within_s, 0
        while True:
            tries += 1
            try:
                return call(), tries
            except PeerLost:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def report(name, obs):
        results.put(("step", name, to_bytes(obs)))
        assert control.get(timeout=60) == "go"

    try:
        dispatcher = new_dispatcher()
        start = time.monotonic()
        report("first_use", {"out": run(dispatcher, 0, 1, attempt=1), "elapsed": time.monotonic() - start})
        # the parent killed expert rank 2 and started a new process on that rank
        try:
            run(dispatcher, 0, 2)
            lost = None
        except PeerLost as exc:
            lost = exc.peer_rank
        out, tries = until_ok(lambda: (dispatcher.reconnect(2), run(dispatcher, 0, 3, attempt=2))[1])
        report("restarted_expert", {"lost": lost, "out": out, "tries": tries})
        # expert rank 1 does not answer in time: the link ends; a new epoch with the same process works
        try:
            run(dispatcher, HANG_LAYER, 4, timeout_s=0.3)
            timed_out = False
        except TimeoutError:
            timed_out = True
        time.sleep(1.0)                                   # let the hung compute finish
        dispatcher.reconnect(1)
        report("after_timeout", {"timed_out": timed_out, "out": run(dispatcher, 0, 5)})
        # the attention side starts over (a restarted attention worker): the experts take its new links
        replacement = new_dispatcher()
        report("new_attention_process", {"out": run(replacement, 0, 6)})
        # the parent restarted the store on the same port: new links still form (acceptors resync)
        out, tries = until_ok(lambda: (replacement.reconnect(1), replacement.reconnect(2),
                                       run(replacement, 0, 7))[2])
        report("store_restarted", {"out": out, "tries": tries})
        # expert rank 3 joined: a map over 3 workers reaches it
        report("scale_out", {"out": run(replacement, 0, 8, num_workers=NUM_WORKERS_LATER)})
        replacement.close()
    except BaseException:
        results.put(("error", "", traceback.format_exc()))
