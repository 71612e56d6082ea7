"""``--moe-a2a-backend torch``, attention side: point-to-point exchanges over torch.distributed.

Legend: T tokens, D hidden, K top-k, W expert workers, S slots per worker, n tokens of one
exchange. Wire format and tags: ``torch_wire``; joining: ``torch_group``; links: ``torch_links``;
the expert side: ``torch_server``. gloo on CPU, NCCL on CUDA (written device-agnostic, tested on gloo).

Flow of one ``dispatch`` (caller's thread, no other threads on this side):
  split the T tokens by worker → for each worker with n > 0: post the reply receive
  (reply group, tag of this exchange), send the request (request group: header and packed
  payload in one message when small, else two) → return a ``PendingCombine`` holding the
  works and buffers. Nothing waits, so
  dispatch mb0, dispatch mb1, combine mb0, combine mb1 overlaps two micro-batches.
``combine(pending, timeout_s)`` waits on each worker's reply in worker order against one
deadline, then adds the partials in worker order (bit-identical to ``local``).

Failures (each exchange ends in exactly one of these):
- the deadline passes → ``DataPlaneTimeout`` naming the expert rank, layer and micro-batch.
  gloo closes the link's reply group when a wait times out (it cannot cancel a receive);
  the link is then closed on purpose on both groups and marked lost.
- the peer dies or the link breaks → ``PeerLost``, fast: the kernel closes a killed
  process's sockets and gloo fails the pending operations ("Connection closed by peer").
- later dispatches touching a lost link raise ``PeerLost`` before sending anything; links
  to other expert workers are unaffected. ``reconnect(peer_rank)`` forms a new link epoch with
  that rank (``torch_links``: a new rendezvous, e.g. with a restarted expert worker); the
  caller decides when (elastic EP asks placement first whether the peer is alive).
- the expert answers STALE_VERSION → ``StaleMapVersion`` with the versions it holds; an
  exception in its compute → ``RemoteExpertError``. The link stays healthy.
Links are formed on first use (a new expert worker, or every worker when the group was joined
lazily), and formed again before use when idle for ``IDLE_REFRESH_S`` (the expert side ends a
link idle for ``IDLE_TIMEOUT_S``: its receive has that deadline) or when the link is lost and
another process serves that rank now (a restarted expert worker: a new incarnation token). Expert workers are indexed by
slot owner position w = rank − D; a map with more owners than at join reaches new ranks.
Every message carries the caller's ``attempt``; a reply must carry its request's.

Buffers of an exchange stay referenced (by its link's ``in_flight``) until its reply was
received or its link is closed: gloo writes into a posted receive's memory, and a reply whose
receive buffer is gone would sit unread at the head of the link, blocking every later reply.
An exchange whose ``PendingCombine`` the caller dropped without ``combine`` is finished at the
link's next dispatch. ``dispatch`` copies its inputs: the caller may reuse them at once.

On NCCL (``device="cuda"``) this code runs the same calls but has NOT been tried, and three
things are known to need work first: (1) NCCL ignores tags, so replies must come back per
link in request order (the server keeps that order; a timed-out exchange would still
desynchronise the link); (2) the expert's receive that waits for the next request without a
deadline trips ProcessGroupNCCL's watchdog after the group timeout; (3) waiting on NCCL work
from the host means a stream synchronisation, which spins a CPU core by default. A likely
shape for GPUs: headers on a gloo (CPU) link, payloads on NCCL — or DeepEP / Mooncake EP.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from epserve.dataplane.base import (BatchHeader, DataPlaneTimeout, PeerLost, PendingCombine,
                                    RemoteExpertError, StaleMapVersion)
from epserve.dataplane.split import CombineSum, WorkerShare, check_dispatch_inputs, split_by_worker
from epserve.dataplane.torch_group import TorchGroup, close_group
from epserve.dataplane.torch_links import IDLE_REFRESH_S, Link, StoreClient, connect, incarnation
from epserve.dataplane.torch_wire import (FLAG_INLINE, HEADER_BYTES, TAG_HEADER, Kind, ProtocolError, RequestLayout,
                                          Status, WireHeader, decode_header, encode_header, reply_nbytes,
                                          reply_views, request_capacity, tag_for)

_ATTENTION, _EXPERT = 0, 1   # group ranks inside a link's groups
INCARNATION_CHECK_S = 0.2    # a lost link looks this often for a restarted peer (a store read)


@dataclass
class _ExpertLink:
    worker: int
    link: Link
    next_seq: int = 0
    lost: str = ""            # why the link is unusable; "" while healthy
    in_flight: dict[int, _Exchange] = field(default_factory=dict)   # seq → exchange not yet finished
    last_used: float = field(default_factory=time.monotonic)
    checked_at: float = 0.0   # when a lost link last looked for a restarted peer

    @property
    def peer_rank(self) -> int:
        return self.link.expert_rank


@dataclass
class _Exchange:
    link: _ExpertLink
    seq: int
    share: WorkerShare
    header: BatchHeader
    hidden_size: int
    dtype: torch.dtype
    reply_buf: torch.Tensor                                   # uint8, header | out [n, D]
    reply_work: dist.Work
    sends: list[dist.Work] = field(default_factory=list)
    keep_alive: list[torch.Tensor] = field(default_factory=list)   # request header + payload
    owner: weakref.ref | None = None                                # the PendingCombine it belongs to


@dataclass
class _TorchPending(PendingCombine):
    exchanges: list[_Exchange] = field(default_factory=list)
    combined: bool = False


class TorchDispatcher:
    """The attention side of the torch data plane. Use from one thread."""

    def __init__(self, group: TorchGroup, link_timeout_s: float = 30.0, connect_timeout_s: float | None = None) -> None:
        """``connect_timeout_s``: how long forming a link may take (default ``link_timeout_s``)."""
        if not group.is_attention:
            raise ValueError(f"rank {group.rank} is an expert rank; a dispatcher runs on ranks "
                             f"[0, {group.num_attention_ranks})")
        self.group, self.link_timeout_s = group, link_timeout_s
        self.connect_timeout_s = link_timeout_s if connect_timeout_s is None else connect_timeout_s
        self._links = {rank - group.num_attention_ranks: _ExpertLink(rank - group.num_attention_ranks, link)
                       for rank, link in group.links.items()}
        self._store = StoreClient(group.dist_init_addr, self.connect_timeout_s)
        self._closed = False

    @property
    def num_workers(self) -> int:
        return max(self.group.num_expert_ranks, max(self._links, default=-1) + 1)

    def reconnect(self, peer_rank: int, dist_init_addr: str = "") -> None:
        """Form a new link epoch with expert rank ``peer_rank`` unless the link to it is healthy
        (another micro-batch re-formed it already); raises PeerLost when it does not answer within
        ``connect_timeout_s``. ``dist_init_addr``: the store's address when placement moved it."""
        if dist_init_addr:
            self._store.set_address(dist_init_addr)
        worker = peer_rank - self.group.num_attention_ranks
        current = self._links.get(worker)
        if current is None or current.lost:
            self._form(worker)

    def _form(self, worker: int) -> _ExpertLink:
        """A new link epoch with ``worker`` replacing the one it had; on PeerLost the old (lost)
        link stays, so later dispatches to it fail fast."""
        old = self._links.get(worker)
        if old is not None:
            self._lose(old, "replaced by a new link")
        link = connect(self._store, self.group.rank, self.group.expert_rank(worker), self.connect_timeout_s,
                       self.group.device)
        self._links[worker] = _ExpertLink(worker, link)
        return self._links[worker]

    def _link(self, worker: int) -> _ExpertLink:
        """The link to ``worker``: formed now on first use, after a long idle time, or when the
        one it had is lost and another process now serves that rank (the expert restarted)."""
        link = self._links.get(worker)
        if link is None:
            return self._form(worker)
        if not link.lost and not link.in_flight and time.monotonic() - link.last_used > IDLE_REFRESH_S:
            return self._form(worker)            # the expert side ends idle links; use a fresh one
        if link.lost and time.monotonic() - link.checked_at > INCARNATION_CHECK_S:
            link.checked_at = time.monotonic()
            if incarnation(self._store, link.peer_rank) not in ("", link.link.incarnation):
                return self._form(worker)
        return link

    def dispatch(self, header: BatchHeader, hidden: torch.Tensor, slot_ids: torch.Tensor,
                 weights: torch.Tensor, slots_per_worker: int) -> PendingCombine:
        """hidden [T, D], slot_ids [T, K] physical int64, weights [T, K]; returns without waiting."""
        if self._closed:
            raise RuntimeError("dispatch on a closed TorchDispatcher")
        check_dispatch_inputs(header, hidden, slot_ids, weights)
        pending = _TorchPending(header, int(hidden.shape[1]), hidden.dtype, hidden.device)
        if header.num_tokens == 0:
            return pending
        num_workers = max(self.num_workers, int(slot_ids.max()) // slots_per_worker + 1)
        shares = [s for s in split_by_worker(slot_ids, weights, slots_per_worker, num_workers) if s.num_tokens]
        for share in shares:
            link = self._link(share.worker)
            if link.lost:
                raise PeerLost(f"expert rank {link.peer_rank} is unreachable ({link.lost}); layer "
                               f"{header.layer} micro-batch {header.micro_batch} not sent", peer_rank=link.peer_rank)
        for share in shares:
            self._reap_abandoned(self._links[share.worker])
        hidden = hidden.to(self.group.device)
        for share in shares:
            link = self._links[share.worker]
            try:
                exchange = self._start(link, header, hidden, share)
                exchange.owner = weakref.ref(pending)
                link.in_flight[exchange.seq] = exchange
                pending.exchanges.append(exchange)
            except RuntimeError as exc:
                self._lose(link, f"send failed: {exc}")
                self._drain(pending.exchanges)
                raise PeerLost(f"expert rank {link.peer_rank}: sending layer {header.layer} micro-batch "
                               f"{header.micro_batch} failed: {exc}", peer_rank=link.peer_rank) from exc
        pending.shares = shares
        return pending

    def _start(self, link: _ExpertLink, header: BatchHeader, hidden: torch.Tensor, share: WorkerShare) -> _Exchange:
        device = self.group.device
        seq, link.next_seq = link.next_seq, link.next_seq + 1
        n, k = share.local_slot_ids.shape
        d = hidden.shape[1]
        layout = RequestLayout(n, d, k, hidden.dtype, share.weights.dtype)
        inline = HEADER_BYTES + layout.total <= request_capacity(device)
        link.last_used = time.monotonic()
        share_header = BatchHeader(header.map_version, header.layer, header.micro_batch, n, header.trace_context,
                                   attempt=header.attempt)
        words = encode_header(WireHeader(Kind.REQUEST, seq, share_header, k, d, hidden.dtype, share.weights.dtype,
                                         flags=FLAG_INLINE if inline else 0))
        message = torch.empty(HEADER_BYTES + (layout.total if inline else 0), dtype=torch.uint8, device=device)
        message[:HEADER_BYTES].view(torch.int64).copy_(words)
        payload = message[HEADER_BYTES:] if inline else torch.empty(layout.total, dtype=torch.uint8, device=device)
        hidden_view, ids_view, weights_view = layout.views(payload)
        torch.index_select(hidden, 0, share.token_idx.to(device), out=hidden_view)
        ids_view.copy_(share.local_slot_ids)
        weights_view.copy_(share.weights)
        reply_buf = torch.empty(reply_nbytes(n, d, hidden.dtype), dtype=torch.uint8, device=device)
        reply_work = link.link.reply.recv([reply_buf], _EXPERT, tag_for(seq))
        exchange = _Exchange(link, seq, share, share_header, d, hidden.dtype, reply_buf, reply_work,
                             keep_alive=[message, payload])
        exchange.sends.append(link.link.request.send([message], _EXPERT, TAG_HEADER))
        if not inline:
            exchange.sends.append(link.link.request.send([payload], _EXPERT, tag_for(seq)))
        return exchange

    def combine(self, pending: PendingCombine, timeout_s: float) -> torch.Tensor:
        """→ out [T, D]. Waits at most ``timeout_s`` in all; raises the first failure in worker order."""
        assert isinstance(pending, _TorchPending)
        if pending.combined:
            raise RuntimeError("combine called twice for one dispatch")
        pending.combined = True
        deadline = time.monotonic() + timeout_s
        partials, errors = [], []
        for exchange in pending.exchanges:
            try:
                partials.append(self._finish(exchange, deadline))
            except (DataPlaneTimeout, PeerLost, StaleMapVersion, RemoteExpertError) as exc:
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
        """Wait for one exchange's reply → partial [n, D], or raise its typed error."""
        link, where = ex.link, f"layer {ex.header.layer} micro-batch {ex.header.micro_batch}"
        if link.lost:
            raise PeerLost(f"expert rank {link.peer_rank} lost before answering {where} ({link.lost})",
                           peer_rank=link.peer_rank)
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            ex.reply_work.wait(timedelta(seconds=remaining))
            for work in ex.sends:   # complete once the expert has read them, which precedes its reply
                work.wait(timedelta(seconds=self.link_timeout_s))
            link.in_flight.pop(ex.seq, None)
        except RuntimeError as exc:
            if "Timed out" in str(exc):
                self._lose(link, f"no reply to {where} within the deadline")
                raise DataPlaneTimeout(f"expert rank {link.peer_rank} did not answer {where} within "
                                       f"{remaining:.3f}s", peer_rank=link.peer_rank, layer=ex.header.layer,
                                       micro_batch=ex.header.micro_batch) from exc
            self._lose(link, str(exc))
            raise PeerLost(f"expert rank {link.peer_rank} lost while waiting for {where}: {exc}",
                           peer_rank=link.peer_rank) from exc
        words, out = reply_views(ex.reply_buf, ex.share.num_tokens, ex.hidden_size, ex.dtype)
        try:
            reply = decode_header(words.cpu())
            if reply.kind != Kind.REPLY or reply.seq != ex.seq or reply.batch.attempt != ex.header.attempt:
                raise ProtocolError(f"expected reply {ex.seq} of attempt {ex.header.attempt}, got {reply.kind.name} "
                                    f"{reply.seq} of attempt {reply.batch.attempt}")
        except ProtocolError as exc:
            self._lose(link, str(exc))
            raise PeerLost(f"expert rank {link.peer_rank}: {exc}", peer_rank=link.peer_rank) from exc
        if reply.status == Status.STALE_VERSION:
            raise StaleMapVersion(f"expert rank {link.peer_rank} does not hold map version "
                                  f"{ex.header.map_version} ({where}): {reply.error}",
                                  requested=ex.header.map_version, held_versions=reply.held_versions,
                                  peer_rank=link.peer_rank)
        if reply.status == Status.ERROR:
            raise RemoteExpertError(f"expert rank {link.peer_rank} failed {where}: {reply.error}",
                                    peer_rank=link.peer_rank)
        return out

    def _reap_abandoned(self, link: _ExpertLink) -> None:
        """Finish exchanges whose PendingCombine was dropped without ``combine`` (e.g. the caller
        gave up on a micro-batch after another one failed). Until their replies are received,
        gloo holds them at the head of the link and every later reply would wait behind them."""
        abandoned = [ex for ex in link.in_flight.values() if ex.owner is not None and ex.owner() is None]
        if abandoned:
            self._drain(abandoned)

    def _drain(self, exchanges: list[_Exchange]) -> None:
        """Let exchanges already started finish, so their buffers are no longer written to."""
        deadline = time.monotonic() + self.link_timeout_s
        for exchange in exchanges:
            try:
                self._finish(exchange, deadline)
            except (DataPlaneTimeout, PeerLost, StaleMapVersion, RemoteExpertError):
                pass

    def _lose(self, link: _ExpertLink, reason: str) -> None:
        if not link.lost:
            link.lost = reason
            close_group(link.link.request)
            close_group(link.link.reply)
            link.in_flight.clear()   # closed pairs write into no buffer any more

    def close(self) -> None:
        """Tell every reachable expert rank this attention rank is gone (its receiver ends)."""
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            if link.lost:
                continue
            words = encode_header(WireHeader(Kind.CLOSE, link.next_seq, BatchHeader(0, 0, 0, 0)))
            message = words.view(torch.uint8).to(self.group.device)
            try:
                link.link.request.send([message], _EXPERT, TAG_HEADER).wait(timedelta(seconds=self.link_timeout_s))
            except RuntimeError:
                pass
            link.lost = "dispatcher closed"
