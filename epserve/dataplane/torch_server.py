"""``--moe-a2a-backend torch``, expert side: serve whoever sends, batching what arrived together.

Legend: n tokens of one request, N tokens of a batch, D hidden, K top-k.

Threads and queue:
- one receiver thread per attention rank a ("dataplane-recv-a"): a blocking receive of the
  next request from a on the (a, e) request group (no deadline: an idle worker sleeps in
  the kernel, it does not poll); small requests arrive whole, larger ones need a second
  receive for the payload (deadline ``link_timeout_s``); then ``queue.put(request)``. It ends on a CLOSE message, when the link breaks (the
  attention rank died: logged, other ranks are unaffected) or on ``stop()``.
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
from epserve.dataplane.torch_group import FOREVER, Link, TorchGroup, close_group
from epserve.dataplane.torch_wire import (FLAG_INLINE, HEADER_BYTES, TAG_HEADER, Kind, ProtocolError, Status,
                                          WireHeader, decode_header, encode_header, layout_of, reply_nbytes,
                                          reply_views, request_capacity, tag_for)

logger = logging.getLogger(__name__)

_ATTENTION = 0   # group rank of the attention side inside a link's groups
_STOP = object()


@dataclass
class _Request:
    attention_rank: int
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

    def __init__(self, group: TorchGroup, link_timeout_s: float = 30.0, batch_window_s: float = 0.0) -> None:
        if group.is_attention:
            raise ValueError(f"rank {group.rank} is an attention rank; an expert server runs on ranks "
                             f"[{group.num_attention_ranks}, {group.world_size})")
        self.group, self.link_timeout_s, self.batch_window_s = group, link_timeout_s, batch_window_s
        self._links = {a: group.links[a] for a in range(group.num_attention_ranks)}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._lost: set[int] = set()          # attention ranks whose link is unusable
        self._lost_lock = threading.Lock()
        self._started = False
        self.num_batches = 0                  # compute calls
        self.num_requests = 0                 # requests answered

    def serve(self, compute: ExpertCompute) -> None:
        if self._started:
            raise RuntimeError("serve() runs once per TorchExpertServer")
        self._started = True
        receivers = [threading.Thread(target=self._receive_from, args=(a, link), daemon=True,
                                      name=f"dataplane-recv-{a}") for a, link in self._links.items()]
        for thread in receivers:
            thread.start()
        try:
            while not self._stopping.is_set():
                batch = self._next_batch()
                if batch:
                    self._serve_batch(compute, batch)
        finally:
            self._stopping.set()
            for link in self._links.values():
                close_group(link.request)
                close_group(link.reply)
            for thread in receivers:
                thread.join(timeout=self.link_timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(_STOP)

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
        for attention_rank, work in sends:
            try:
                work.wait(timedelta(seconds=self.link_timeout_s))
            except RuntimeError as exc:
                self._lose(attention_rank, f"reply not delivered: {exc}")

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
        a = request.attention_rank
        if a in self._lost:
            return []
        try:
            work = self._links[a].reply.send([request.reply], _ATTENTION, tag_for(request.wire.seq))
        except RuntimeError as exc:
            self._lose(a, f"reply not sent: {exc}")
            return []
        self.num_requests += 1
        return [(a, work)]

    def _receive_from(self, attention_rank: int, link: Link) -> None:
        try:
            while not self._stopping.is_set():
                request = self._receive_one(attention_rank, link)
                if request is None:
                    return
                self._queue.put(request)
        except BaseException as exc:  # a bug, not a broken link: make serve() fail loudly
            self._queue.put(_ReceiverCrash(exc))

    def _receive_one(self, attention_rank: int, link: Link) -> _Request | None:
        """Next request from ``attention_rank``, or None when this receiver should end."""
        device = self.group.device
        message = torch.empty(request_capacity(device), dtype=torch.uint8, device=device)
        try:
            link.request.recv([message], _ATTENTION, TAG_HEADER).wait(FOREVER)
        except RuntimeError as exc:
            if not self._stopping.is_set():
                self._lose(attention_rank, str(exc))
            return None
        try:
            wire = decode_header(message[:HEADER_BYTES].view(torch.int64).cpu())
        except ProtocolError as exc:
            self._lose(attention_rank, str(exc))
            return None
        if wire.kind == Kind.CLOSE:
            logger.info("attention rank %d closed its data-plane link", attention_rank)
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
                    self._lose(attention_rank, f"payload of request {wire.seq} not received: {exc}")
                return None
        hidden, ids, weights = layout.views(payload)
        return _Request(attention_rank, wire, hidden, ids, weights)

    def _lose(self, attention_rank: int, reason: str) -> None:
        with self._lost_lock:
            if attention_rank in self._lost:
                return
            self._lost.add(attention_rank)
        logger.warning("data-plane link to attention rank %d lost: %s", attention_rank, reason)
        link = self._links[attention_rank]
        close_group(link.request)
        close_group(link.reply)
