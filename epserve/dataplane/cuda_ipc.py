"""``--moe-a2a-backend cuda_ipc``, attention side: fixed shared-memory channels to every expert rank.

Legend: T tokens, D hidden, K top-k, W expert workers, S slots per worker, M micro-batch slots,
n tokens of one exchange, Tmax the most tokens a channel holds.

Same host only: the attention rank and its expert ranks share memory — host shared memory on
CPU devices (so ``epserve up --moe-a2a-backend cuda_ipc`` also runs on CPU machines), GPU
buffers shared by CUDA IPC handle on GPUs (one GPU, or GPUs of one host with peer access).

Files: ``cuda_ipc_layout`` (a channel's words and regions), ``cuda_ipc_memory`` (shared
segments, IPC events), ``cuda_ipc_peers`` (rendezvous, liveness, polling), ``cuda_ipc_join``,
``cuda_ipc_readiness`` (poll / device flags / IPC events), ``cuda_ipc_flags`` (the Triton flag
kernels), ``cuda_ipc_server`` (the expert side), ``cuda_ipc_step`` (the CUDA-graph path; its expert
side ``cuda_ipc_step_server``, whose threads pass ``cuda_ipc_gate``).

Flow of one ``dispatch`` (caller's thread; this side has no threads): split the T tokens by
worker (``split_by_worker``, as every backend) → for each worker with n > 0, in the channel
(worker, micro_batch mod M): copy its rows into the input region, ``readiness.after_write``,
write the request header, then REQ_SEQ → return. ``combine(pending, timeout_s)`` waits, in
worker order against one deadline, for RSP_SEQ == the request's seq, reads the status,
``readiness.before_read``, and adds the partials in worker order (bit-identical to ``local``).
The partials are read in place; nothing is allocated per message but the [T, D] sum.

A channel holds one exchange at a time. A dispatch on a channel whose previous exchange was
neither combined nor given up (a dropped PendingCombine, or more micro-batches in flight than
M) first waits for that reply and keeps it for its combine.

Failures (each exchange ends in exactly one):
- no reply by the deadline → ``DataPlaneTimeout`` naming the expert rank, layer, micro-batch.
  The channel stays usable: the next request has a higher seq, a late reply is ignored, and
  the expert answers a request only while it is the channel's current one.
- the expert process exited (pidfd) or stopped serving → ``PeerLost``, within milliseconds;
  later dispatches touching it raise ``PeerLost`` before writing anything; other workers are
  unaffected.
- status STALE_VERSION → ``StaleMapVersion`` with the versions the expert holds; ERROR →
  ``RemoteExpertError``. The channel stays healthy.
On GPU readiness ``flags``, the wait for the partial runs on the device after the host saw the
reply: a device wait that runs out (the expert died between its reply and its signal) shows in
``check_device_errors()``, not in ``combine``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from epserve.dataplane.base import (BatchHeader, DataPlaneTimeout, PeerLost, PendingCombine, RemoteExpertError,
                                    StaleMapVersion)
from epserve.dataplane.cuda_ipc_join import AttentionSide
from epserve.dataplane.cuda_ipc_layout import (ATTENTION_STATE, DTYPE_CODES, REQ_DTYPE, REQ_LAYER,
                                               REQ_MAP_VERSION, REQ_MICRO_BATCH, REQ_NUM_TOKENS, REQ_SEQ, REQ_TRACE,
                                               REQ_WEIGHT_DTYPE, RSP_SEQ, RSP_STATUS, AttentionState, Channel,
                                               Flag, Status, read_status, write_trace)
from epserve.dataplane.cuda_ipc_peers import Backoff, PeerGone, wait_until
from epserve.dataplane.split import CombineSum, WorkerShare, check_dispatch_inputs, split_by_worker

_TYPED = (DataPlaneTimeout, PeerLost, StaleMapVersion, RemoteExpertError)


@dataclass
class _Link:
    """One channel as this side drives it."""

    channel: Channel
    peer_rank: int
    next_seq: int = 1
    in_flight: _Exchange | None = None


@dataclass
class _Exchange:
    link: _Link
    seq: int
    share: WorkerShare
    header: BatchHeader                                  # num_tokens = n of this exchange
    settled: torch.Tensor | BaseException | None = None  # finished before its combine (a copy, or the error)


@dataclass
class _IpcPending(PendingCombine):
    exchanges: list[_Exchange] = field(default_factory=list)
    combined: bool = False


class CudaIpcDispatcher:
    """The attention side of the cuda_ipc data plane. Use from one thread."""

    capturable = False   # waits on the host; the CUDA-graph path is ``step_exchange`` (cuda_ipc_step)

    def __init__(self, side: AttentionSide, link_timeout_s: float = 30.0) -> None:
        self.side, self.link_timeout_s = side, link_timeout_s
        self._links = [[_Link(ch, side.expert_ranks[w]) for ch in row] for w, row in enumerate(side.channels)]
        self._lost: dict[int, str] = {}         # worker → why it is unreachable
        self._backoff = Backoff()
        self._closed = False

    @property
    def num_workers(self) -> int:
        return len(self._links)

    def dispatch(self, header: BatchHeader, hidden: torch.Tensor, slot_ids: torch.Tensor,
                 weights: torch.Tensor, slots_per_worker: int) -> PendingCombine:
        """hidden [T, D], slot_ids [T, K] physical int64, weights [T, K]; returns without waiting."""
        if self._closed:
            raise RuntimeError("dispatch on a closed CudaIpcDispatcher")
        check_dispatch_inputs(header, hidden, slot_ids, weights)
        pending = _IpcPending(header, int(hidden.shape[1]), hidden.dtype, hidden.device)
        if header.num_tokens == 0:
            return pending
        self._check_shapes(hidden, slot_ids, weights)
        shares = [s for s in split_by_worker(slot_ids, weights, slots_per_worker, self.num_workers) if s.num_tokens]
        slot = header.micro_batch % self.side.num_slots
        for share in shares:
            self._check_reachable(share.worker, header)
        for share in shares:
            link = self._links[share.worker][slot]
            if link.in_flight is not None:
                self._settle(link.in_flight)
        hidden = hidden.to(self.side.device)
        for share in shares:
            pending.exchanges.append(self._send(self._links[share.worker][slot], header, hidden, share))
        pending.shares = shares
        return pending

    def _check_shapes(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
        shape = self.side.shape
        if hidden.shape[0] > shape.max_tokens:
            raise ValueError(f"{hidden.shape[0]} tokens in one micro-batch, but the cuda_ipc channels hold "
                             f"{shape.max_tokens}: raise the attention worker's --max-num-batched-tokens")
        if hidden.shape[1] != shape.hidden_size or slot_ids.shape[1] != shape.top_k or hidden.dtype != shape.dtype:
            raise ValueError(f"the cuda_ipc channels carry [T, {shape.hidden_size}] {shape.dtype} with top-k "
                             f"{shape.top_k}; got hidden {tuple(hidden.shape)} {hidden.dtype}, "
                             f"top-k {slot_ids.shape[1]}")
        if weights.dtype not in DTYPE_CODES:
            raise ValueError(f"weights must be one of {list(DTYPE_CODES)}, got {weights.dtype}")

    def _check_reachable(self, worker: int, header: BatchHeader) -> None:
        reason = self._lost.get(worker) or self._gone(worker, header.micro_batch % self.side.num_slots)
        if reason:
            self._lose(worker, reason)
            rank = self.side.expert_ranks[worker]
            raise PeerLost(f"expert rank {rank} is unreachable ({reason}); layer {header.layer} micro-batch "
                           f"{header.micro_batch} not sent", peer_rank=rank)

    def _gone(self, worker: int, slot: int) -> str:
        """Why expert ``worker`` cannot answer any more, or "" (a restarted process that joined again is taken:
        ``AttentionSide.readmit``, and what was lost with the old one is forgotten)."""
        epoch = self.side.epochs[worker]
        reason = self.side.unreachable(worker, slot)
        if self.side.epochs[worker] != epoch:
            self._lost.pop(worker, None)
        return self._lost.get(worker) or reason

    def reconnect(self, peer_rank: int) -> None:
        """Elastic EP: expert ``peer_rank`` is alive by placement's probe: its channels are fixed, so there is
        nothing to form again unless it is a restarted process, taken once it joined. Raises PeerLost while
        it cannot answer."""
        worker = self.side.expert_ranks.index(peer_rank)
        reason = self._gone(worker, 0)
        if reason:
            raise PeerLost(f"expert rank {peer_rank} cannot answer yet: {reason}", peer_rank=peer_rank)

    def _send(self, link: _Link, header: BatchHeader, hidden: torch.Tensor, share: WorkerShare) -> _Exchange:
        channel, n = link.channel, share.num_tokens
        torch.index_select(hidden, 0, share.token_idx.to(hidden.device), out=channel.hidden[:n])
        channel.slot_ids[:n].copy_(share.local_slot_ids)
        channel.weights(n, share.weights.dtype).copy_(share.weights)
        seq, link.next_seq = link.next_seq, link.next_seq + 1
        self.side.readiness.after_write(channel, Flag.REQUEST, seq)
        words = channel.words
        words[REQ_MAP_VERSION], words[REQ_LAYER], words[REQ_MICRO_BATCH] = (header.map_version, header.layer,
                                                                            header.micro_batch)
        words[REQ_NUM_TOKENS], words[REQ_DTYPE] = n, DTYPE_CODES[hidden.dtype]
        words[REQ_WEIGHT_DTYPE] = DTYPE_CODES[share.weights.dtype]
        write_trace(words, REQ_TRACE, header.trace_context)
        words[REQ_SEQ] = seq                                     # last: the expert may read the request now
        share_header = BatchHeader(header.map_version, header.layer, header.micro_batch, n, header.trace_context)
        link.in_flight = _Exchange(link, seq, share, share_header)
        return link.in_flight

    def combine(self, pending: PendingCombine, timeout_s: float) -> torch.Tensor:
        """→ out [T, D]. Waits at most ``timeout_s`` in all; raises the first failure in worker order."""
        assert isinstance(pending, _IpcPending)
        if pending.combined:
            raise RuntimeError("combine called twice for one dispatch")
        pending.combined = True
        deadline = time.monotonic() + timeout_s
        partials, errors = [], []
        for exchange in pending.exchanges:
            try:
                partials.append(self._finish(exchange, deadline))
            except _TYPED as exc:
                errors.append(exc)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {type(other).__name__}: {other}")
            raise errors[0]
        total = CombineSum(pending.header.num_tokens, pending.hidden_size, pending.dtype, pending.device)
        for exchange, partial in zip(pending.exchanges, partials):
            total.add(exchange.share, partial.to(pending.device))
        return total.result()

    def _finish(self, ex: _Exchange, deadline: float) -> torch.Tensor:
        """The partial [n, D] of one exchange (a view of the channel), or its typed error."""
        if ex.settled is not None:
            if isinstance(ex.settled, BaseException):
                raise ex.settled
            return ex.settled
        link = ex.link
        try:
            return self._await_reply(ex, deadline)
        finally:
            if link.in_flight is ex:
                link.in_flight = None

    def _await_reply(self, ex: _Exchange, deadline: float) -> torch.Tensor:
        link, channel = ex.link, ex.link.channel
        where = f"layer {ex.header.layer} micro-batch {ex.header.micro_batch}"
        words, worker, rank = channel.words, channel.worker, link.peer_rank
        try:
            answered = wait_until(lambda: int(words[RSP_SEQ]) == ex.seq, deadline,
                                  lambda: self._gone(worker, channel.slot), self._backoff)
            if answered:
                status, held, error = read_status(words, RSP_STATUS)
                if status == Status.OK:
                    answered = self.side.readiness.before_read(channel, Flag.REPLY, ex.seq, deadline,
                                                               lambda: self._gone(worker, channel.slot), rank)
        except PeerGone as exc:
            self._lose(worker, str(exc))
            raise PeerLost(f"expert rank {rank} lost while waiting for {where}: {exc}", peer_rank=rank) from None
        if not answered:
            raise DataPlaneTimeout(f"expert rank {rank} did not answer {where} within the deadline", peer_rank=rank,
                                   layer=ex.header.layer, micro_batch=ex.header.micro_batch)
        if status == Status.STALE_VERSION:
            raise StaleMapVersion(f"expert rank {rank} does not hold map version {ex.header.map_version} ({where}): "
                                  f"{error}", requested=ex.header.map_version, held_versions=held, peer_rank=rank)
        if status == Status.ERROR:
            raise RemoteExpertError(f"expert rank {rank} failed {where}: {error}", peer_rank=rank)
        return channel.partial[:ex.share.num_tokens]

    def _settle(self, ex: _Exchange) -> None:
        """Finish an exchange before its channel is reused; its combine gets the kept result."""
        try:
            ex.settled = self._finish(ex, time.monotonic() + self.link_timeout_s).clone()
        except _TYPED as exc:
            ex.settled = exc

    def _lose(self, worker: int, reason: str) -> None:
        self._lost.setdefault(worker, reason)
        for link in self._links[worker]:
            link.in_flight = None

    def check_device_errors(self) -> None:
        """Raise DataPlaneTimeout if a device-side wait ran out of budget since the last call (syncs)."""
        rank = self.side.readiness.take_device_error()
        if rank is not None:
            raise DataPlaneTimeout(f"a device-side wait for expert rank {rank} ran out of budget: a partial sum of "
                                   "this step was not ready", peer_rank=rank)

    def step_exchange(self, micro_batch: int, timeout_s: float | None = None):
        """The CUDA-graph path for one micro-batch slot (``cuda_ipc_step.StepExchange``)."""
        from epserve.dataplane.cuda_ipc_step import StepExchange

        return StepExchange(self.side, micro_batch % self.side.num_slots,
                            timeout_s if timeout_s is not None else self.link_timeout_s)

    def close(self) -> None:
        """Tell every expert rank this attention rank is gone (it stops polling these channels)."""
        if self._closed:
            return
        self._closed = True
        for row in self.side.channels:
            for channel in row:
                channel.words[ATTENTION_STATE] = AttentionState.CLOSED
        for peer in self.side.peers:
            peer.close()
        self.side.close()
