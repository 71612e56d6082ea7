"""The torch data plane's links with real processes: each (attention, expert) link is its own
rendezvous, formed on first use and formed again after a peer restarts, a wait times out, the
store restarts or the attention side starts over; a new expert rank is reached by a map with
more workers. One attention rank, expert ranks 1 and 2 (3 joins later); float64 diagonal test
experts (``dataplane_worlds.TestExperts``), so results must equal the local backend's exactly.
"""

from __future__ import annotations

import queue
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataplane_worlds import from_bytes
from elastic_worlds import attention_main, expected, expert_main
from epserve.dataplane import BatchHeader
from epserve.dataplane.torch_group import start_rendezvous_store
from epserve.dataplane.torch_links import STORE_PREFIX, incarnation_key
from epserve.dataplane.torch_wire import Kind, WireHeader, decode_header, encode_header

pytestmark = pytest.mark.timeout(180)


def test_attempt_travels_in_the_wire_header() -> None:
    header = WireHeader(Kind.REPLY, 9, BatchHeader(4, 2, 1, 5, b"trace", attempt=1234), 2, 16)
    assert decode_header(encode_header(header)).batch.attempt == 1234
    with pytest.raises(ValueError, match="attempt"):
        BatchHeader(1, 0, 0, 1, attempt=-1)


def _token(store: dist.TCPStore, rank: int) -> bytes | None:
    scoped, key = dist.PrefixStore(STORE_PREFIX, store), incarnation_key(rank)
    return scoped.get(key) if scoped.check([key]) else None


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_links_form_again_after_restarts_timeouts_and_a_store_restart() -> None:
    store, port = start_rendezvous_store("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    control, results = ctx.Queue(), ctx.Queue()
    experts = {rank: ctx.Process(target=expert_main, args=(rank, port, 1), daemon=True) for rank in (1, 2)}
    attention = ctx.Process(target=attention_main, args=(port, control, results), daemon=True)
    for process in (*experts.values(), attention):
        process.start()
    steps: dict[str, dict] = {}

    def next_step(name: str) -> dict:
        try:
            kind, step, payload = results.get(timeout=90)
        except queue.Empty:
            pytest.fail(f"no result for {name}; so far {sorted(steps)}")
        assert kind == "step", payload
        assert step == name
        steps[name] = from_bytes(payload)
        return steps[name]

    try:
        first = next_step("first_use")
        assert torch.equal(first["out"], expected(0, 1, 9, 2))
        # kill -9 expert rank 2, start a new process on that rank
        old_token = _token(store, 2)
        experts[2].kill()
        experts[2].join()
        experts[2] = ctx.Process(target=expert_main, args=(2, port, 1), daemon=True)
        experts[2].start()
        _wait(lambda: _token(store, 2) not in (None, old_token), 60, "the restarted expert's incarnation")
        control.put("go")
        restarted = next_step("restarted_expert")
        assert restarted["lost"] == 2 and torch.equal(restarted["out"], expected(0, 3, 9, 2))
        control.put("go")
        after_timeout = next_step("after_timeout")
        assert after_timeout["timed_out"] and torch.equal(after_timeout["out"], expected(0, 5, 9, 2))
        control.put("go")
        assert torch.equal(next_step("new_attention_process")["out"], expected(0, 6, 9, 2))
        # placement restarts: a fresh store on the same port (every key gone)
        del store
        store, _ = start_rendezvous_store("127.0.0.1", port)
        control.put("go")
        assert torch.equal(next_step("store_restarted")["out"], expected(0, 7, 9, 2))
        experts[3] = ctx.Process(target=expert_main, args=(3, port, 1), daemon=True)
        experts[3].start()
        _wait(lambda: _token(store, 3) is not None, 60, "expert rank 3")
        control.put("go")
        assert torch.equal(next_step("scale_out")["out"], expected(0, 8, 9, 3))
        control.put("go")
        attention.join(timeout=20)
        assert attention.exitcode == 0
    finally:
        for process in (*experts.values(), attention):
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
