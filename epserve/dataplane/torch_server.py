"""``--moe-a2a-backend torch``, expert side: serve whoever sends, batching what arrived together.

Legend: n tokens of one request, N tokens of a batch, D hidden, K top-k.

Threads and queue:
- one link acceptor per attention rank a ("dataplane-accept-a", ``torch_links.LinkAcceptor``):
  forms each link epoch a offers (a restarted attention worker, a link a gave up on) and
  installs it as a's current link, closing the one it replaces.
- one receiver thread per attention rank a ("dataplane-recv-a"): a blocking receive of the
  next request from a on a's current request group (deadline ``torch_links.IDLE_TIMEOUT_S``:
  an idle worker sleeps in the kernel, it does not poll; a link idle that long is ended and
  the attention side forms a new one before it uses it again); small requests arrive whole,
  larger ones need a second receive for the payload (deadline ``link_timeout_s``); then
  ``queue.put(request)``. On a CLOSE message, a broken link (the attention rank died: logged,
  other ranks are unaffected) or a replaced one it waits for a's next link, until ``stop()``.
- the thread that called ``serve`` computes: it blocks on ``queue.get()``, takes whatever
  else is already queued (and, when ``batch_window_s`` > 0, what arrives within that
  window), groups it by (layer, map version, shapes, dtypes) in order of arrival, calls
  ``compute`` once per group, splits the [N, D] result and sends each requester its
  [n, D] on the (a, e) reply group, then waits for those sends (deadline ``link_timeout_s``).
  Replies to one attention rank leave in the order its requests arrived (a reply waits for
  the groups holding that rank's earlier requests): gloo matches replies by tag anyway,
  NCCL ignores tags and would need this order.
Replies carry a status: OK, STALE_VERSION (with the versions the compute says it holds) or
ERROR (the exception's text); the attention side turns them into typed errors.
``stop()`` (any thread) wakes ``serve``, which closes every link on its way out: blocked
receivers wake with an error and attention ranks with requests in flight get ``PeerLost``
at once instead of waiting for their deadline. A receiver that fails for a reason other than
a broken link puts the error in the queue; ``serve`` raises it (a half-alive server is worse
than a dead one).

gloo and threads (checked with torch 2.13, see the package docs): concurrent send/recv on one
gloo group from several threads worked in a stress test, but this design does not rely on
it: each group is used by one thread, except ``close_group`` at shutdown, which by design
runs while a receiver is blocked on the same group (verified: the receiver wakes at once).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from epserve.dataplane.base import BatchHeader, ExpertCompute, StaleMapVersion
from epserve.dataplane.torch_group import TorchGroup, close_group
from epserve.dataplane.torch_links import IDLE_TIMEOUT_S, Link, LinkAcceptor
from epserve.process import start_daemon_thread
from epserve.dataplane.torch_wire import (FLAG_INLINE, HEADER_BYTES, TAG_HEADER, Kind, ProtocolError, Status,
                                          WireHeader, decode_header, encode_header, layout_of, reply_nbytes,
                                          reply_views, request_capacity, tag_for)

logger = logging.getLogger(__name__)

_ATTENTION = 0   # group rank of the attention side inside a link's groups
_STOP = object()


@dataclass(eq=False)
class _Served:
    """A link this server received on; ``lost`` says why it ended ("" while usable)."""
    link: Link
    lost: str = ""


@dataclass
class _Request:
    attention_rank: int
    served: _Served               # the link it came on; its reply goes back on the same one
    wire: WireHeader
    hidden: torch.Tensor          # [n, D]
    local_slot_ids: torch.Tensor  # [n, K]
    weights: torch.Tensor         # [n, K]
    reply: torch.Tensor | None = None   # uint8 header | out [n, D], once computed

    @property
    def key(self) -> tuple:
        w = self.wire
        return (w.batch.layer, w.batch.map_version, w.hidden_size, w.top_k, w.dtype, w.weight_dtype)


@dataclass
class _ReceiverCrash:
    error: BaseException


class TorchExpertServer:
    """The expert side of the torch data plane for expert rank ``group.rank``."""

    def __init__(self, group: TorchGroup, link_timeout_s: float = 30.0, batch_window_s: float = 0.0,
                 connect_timeout_s: float | None = None) -> None:
        """``connect_timeout_s``: forming one link an attention rank offered (default: the group's)."""
        if group.is_attention:
            raise ValueError(f"rank {group.rank} is an attention rank; an expert server runs on ranks "
                             f"[{group.num_attention_ranks}, {group.world_size})")
        self.group, self.link_timeout_s, self.batch_window_s = group, link_timeout_s, batch_window_s
        self.connect_timeout_s = group.timeout_s if connect_timeout_s is None else connect_timeout_s
        self._links: dict[int, _Served | None] = {a: _Served(group.links[a]) if a in group.links else None
                                                  for a in range(group.num_attention_ranks)}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._lock = threading.Condition()    # guards _links and each _Served.lost; notified on a change
        self._started = False
        self.num_batches = 0                  # compute calls
        self.num_requests = 0                 # requests answered

    def serve(self, compute: ExpertCompute) -> None:
        if self._started:
            raise RuntimeError("serve() runs once per TorchExpertServer")
        self._started = True
        group = self.group
        acceptors = []
        for a, served in self._links.items():
            acceptor = LinkAcceptor(group.dist_init_addr, a, group.rank, group.token, self.connect_timeout_s,
                                    group.device, lambda new, a=a: self._install(a, new), self._stopping)
            acceptor.next_epoch = (served.link.epoch + 1) if served is not None else 1
            acceptors.append(acceptor)
        receivers = [start_daemon_thread(lambda a=a: self._receive_from(a), f"dataplane-recv-{a}")
                     for a in self._links]
        for acceptor in acceptors:
            start_daemon_thread(acceptor.run, f"dataplane-accept-{acceptor.attention_rank}")
        try:
            while not self._stopping.is_set():
                batch = self._next_batch()
                if batch:
                    self._serve_batch(compute, batch)
        finally:
            self._stopping.set()
            with self._lock:
                current = [served.link for served in self._links.values() if served is not None]
                self._lock.notify_all()
            for link in current:
                close_group(link.request)
                close_group(link.reply)
            for thread in receivers:
                thread.join(timeout=self.link_timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(_STOP)
        with self._lock:
            self._lock.notify_all()

    def _install(self, attention_rank: int, link: Link) -> None:
        """A new link epoch with ``attention_rank`` (acceptor thread): it replaces the current one."""
        with self._lock:
            old, self._links[attention_rank] = self._links[attention_rank], _Served(link)
            self._lock.notify_all()
        if old is not None:
            self._lose(old, f"replaced by link epoch {link.epoch}", quiet=True)

    def _next_batch(self) -> list[_Request]:
        """Block for one request, then take what else is queued (within batch_window_s)."""
        items = [self._queue.get()]
        window_end = time.monotonic() + self.batch_window_s
        while True:
            try:
                remaining = window_end - time.monotonic()
                items.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        batch = []
        for item in items:
            if item is _STOP:
                self._stopping.set()
            elif isinstance(item, _ReceiverCrash):
                raise RuntimeError("a data-plane receiver thread failed") from item.error
            else:
                batch.append(item)
        return batch

    def _serve_batch(self, compute: ExpertCompute, batch: list[_Request]) -> None:
        """Compute each (layer, version, shapes) group once; reply to every link in arrival order."""
        groups: dict[tuple, list[_Request]] = {}
        unanswered: dict[int, collections.deque[_Request]] = {}
        for request in batch:
            groups.setdefault(request.key, []).append(request)
            unanswered.setdefault(request.attention_rank, collections.deque()).append(request)
        sends = []
        for requests in groups.values():
            self._compute(compute, requests)
            for attention_rank in {r.attention_rank for r in requests}:
                waiting = unanswered[attention_rank]
                while waiting and waiting[0].reply is not None:
                    sends += self._send_reply(waiting.popleft())
        for served, work in sends:
            try:
                work.wait(timedelta(seconds=self.link_timeout_s))
            except RuntimeError as exc:
                self._lose(served, f"reply not delivered: {exc}")

    def _compute(self, compute: ExpertCompute, requests: list[_Request]) -> None:
        """One ``compute`` call for requests of one key; sets each request's ``reply`` buffer."""
        first = requests[0].wire
        counts = [r.wire.batch.num_tokens for r in requests]
        if len(requests) == 1:
            hidden, ids, weights = requests[0].hidden, requests[0].local_slot_ids, requests[0].weights
        else:
            hidden = torch.cat([r.hidden for r in requests])                  # [N, D]
            ids = torch.cat([r.local_slot_ids for r in requests])             # [N, K]
            weights = torch.cat([r.weights for r in requests])                # [N, K]
        header = BatchHeader(first.batch.map_version, first.batch.layer, first.batch.micro_batch, sum(counts),
                             first.batch.trace_context, tuple(r.wire.batch.trace_context for r in requests))
        status, held, error, parts = Status.OK, (), "", None
        try:
            out = compute(header, hidden, ids, weights)
            if out.shape != hidden.shape:
                raise ValueError(f"ExpertCompute returned {tuple(out.shape)} for {tuple(hidden.shape)} tokens")
            parts = out.to(first.dtype).split(counts)
        except StaleMapVersion as exc:
            status, held, error = Status.STALE_VERSION, exc.held_versions, str(exc)
        except Exception as exc:  # the compute's failure goes back to the requesters
            logger.exception("expert compute failed for layer %d version %d", first.batch.layer,
                             first.batch.map_version)
            status, error = Status.ERROR, f"{type(exc).__name__}: {exc}"
        self.num_batches += 1
        for i, request in enumerate(requests):
            w = request.wire
            buf = torch.empty(reply_nbytes(w.batch.num_tokens, w.hidden_size, w.dtype), dtype=torch.uint8,
                              device=self.group.device)
            words, out_view = reply_views(buf, w.batch.num_tokens, w.hidden_size, w.dtype)
            words.copy_(encode_header(WireHeader(Kind.REPLY, w.seq, w.batch, w.top_k, w.hidden_size, w.dtype,
                                                 w.weight_dtype, status, held, error)))
            if parts is None:
                out_view.zero_()
            else:
                out_view.copy_(parts[i])
            request.reply = buf

    def _send_reply(self, request: _Request) -> list:
        served = request.served
        if served.lost:
            return []
        try:
            work = served.link.reply.send([request.reply], _ATTENTION, tag_for(request.wire.seq))
        except RuntimeError as exc:
            self._lose(served, f"reply not sent: {exc}")
            return []
        self.num_requests += 1
        return [(served, work)]

    def _receive_from(self, attention_rank: int) -> None:
        try:
            while not self._stopping.is_set():
                served = self._next_link(attention_rank)
                if served is None:
                    return
                request = self._receive_one(attention_rank, served)
                if request is not None:
                    self._queue.put(request)
        except BaseException as exc:  # a bug, not a broken link: make serve() fail loudly
            self._queue.put(_ReceiverCrash(exc))

    def _next_link(self, attention_rank: int) -> _Served | None:
        """The link to receive on: the current one while usable, else the next one the acceptor
        installs (None on stop)."""
        with self._lock:
            while not self._stopping.is_set():
                served = self._links[attention_rank]
                if served is not None and not served.lost:
                    return served
                self._lock.wait()
        return None

    def _receive_one(self, attention_rank: int, served: _Served) -> _Request | None:
        """Next request from ``attention_rank`` on ``served``, or None when the link ended."""
        link = served.link
        device = self.group.device
        message = torch.empty(request_capacity(device), dtype=torch.uint8, device=device)
        try:
            link.request.recv([message], _ATTENTION, TAG_HEADER).wait(timedelta(seconds=IDLE_TIMEOUT_S))
        except RuntimeError as exc:
            if not self._stopping.is_set():
                idle = "Timed out" in str(exc)
                self._lose(served, f"idle for {IDLE_TIMEOUT_S:g} s" if idle else str(exc), quiet=idle)
            return None
        try:
            wire = decode_header(message[:HEADER_BYTES].view(torch.int64).cpu())
        except ProtocolError as exc:
            self._lose(served, str(exc))
            return None
        if wire.kind == Kind.CLOSE:
            self._lose(served, "closed by the attention rank", quiet=True)
            return None
        layout = layout_of(wire)
        if wire.flags & FLAG_INLINE:
            payload = message[HEADER_BYTES:HEADER_BYTES + layout.total]
        else:
            payload = torch.empty(layout.total, dtype=torch.uint8, device=device)
            try:
                link.request.recv([payload], _ATTENTION, tag_for(wire.seq)).wait(
                    timedelta(seconds=self.link_timeout_s))
            except RuntimeError as exc:
                if not self._stopping.is_set():
                    self._lose(served, f"payload of request {wire.seq} not received: {exc}")
                return None
        hidden, ids, weights = layout.views(payload)
        return _Request(attention_rank, served, wire, hidden, ids, weights)

    def _lose(self, served: _Served, reason: str, quiet: bool = False) -> None:
        with self._lock:
            if served.lost:
                return
            served.lost = reason
            self._lock.notify_all()
        link = served.link
        (logger.info if quiet else logger.warning)("data-plane link %d ↔ %d (epoch %d) ended: %s",
                                                   link.attention_rank, link.expert_rank, link.epoch, reason)
        close_group(link.request)
        close_group(link.reply)
