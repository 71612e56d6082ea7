"""Helpers for the data-plane tests: deterministic batches, test experts, and the code each
spawned rank runs (importable by ``torch.multiprocessing`` spawn).

Legend: T tokens, D hidden, K top-k, P physical slots, W expert workers, S slots per worker.

Test experts (``TestExperts``) behave by MoE layer:
- layers 0-19: per-slot diagonal affine experts ``x * a[s] + b[s]`` — elementwise, so a token's
  result does not depend on which other tokens share its batch: exact parity under batching.
- layer ``RUNNER_LAYER``: the real ``epserve.moe_runner`` torch runner (SiLU-gated MLP per slot).
- layer ``SLOW_LAYER``: the first call sleeps ``SLOW_S`` (to make requests queue up).
- layer ``HANG_LAYER``: worker 0 sleeps ``HANG_S`` (an expert that does not answer in time).
- layer ``KILL_LAYER``: worker 1 SIGKILLs its own process.
- layer ``ERROR_LAYER``: raises ValueError.
Map versions ``HELD_VERSIONS`` are held; others raise StaleMapVersion.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import traceback

import torch

from epserve.dataplane import BatchHeader, StaleMapVersion, split_by_worker
from epserve.moe_runner import make_moe_runner

HIDDEN, TOP_K, SLOTS, WORKERS, INTER = 16, 3, 8, 2, 8
SLOTS_PER_WORKER = SLOTS // WORKERS
NUM_ATTENTION = 2
HELD_VERSIONS = (1, 2)
RUNNER_LAYER, SLOW_LAYER, HANG_LAYER, KILL_LAYER, ERROR_LAYER = 20, 21, 30, 40, 50
SLOW_S, HANG_S = 0.4, 1.0
TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_batch(seed: int, num_tokens: int, dtype: torch.dtype = torch.float64,
               pattern: str = "random") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ hidden [T, D], slot_ids [T, K] (distinct physical slots per token), weights [T, K].

    pattern "random" also forces token 0 onto worker 0 only and token 1 onto worker 1 only;
    "only0" / "only1" route every token to that worker's slots (the other gets nothing).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    scores = torch.rand(num_tokens, SLOTS, generator=gen)
    if pattern == "only0":
        scores[:, SLOTS_PER_WORKER:] -= 2.0
    if pattern == "only1":
        scores[:, :SLOTS_PER_WORKER] -= 2.0
    slot_ids = scores.topk(TOP_K, dim=1).indices                                      # [T, K]
    if pattern == "random" and num_tokens >= 1:
        slot_ids[0] = torch.arange(TOP_K)                                              # all on worker 0
    if pattern == "random" and num_tokens >= 2:
        slot_ids[1] = SLOTS_PER_WORKER + torch.arange(TOP_K)                           # all on worker 1
    weights = torch.rand(num_tokens, TOP_K, generator=gen, dtype=torch.float64).softmax(dim=1).to(dtype)
    return hidden, slot_ids.to(torch.int64), weights


class TestExperts:
    """The ExpertCompute of expert worker ``worker`` (slot ids local to it)."""

    __test__ = False   # not a pytest class

    def __init__(self, worker: int, dtype: torch.dtype = torch.float64) -> None:
        gen = torch.Generator().manual_seed(1000 + worker)
        s = SLOTS_PER_WORKER
        self.worker = worker
        self.scale = torch.randn(s, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)       # [S, D]
        self.bias = torch.randn(s, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)        # [S, D]
        self.w13 = (torch.randn(s, 2 * INTER, HIDDEN, generator=gen, dtype=torch.float64) / 4).to(dtype)
        self.w2 = (torch.randn(s, HIDDEN, INTER, generator=gen, dtype=torch.float64) / 3).to(dtype)
        self.runner = make_moe_runner("torch")
        self.calls: list[tuple[int, int, int, bytes]] = []   # (layer, version, n, trace_context)
        self._slow_done = False
        self.before_kill = lambda: None

    def __call__(self, header: BatchHeader, hidden: torch.Tensor, local_slot_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        self.calls.append((header.layer, header.map_version, int(hidden.shape[0]), header.trace_context))
        if header.map_version not in HELD_VERSIONS:
            raise StaleMapVersion(requested=header.map_version, held_versions=HELD_VERSIONS)
        layer = header.layer
        if layer == SLOW_LAYER and not self._slow_done:
            self._slow_done = True
            time.sleep(SLOW_S)
        if layer == HANG_LAYER and self.worker == 0:
            time.sleep(HANG_S)
        if layer == KILL_LAYER and self.worker == 1:
            self.before_kill()
            os.kill(os.getpid(), signal.SIGKILL)
        if layer == ERROR_LAYER:
            raise ValueError("this expert refuses layer 50")
        if layer == RUNNER_LAYER:
            return self.runner.run(hidden, local_slot_ids, weights, self.w13, self.w2)
        return self.diagonal(hidden, local_slot_ids, weights)

    def diagonal(self, hidden: torch.Tensor, local_slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · (x * a[s_k] + b[s_k]) over local slots, row by row independent of batch."""
        out = torch.zeros_like(hidden)
        for k in range(local_slot_ids.shape[1]):
            ids = local_slot_ids[:, k]
            keep = (ids >= 0).to(hidden.dtype).unsqueeze(1)                                # [n, 1]
            safe = ids.clamp(min=0)
            out += (weights[:, k].unsqueeze(1) * keep) * (hidden * self.scale[safe] + self.bias[safe])
        return out

    def dense_slot(self, slot: int, x: torch.Tensor, layer: int) -> torch.Tensor:
        """expert_slot(x) for local slot ``slot`` → [D] (for the dense reference)."""
        if layer == RUNNER_LAYER:
            gate_up = self.w13[slot] @ x
            act = torch.nn.functional.silu(gate_up[:INTER]) * gate_up[INTER:]
            return self.w2[slot] @ act
        return x * self.scale[slot] + self.bias[slot]


def dense_reference(experts: list[TestExperts], layer: int, hidden: torch.Tensor, slot_ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w[t, k] · expert_{slot[t, k]}(x_t), token by token."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(slot_ids.shape[1]):
            slot = int(slot_ids[t, k])
            if slot >= 0:
                worker, local = divmod(slot, SLOTS_PER_WORKER)
                out[t] += weights[t, k] * experts[worker].dense_slot(local, hidden[t], layer)
    return out


# ---- the plan each attention rank runs in the torch world --------------------------------------

PARITY_BATCHES = [  # (layer, version, T, pattern); seed = 100 * rank + index
    (0, 1, 37, "random"), (1, 2, 5, "random"), (2, 1, 1, "random"), (3, 1, 64, "only0"), (4, 2, 0, "random"),
    (6, 1, 3000, "random"),   # > INLINE_CAPACITY per worker: header and payload go as two messages
]
RUNNER_BATCHES = [(RUNNER_LAYER, 1, 9, "random"), (RUNNER_LAYER, 2, 23, "random")]


def batch_seed(rank: int, index: int) -> int:
    return 100 * rank + index


def attention_rank_main(rank: int, port: int, results, barrier, control, world_size: int) -> None:
    """One attention rank: runs the plan, puts ("attention", rank, observations) on ``results``."""
    torch.set_num_threads(1)
    obs: dict = {}
    try:
        from epserve.dataplane import make_dispatcher

        dispatcher = make_dispatcher("torch", rank=rank, world_size=world_size, dist_init_addr=f"127.0.0.1:{port}",
                                     expert_ranks=list(range(NUM_ATTENTION, world_size)), timeout_s=20)
        _run_plan(rank, dispatcher, obs, results, barrier, control)
        dispatcher.close()
    except BaseException:
        obs["error"] = traceback.format_exc()
    results.put(("attention", rank, to_bytes(obs)))


def _run_plan(rank: int, dispatcher, obs: dict, results, barrier, control) -> None:
    from epserve.dataplane import DataPlaneTimeout, PeerLost

    def run(layer, version, seed, num_tokens, pattern, micro_batch=0, trace=b"", timeout_s=20.0):
        hidden, slot_ids, weights = make_batch(seed, num_tokens, pattern=pattern)
        header = BatchHeader(version, layer, micro_batch, num_tokens, trace)
        return dispatcher.combine(dispatcher.dispatch(header, hidden, slot_ids, weights, SLOTS_PER_WORKER), timeout_s)

    # 1. parity, both ranks at once (diagonal experts: exact under any batching)
    obs["parity"] = [run(layer, v, batch_seed(rank, i), t, p) for i, (layer, v, t, p) in enumerate(PARITY_BATCHES)]
    # 2. the real MoE runner, one rank at a time (each expert computes exactly one request per call)
    obs["runner"] = []
    for turn in range(NUM_ATTENTION):
        barrier.wait(40)
        if turn == rank:
            obs["runner"] = [run(layer, v, batch_seed(rank, 50 + i), t, p) for i, (layer, v, t, p)
                             in enumerate(RUNNER_BATCHES)]
    barrier.wait(40)
    # 3. two micro-batches in flight, combined in both orders
    batches = [make_batch(batch_seed(rank, 60 + i), 11 + i) for i in range(4)]
    headers = [BatchHeader(1, 5 + i % 2, i % 2, 11 + i) for i in range(4)]
    p0, p1 = (dispatcher.dispatch(headers[i], *batches[i], SLOTS_PER_WORKER) for i in (0, 1))
    obs["pingpong"] = [dispatcher.combine(p0, 20), dispatcher.combine(p1, 20)]
    p2, p3 = (dispatcher.dispatch(headers[i], *batches[i], SLOTS_PER_WORKER) for i in (2, 3))
    out3 = dispatcher.combine(p3, 20)
    obs["pingpong"] += [dispatcher.combine(p2, 20), out3]
    # 3b. a micro-batch abandoned without combine (its caller gave up) does not block the links
    kept = dispatcher.dispatch(headers[0], *batches[0], SLOTS_PER_WORKER)
    dispatcher.dispatch(headers[1], *batches[1], SLOTS_PER_WORKER)     # dropped at once
    obs["abandoned"] = [dispatcher.combine(kept, 20)] + [run(5, 1, batch_seed(rank, 60 + i), 11 + i, "random",
                                                             timeout_s=5) for i in (2, 3)]
    # 4. stale version, remote error; the links stay usable
    for name, layer, version in (("stale", 0, 7), ("remote_error", ERROR_LAYER, 1)):
        try:
            run(layer, version, batch_seed(rank, 70), 6, "random")
            obs[name] = None
        except Exception as exc:
            obs[name] = (type(exc).__name__, str(exc), getattr(exc, "held_versions", None),
                         getattr(exc, "peer_rank", None))
    obs["after_errors"] = run(0, 1, batch_seed(rank, 71), 7, "random")
    # 5. trace context: a layer only this rank uses, one request at a time
    run(10 + rank, 1, batch_seed(rank, 72), 4, "random", trace=TRACE[:40 + rank])
    # 6. batching: rank 0 sends mb0 on SLOW_LAYER, then mb1 and mb2 on layer 12 while the experts are busy
    if rank == 0:
        first = make_batch(batch_seed(rank, 80), 8)
        later = [make_batch(batch_seed(rank, 81 + i), 5 + i) for i in range(2)]
        pend = [dispatcher.dispatch(BatchHeader(1, SLOW_LAYER, 0, 8), *first, SLOTS_PER_WORKER)]
        time.sleep(0.1)
        pend += [dispatcher.dispatch(BatchHeader(1, 12, 1 + i, 5 + i), *later[i], SLOTS_PER_WORKER) for i in range(2)]
        obs["batched"] = [dispatcher.combine(p, 20) for p in pend]
        obs["batched_sizes"] = [[s.num_tokens for s in split_by_worker(b[1], b[2], SLOTS_PER_WORKER, WORKERS)]
                                for b in later]
    barrier.wait(40)
    # 7. idle: the parent measures every rank's CPU time while all wait here
    results.put(("idle", rank, None))
    assert control.get(timeout=30) == "idle measured"
    barrier.wait(40)
    # 8. rank 0: expert 0 does not answer in time → DataPlaneTimeout; then PeerLost for worker 0 only
    if rank == 0:
        start = time.monotonic()
        try:
            run(HANG_LAYER, 1, batch_seed(rank, 90), 6, "random", timeout_s=0.5)
            obs["timeout"] = None
        except DataPlaneTimeout as exc:
            obs["timeout"] = (time.monotonic() - start, exc.peer_rank, exc.layer, exc.micro_batch, str(exc))
        start = time.monotonic()
        try:
            run(0, 1, batch_seed(rank, 91), 6, "random")
            obs["after_timeout"] = None
        except PeerLost as exc:
            obs["after_timeout"] = (time.monotonic() - start, exc.peer_rank)
        obs["worker1_still_ok"] = run(0, 1, batch_seed(rank, 92), 6, "only1")
    barrier.wait(40)
    # 9. rank 1: expert 1 is killed mid-exchange → PeerLost fast; rank 0 then sees worker 1 gone
    if rank == 1:
        obs["served_after_other_link_lost"] = run(0, 1, batch_seed(rank, 94), 6, "only0")   # expert 0 lost rank 0
        start = time.monotonic()
        try:
            run(KILL_LAYER, 1, batch_seed(rank, 95), 6, "only1", timeout_s=20)
            obs["killed"] = None
        except (PeerLost, DataPlaneTimeout) as exc:
            obs["killed"] = (time.monotonic() - start, type(exc).__name__, exc.peer_rank, str(exc))
    barrier.wait(40)
    if rank == 0:
        start = time.monotonic()
        try:
            run(1, 1, batch_seed(rank, 96), 6, "only1", timeout_s=5)
            obs["after_kill"] = None
        except (PeerLost, DataPlaneTimeout) as exc:
            obs["after_kill"] = (time.monotonic() - start, type(exc).__name__, exc.peer_rank)
    # 10. rank 1: the parent stops expert 0; its links close, so the next exchange fails at once
    if rank == 1:
        results.put(("ready_for_stop", rank, None))
        assert control.get(timeout=30) == "experts stopped"
        start = time.monotonic()
        try:
            run(0, 1, batch_seed(rank, 97), 6, "only0", timeout_s=5)
            obs["after_stop"] = None
        except (PeerLost, DataPlaneTimeout) as exc:
            obs["after_stop"] = (time.monotonic() - start, type(exc).__name__, exc.peer_rank)


def expert_rank_main(rank: int, port: int, results, control, world_size: int) -> None:
    """One expert rank: serves ``TestExperts`` until told to stop on ``control``; reports its calls."""
    torch.set_num_threads(1)
    obs: dict = {}
    worker = rank - NUM_ATTENTION
    experts = TestExperts(worker)
    try:
        from epserve.dataplane import make_expert_server

        server = make_expert_server("torch", rank=rank, world_size=world_size, dist_init_addr=f"127.0.0.1:{port}",
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


def to_bytes(obj) -> bytes:
    """Observations travel as bytes: tensors shared through the queue need their sender alive."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)
