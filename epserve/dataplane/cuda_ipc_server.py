"""``--moe-a2a-backend cuda_ipc``, expert side: poll every channel, batch what arrived, reply in place.

Legend: n tokens of one request, N tokens of a batch, D hidden, K top-k, M micro-batch slots.

Threads: the thread that calls ``serve`` does everything for per-message requests; one
thread per attention rank serves that rank's steps on the CUDA-graph path (``cuda_ipc_step_server``,
started on the rank's first step announcement, blocking on a queue otherwise): every micro-batch slot
of a step, enqueued in the rank's order (a slot's thread of its own could wait on the host while the
other slot's kernels waited on it). ``serve`` hands that thread each announcement it has not seen yet
(each channel's ring holds two), in the rank's step order across its channels (``_start_steps``). The
threads share one ``StepGate`` (``cuda_ipc_gate``): a graph is
captured only while no step is in flight on the device. No thread spins: ``serve`` polls the sequence
numbers of every open channel with ``Backoff`` (idle: one pass per ``idle_sleep_s``, default 2 ms, a
fraction of a percent of a core).

One pass of ``serve``: for each channel whose REQ_SEQ is past the last one served, read the
header and views of its input (``readiness.before_read`` first); group the requests by (layer,
map version, dtypes) in channel order, call ``compute`` once per group (one request: on the
shared memory itself; several: concatenated), and for each request, if it is still its
channel's current one (REQ_SEQ unchanged — an attention rank that gave up has moved on and no
longer reads it), write the partial into the channel's output region, ``readiness.after_write``,
the reply header, then RSP_SEQ. Replies carry OK, STALE_VERSION (with the versions the compute
says it holds) or ERROR (the exception's text).
Every 0.5 s the attention processes are checked; a dead or closed rank's channels are no longer
polled. ``stop()`` (any thread) makes ``serve`` return within one pass; it marks every channel
STOPPED first, so attention ranks waiting on this rank get ``PeerLost`` at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from epserve.dataplane.base import BatchHeader, ExpertCompute, StaleMapVersion
from epserve.dataplane.cuda_ipc_gate import StepGate
from epserve.dataplane.cuda_ipc_join import ExpertLink
from epserve.dataplane.cuda_ipc_layout import (ATTENTION_STATE, DTYPES, EXPERT_STATE, REQ_DTYPE,
                                               REQ_LAYER, REQ_MAP_VERSION, REQ_MICRO_BATCH, REQ_NUM_TOKENS, REQ_SEQ,
                                               REQ_TRACE, REQ_WEIGHT_DTYPE, RSP_SEQ, RSP_STATUS, STEP_GROUP,
                                               STEP_RING, STEP_SEQ, AttentionState, Channel, ExpertState, Flag,
                                               Status, read_trace, write_status)
from epserve.dataplane.cuda_ipc_peers import Backoff

logger = logging.getLogger(__name__)

LIVENESS_EVERY_S = 0.5


@dataclass
class _Request:
    link: ExpertLink
    channel: Channel
    seq: int
    header: BatchHeader            # num_tokens = n
    dtype: torch.dtype
    weight_dtype: torch.dtype
    hidden: torch.Tensor           # [n, D] view of the channel
    local_slot_ids: torch.Tensor   # [n, K]
    weights: torch.Tensor          # [n, K]

    @property
    def key(self) -> tuple:
        return (self.header.layer, self.header.map_version, self.dtype, self.weight_dtype)


BUSY_POLL_S = 0.05          # GPU: how long the server polls without sleeping after the last step or request


class CudaIpcExpertServer:
    """The expert side of the cuda_ipc data plane, for one expert rank and its links (by attention rank).

    ``compute_device``: where ``compute`` wants its inputs (None: where the channels are).
    """

    def __init__(self, links: dict[int, ExpertLink], link_timeout_s: float = 30.0, batch_window_s: float = 0.0,
                 compute_device: torch.device | str | None = None, idle_sleep_s: float = 2e-3,
                 step_graphs: bool = False) -> None:
        """``step_graphs``: replay the step path's expert side from CUDA graphs
        (``cuda_ipc_step_server.StepGraphs``; the compute must be capturable: no host syncs)."""
        self.links, self.link_timeout_s, self.batch_window_s = links, link_timeout_s, batch_window_s
        self.step_graphs = step_graphs
        self.compute_device = torch.device(compute_device) if compute_device is not None else None
        self._served = {id(ch): ch.joined_at[0] for link in links.values() for ch in link.channels}
        self._steps_seen = {id(ch): ch.joined_at[1] for link in links.values() for ch in link.channels}
        self._open = dict(links)              # attention rank → link, while that rank may send
        self._stopping = threading.Event()
        # On a GPU the poll's latency is on every step's critical path (the attention side's first layer
        # waits for the expert side's graph, replayed once the announcement is seen): while steps or
        # requests keep coming, keep polling, the GIL yielded each time, and sleep only after BUSY_POLL_S
        # without any. On the CPU (tests, a few cores shared by every process) spin briefly.
        on_gpu = any(link.device.type == "cuda" for link in links.values())
        self._backoff = Backoff(spin_s=BUSY_POLL_S if on_gpu else 200e-6, max_sleep_s=idle_sleep_s, yield_gil=True)
        self._step_queues: dict[int, queue.SimpleQueue] = {}                 # attention rank → its step thread
        self._step_gate = StepGate(self._stopping)                            # shared by the step threads
        self._step_threads: list[threading.Thread] = []
        self._step_crash: list[BaseException] = []
        self._started = False
        self.num_batches = 0                  # compute calls
        self.num_requests = 0                 # requests answered

    def serve(self, compute: ExpertCompute) -> None:
        if self._started:
            raise RuntimeError("serve() runs once per CudaIpcExpertServer")
        self._started = True
        on_gpu = [link.device for link in self.links.values() if link.device.type == "cuda"]
        if on_gpu:      # this thread launches the flag kernels: on the channels' device
            torch.cuda.set_device(on_gpu[0])
        self._set_state(ExpertState.SERVING)
        next_liveness = time.monotonic() + LIVENESS_EVERY_S
        try:
            while not self._stopping.is_set():
                if self._step_crash:
                    raise RuntimeError("a cuda_ipc step thread failed") from self._step_crash[0]
                self._start_steps(compute)
                batch = self._collect()
                if batch and self.batch_window_s > 0:
                    window_end = time.monotonic() + self.batch_window_s
                    while time.monotonic() < window_end:
                        batch += self._collect()
                        time.sleep(min(50e-6, self.batch_window_s))
                if batch:
                    self._serve_batch(compute, batch)
                    self._backoff.reset()
                    continue
                if time.monotonic() >= next_liveness:
                    self._drop_gone_ranks()
                    next_liveness = time.monotonic() + LIVENESS_EVERY_S
                self._backoff.pause()
        finally:
            self._stopping.set()
            self._set_state(ExpertState.STOPPED)
            for q in self._step_queues.values():
                q.put(None)
            for thread in self._step_threads:
                thread.join(timeout=self.link_timeout_s)

    def stop(self) -> None:
        self._stopping.set()

    def _set_state(self, state: ExpertState) -> None:
        for link in self.links.values():
            for channel in link.channels:
                channel.words[EXPERT_STATE] = state

    def _drop_gone_ranks(self) -> None:
        for a, link in list(self._open.items()):
            if int(link.channels[0].words[ATTENTION_STATE]) == AttentionState.CLOSED:
                logger.info("attention rank %d closed its cuda_ipc channels", a)
            elif not link.peer.alive():
                logger.warning("attention rank %d (pid %d) exited; its cuda_ipc channels are no longer served",
                               a, link.peer.pid)
            else:
                continue
            del self._open[a]

    # -- per-message requests ------------------------------------------------------------
    def _collect(self) -> list[_Request]:
        """Every request that arrived since the last pass, in (attention rank, slot) order."""
        requests = []
        for link in self._open.values():
            for channel in link.channels:
                seq = int(channel.words[REQ_SEQ])
                if seq > self._served[id(channel)]:
                    self._served[id(channel)] = seq
                    request = self._read(link, channel, seq)
                    if request is not None:
                        requests.append(request)
        return requests

    def _read(self, link: ExpertLink, channel: Channel, seq: int) -> _Request | None:
        words = channel.words
        n, layer, version = int(words[REQ_NUM_TOKENS]), int(words[REQ_LAYER]), int(words[REQ_MAP_VERSION])
        dtype, weight_dtype = DTYPES.get(int(words[REQ_DTYPE])), DTYPES.get(int(words[REQ_WEIGHT_DTYPE]))
        if not 0 < n <= channel.shape.max_tokens or dtype != channel.shape.dtype or weight_dtype is None \
                or layer < 0 or version < 0:
            self._reply(link, channel, seq, n, Status.ERROR, error=f"malformed request {seq}: {n} tokens, dtype "
                        f"{dtype}, weights {weight_dtype}, layer {layer}, version {version}")
            return None
        header = BatchHeader(version, layer, int(words[REQ_MICRO_BATCH]), n, read_trace(words, REQ_TRACE))
        deadline = time.monotonic() + self.link_timeout_s
        if not link.readiness.before_read(channel, Flag.REQUEST, seq, deadline, lambda: "", link.attention_rank):
            logger.warning("request %d of attention rank %d: its data was not ready within %.1fs; dropped", seq,
                           link.attention_rank, self.link_timeout_s)
            return None
        return _Request(link, channel, seq, header, dtype, weight_dtype, channel.hidden[:n],
                        channel.slot_ids[:n], channel.weights(n, weight_dtype))

    def _serve_batch(self, compute: ExpertCompute, batch: list[_Request]) -> None:
        groups: dict[tuple, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.key, []).append(request)
        for requests in groups.values():
            self._compute(compute, requests)

    def _compute(self, compute: ExpertCompute, requests: list[_Request]) -> None:
        """One ``compute`` call for requests of one key, then a reply to each."""
        first, counts = requests[0], [r.header.num_tokens for r in requests]
        if len(requests) == 1:
            hidden, ids, weights = first.hidden, first.local_slot_ids, first.weights
        else:
            hidden = torch.cat([r.hidden for r in requests])                  # [N, D]
            ids = torch.cat([r.local_slot_ids for r in requests])             # [N, K]
            weights = torch.cat([r.weights for r in requests])                # [N, K]
        if self.compute_device is not None:
            hidden, ids, weights = (t.to(self.compute_device) for t in (hidden, ids, weights))
        header = BatchHeader(first.header.map_version, first.header.layer, first.header.micro_batch, sum(counts),
                             first.header.trace_context, tuple(r.header.trace_context for r in requests))
        status, held, error, parts = Status.OK, (), "", None
        try:
            out = compute(header, hidden, ids, weights)
            if out.shape != hidden.shape:
                raise ValueError(f"ExpertCompute returned {tuple(out.shape)} for {tuple(hidden.shape)} tokens")
            parts = out.split(counts)
        except StaleMapVersion as exc:
            status, held, error = Status.STALE_VERSION, exc.held_versions, str(exc)
        except Exception as exc:  # the compute's failure goes back to the requesters
            logger.exception("expert compute failed for layer %d version %d", header.layer, header.map_version)
            status, error = Status.ERROR, f"{type(exc).__name__}: {exc}"
        self.num_batches += 1
        for i, r in enumerate(requests):
            self._reply(r.link, r.channel, r.seq, r.header.num_tokens, status, None if parts is None else parts[i],
                        held, error)

    def _reply(self, link: ExpertLink, channel: Channel, seq: int, num_tokens: int, status: Status,
               partial: torch.Tensor | None = None, held: tuple[int, ...] = (), error: str = "") -> None:
        words = channel.words
        if int(words[REQ_SEQ]) != seq:
            return            # the attention rank gave up on this request and sent another: nobody reads it
        if partial is not None:
            channel.partial[:num_tokens].copy_(partial)
        link.readiness.after_write(channel, Flag.REPLY, seq)
        write_status(words, RSP_STATUS, status, held, error)
        words[RSP_SEQ] = seq                                     # last: the attention rank may read now
        self.num_requests += 1

    # -- the step path ------------------------------------------------------------------
    def _start_steps(self, compute: ExpertCompute) -> None:
        """Hand each new step announcement (channel, STEP_SEQ) to the step thread of its attention rank, in
        the rank's step order: a channel's ring may hold two not seen yet (the rank announces its next step
        before it reads the last one's status), and a step's micro-batch slots must reach the thread together
        (its group number, STEP_GROUP, orders them; ``StepServer`` serves a group whole)."""
        for a, link in self._open.items():
            fresh: list[tuple[int, int, int, Channel]] = []          # (group, slot, seq, channel)
            for channel in link.channels:
                seen = self._steps_seen[id(channel)]
                for i in range(STEP_RING):
                    header = channel.step_header(seen + 1 + i)
                    seq = int(header[STEP_SEQ])
                    if seq > seen:
                        fresh.append((int(header[STEP_GROUP]), channel.slot, seq, channel))
            for _, _, seq, channel in sorted(fresh, key=lambda item: item[:3]):
                self._steps_seen[id(channel)] = max(self._steps_seen[id(channel)], seq)
                self._step_queue(a, link, compute).put((channel, seq))
                self._backoff.reset()

    def _step_queue(self, attention_rank: int, link: ExpertLink, compute: ExpertCompute) -> queue.SimpleQueue:
        """A thread per attention rank, with a stream and flag counters per micro-batch slot (one slot's
        kernels must not queue behind the other's: the rank interleaves them layer by layer)."""
        if attention_rank not in self._step_queues:
            from epserve.dataplane.cuda_ipc_step_server import StepServer

            q: queue.SimpleQueue = queue.SimpleQueue()
            step_server = StepServer(link, compute, self.link_timeout_s, self.compute_device, self._stopping,
                                     graphs=self.step_graphs, gate=self._step_gate)
            thread = threading.Thread(target=self._run_steps, args=(step_server, q), daemon=True,
                                      name=f"cuda-ipc-steps-{attention_rank}")
            self._step_queues[attention_rank] = q
            self._step_threads.append(thread)
            thread.start()
        return self._step_queues[attention_rank]

    def _run_steps(self, step_server, q: queue.SimpleQueue) -> None:
        try:
            step_server.run(q)
        except BaseException as exc:  # serve() raises it: a half-alive server is worse than a dead one
            self._step_crash.append(exc)
