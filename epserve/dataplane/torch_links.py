"""Links of the ``torch`` data plane, each formed by a rendezvous of its own.

Legend: a an attention rank, e an expert rank.

A link (``Link``) is two 2-rank groups between one attention and one expert
process: request (a → e) and reply (e → a). Each group is a ``ProcessGroupGloo`` (NCCL on
CUDA, never run) built directly on a fresh key prefix of placement's rendezvous store — there
is no world group and nothing collective over all ranks — so one pair can be (re)formed at any
time without the others: when an expert worker restarts (a new process on the same rank), when
an attention worker restarts, when a link broke (a peer died, a wait passed its deadline) and
the peer is still there, when the store itself restarted with placement. Each formation is a
*link epoch*: a new rendezvous under keys no earlier epoch used.

Store keys (under ``epserve/dataplane/``):
- ``incarnation/{e}``: the token (a fresh uuid) of the process serving expert rank e now,
  written when it starts serving and written again if the store lost it.
- ``link/{a}/{e}/{token}/n``: the attention side bumps it to offer a link epoch g
  (``store.add``), then sets ``.../offer/{g}``; the two groups meet at ``.../{g}/request/`` and
  ``.../{g}/reply/``. A restarted expert has a new token, hence fresh counters.

Attention side: ``connect`` (the dispatcher's thread) reads e's token (waiting for it within the
deadline: an expert starting up publishes it when it starts serving), offers g and builds both
groups as group rank 0. Expert side: one ``LinkAcceptor`` thread per attention rank waits for
the next offer in rounds of ``ROUND_S``; at each round it re-reads the counter (a newer offer
supersedes older ones, a counter that went back means the store restarted) and re-publishes the
token if it is missing; for an offer it builds both groups as group rank 1 and hands the link to
its server, which closes the link it replaces (waking a receiver blocked on it). Every wait has
a deadline: store waits one round, each group formation ``timeout_s``, a lost store connection
one reconnect (``StoreClient``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from epserve.dataplane.base import DataPlaneTimeout, PeerLost

logger = logging.getLogger(__name__)

STORE_PREFIX = "epserve/dataplane/"
ROUND_S = 1.0          # an acceptor's store wait; also how soon it notices a restarted store
IDLE_TIMEOUT_S = 300.0  # the expert side's wait for the next request: a link idle this long is ended
IDLE_REFRESH_S = IDLE_TIMEOUT_S / 2   # the attention side forms a fresh link before using one idle this long
# Elastic EP forms links with peers that may have just died: each side gives up after this. The expert
# side starts forming a moment after the attention side offered, so its deadline ends a moment later.
ELASTIC_FORM_TIMEOUT_S = 2.0
T = TypeVar("T")


def parse_addr(dist_init_addr: str) -> tuple[str, int]:
    host, sep, port = dist_init_addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"dist_init_addr must be host:port, got {dist_init_addr!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Link:
    """The two groups between one attention rank and one expert rank.

    In both groups the attention rank is group rank 0 and the expert rank group rank 1.
    """

    attention_rank: int
    expert_rank: int
    request: dist.ProcessGroup    # attention → expert
    reply: dist.ProcessGroup      # expert → attention
    epoch: int = 0                # which formation of this pair's link (a link epoch)
    incarnation: str = ""         # the expert process's token when it was formed


class StoreClient:
    """A client of the rendezvous store for one thread; reconnects once when the connection broke
    (placement restarted), and follows a moved store (``set_address``)."""

    def __init__(self, dist_init_addr: str, timeout_s: float) -> None:
        self.address, self.timeout_s = dist_init_addr, timeout_s
        self._store: dist.Store | None = None

    def set_address(self, dist_init_addr: str) -> None:
        if dist_init_addr != self.address:
            self.address, self._store = dist_init_addr, None

    def store(self) -> dist.Store:
        """The prefixed store, connected within ``timeout_s``; raises DataPlaneTimeout."""
        if self._store is None:
            host, port = parse_addr(self.address)
            try:
                client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=self.timeout_s))
            except (RuntimeError, TimeoutError) as exc:
                raise DataPlaneTimeout(f"rendezvous store {self.address} not reachable within {self.timeout_s}s: "
                                       f"{exc}") from exc
            self._store = dist.PrefixStore(STORE_PREFIX, client)
        return self._store

    def call(self, op: Callable[[dist.Store], T]) -> T:
        """``op(store)``, once more on a fresh connection if the first broke. A wait that times out
        raises ``torch.distributed.DistStoreError`` (no retry)."""
        try:
            return op(self.store())
        except dist.DistNetworkError:
            self._store = None
            return op(self.store())


def incarnation_key(expert_rank: int) -> str:
    return f"incarnation/{expert_rank}"


def link_base(attention_rank: int, expert_rank: int, token: str) -> str:
    return f"link/{attention_rank}/{expert_rank}/{token}/"


def form_group(store: dist.Store, prefix: str, group_rank: int, timeout_s: float,
               device: torch.device) -> dist.ProcessGroup:
    """One 2-rank group of a link, met at ``prefix`` within ``timeout_s`` (raises on timeout)."""
    scoped = dist.PrefixStore(prefix, store)
    if device.type == "cuda":           # written, never run (see torch_p2p)
        return dist.ProcessGroupNCCL(scoped, group_rank, 2)
    return dist.ProcessGroupGloo(scoped, group_rank, 2, timedelta(seconds=timeout_s))


def connect(client: StoreClient, attention_rank: int, expert_rank: int, timeout_s: float,
            device: torch.device) -> Link:
    """Attention side: offer and form a new link epoch with expert rank ``expert_rank``. Raises
    PeerLost when no process serves that rank or it does not answer within ``timeout_s``."""
    try:
        key = incarnation_key(expert_rank)
        try:                                # an expert still starting up (or a restarted store) publishes soon
            client.call(lambda s: s.wait([key], timedelta(seconds=timeout_s)))
        except dist.DistStoreError:
            raise PeerLost(f"expert rank {expert_rank} has not joined the data plane within {timeout_s}s",
                           peer_rank=expert_rank) from None
        token = client.call(lambda s: s.get(key)).decode()
        base = link_base(attention_rank, expert_rank, token)
        epoch = client.call(lambda s: s.add(base + "n", 1))
        client.call(lambda s: s.set(f"{base}offer/{epoch}", b"1"))
        store = client.store()
        request = form_group(store, f"{base}{epoch}/request/", 0, timeout_s, device)
        reply = form_group(store, f"{base}{epoch}/reply/", 0, timeout_s, device)
    except (RuntimeError, TimeoutError) as exc:       # DistError, DataPlaneTimeout
        raise PeerLost(f"no link to expert rank {expert_rank} within {timeout_s}s: {exc}",
                       peer_rank=expert_rank) from exc
    logger.info("data-plane link %d ↔ %d formed (epoch %d of expert incarnation %s)", attention_rank, expert_rank,
                epoch, token[:8])
    return Link(attention_rank, expert_rank, request, reply, epoch, token)


def incarnation(client: StoreClient, expert_rank: int) -> str:
    """The token of the process serving ``expert_rank`` now ("" when none, or the store is away)."""
    key = incarnation_key(expert_rank)
    try:
        return client.call(lambda s: s.get(key).decode() if s.check([key]) else "")
    except (RuntimeError, TimeoutError):
        return ""


def new_token() -> str:
    return uuid.uuid4().hex


def publish_incarnation(client: StoreClient, expert_rank: int, token: str) -> None:
    """Expert side: from now on links to ``expert_rank`` are offered to this process."""
    client.call(lambda s: s.set(incarnation_key(expert_rank), token.encode()))


class LinkAcceptor:
    """Expert side, one per attention rank: accepts link epochs offered by that rank, in order, on
    its own thread, until ``stopping`` is set; ``on_link(link)`` gets each link formed."""

    def __init__(self, dist_init_addr: str, attention_rank: int, expert_rank: int, token: str, timeout_s: float,
                 device: torch.device, on_link: Callable[[Link], None], stopping: threading.Event) -> None:
        self.client = StoreClient(dist_init_addr, timeout_s)
        self.attention_rank, self.expert_rank, self.token = attention_rank, expert_rank, token
        self.timeout_s, self.device, self.on_link, self.stopping = timeout_s, device, on_link, stopping
        self.base = link_base(attention_rank, expert_rank, token)
        self.next_epoch = 1

    def accept_one(self, deadline_s: float) -> Link | None:
        """Wait up to ``deadline_s`` for the next offer and form it (eager joins use this)."""
        rounds = max(int(deadline_s / ROUND_S), 1)
        for _ in range(rounds):
            if self.stopping.is_set():
                return None
            link = self._round(min(ROUND_S, deadline_s))
            if link is not None:
                return link
        return None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                link = self._round(ROUND_S)
            except DataPlaneTimeout as exc:            # the store is away (placement restarting)
                logger.warning("link acceptor for attention rank %d: %s", self.attention_rank, exc)
                self.stopping.wait(ROUND_S)
                continue
            if link is not None:
                self.on_link(link)

    def _round(self, wait_s: float) -> Link | None:
        offer = f"{self.base}offer/{self.next_epoch}"
        try:
            self.client.call(lambda s: s.wait([offer], timedelta(seconds=wait_s)))
        except dist.DistStoreError:
            self._resync()
            return None
        except dist.DistNetworkError as exc:
            raise DataPlaneTimeout(f"rendezvous store {self.client.address} unreachable: {exc}") from exc
        latest = self.client.call(lambda s: s.add(self.base + "n", 0))
        epoch = max(self.next_epoch, latest)            # a newer offer supersedes this one
        self.next_epoch = epoch + 1
        store = self.client.store()
        try:
            request = form_group(store, f"{self.base}{epoch}/request/", 1, self.timeout_s, self.device)
            reply = form_group(store, f"{self.base}{epoch}/reply/", 1, self.timeout_s, self.device)
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("link epoch %d with attention rank %d not formed: %s", epoch, self.attention_rank, exc)
            return None
        logger.info("data-plane link %d ↔ %d formed (epoch %d)", self.attention_rank, self.expert_rank, epoch)
        return Link(self.attention_rank, self.expert_rank, request, reply, epoch, self.token)

    def _resync(self) -> None:
        """Between offers: skip to the newest offer, follow a restarted store, keep the token published."""
        latest = self.client.call(lambda s: s.add(self.base + "n", 0))
        if latest >= self.next_epoch or latest < self.next_epoch - 1:
            self.next_epoch = max(latest, 1)
        key = incarnation_key(self.expert_rank)
        if not self.client.call(lambda s: s.check([key])):
            publish_incarnation(self.client, self.expert_rank, self.token)
