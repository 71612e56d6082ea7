"""Joining the ``torch`` data plane: rendezvous store, one link per (attention, expert) pair.

Legend: A attention ranks, W expert ranks. Attention workers are ranks [0, A), expert
workers ranks [A, A+W); expert worker w is rank A+w (W grows when expert workers are added).

- The placement service hosts a ``torch.distributed.TCPStore`` server
  (``start_rendezvous_store``); every worker connects to it as a client.
- For every (attention rank a, expert rank e) pair there is a *link*: two 2-rank groups,
  ``request`` (a → e) and ``reply`` (e → a), each formed by a rendezvous of its own on the store
  (``torch_links``: no world group, nothing collective over all ranks), so a link can be formed
  again whenever a peer restarts or a link breaks, without the other ranks. ``join_group``
  forms this rank's links to every peer before returning (``eager``) or none (the dispatcher
  forms them on first use and the expert server accepts them as they come).

Why one group per pair and direction, not one shared group (see also torch_p2p):
- gloo has no way to cancel a posted receive: a wait that passes its timeout closes *every*
  pair of that group's context ("Application timeout caused pair closure"). On a shared
  group, one expert that misses a deadline would cut an attention rank off from all experts;
  on a pair group it closes exactly that link.
- Each group is used by exactly one thread per process in normal operation (attention:
  the caller's thread; expert: one receiver thread per request group, the serving thread
  for all reply groups), so correctness never depends on a backend's thread-safety. On
  NCCL, send and recv on one communicator are ordered on one stream: a receive blocked on
  the next request would hold back the reply queued behind it; separate directions avoid it.

gloo facts this design rests on (torch 2.13 CPU, gloo TCP transport, checked on 127.0.0.1 by
the tests in tests/epserve/dataplane and ``bench/dataplane.py --probe-gloo-threads``):
- Threads: concurrent send/recv on ONE group from 4 threads per process × 3 processes, 3000
  variable-size messages each, arrived intact (the pair and context are mutex-protected).
  The design does not rely on it (see above); it does rely on one cross-thread use:
  ``close_group`` run while another thread is blocked in a receive on that group — the
  blocked receive wakes at once with "Application timeout caused pair closure".
- No cancellation: ``Work.abort()`` / ``ProcessGroup.abort()`` / ``shutdown()`` do not wake a
  blocked receive; ``Work.is_completed()`` stays False until ``wait()``; ``get_future()`` is
  not implemented for send/recv. The only bounded wait is ``wait(timeout)``, and it breaks
  the group when it expires (above).
- A posted receive whose buffer is freed before its message arrives leaves that message
  unread at the head of the pair: every later message on the pair waits behind it. Buffers
  of posted receives must live until the receive completes or the group is broken.
- A message shorter than the posted receive is accepted (the TCP transport checks
  length ≤ posted size); a longer one aborts the process. (Used for one-message requests.)
- Peer death (SIGKILL): the kernel closes its sockets; pending and new operations on every
  group shared with it fail within milliseconds with "Connection closed by peer"; groups not
  shared with it are unaffected.
- Idle: a thread blocked in a receive sleeps on a condition variable and gloo's loop thread in
  epoll; measured < 0.01 s CPU per second per process.

Nothing here touches torch's process-wide default group, so a process may form links at any
time and as often as membership changes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from epserve.dataplane.base import DataPlaneTimeout
from epserve.dataplane.torch_links import (Link, LinkAcceptor, StoreClient, connect, incarnation_key, new_token,
                                          publish_incarnation)
from epserve.dataplane.torch_wire import TAG_CLOSE_LINK

logger = logging.getLogger(__name__)


def start_rendezvous_store(host: str, port: int = 0) -> tuple[dist.TCPStore, int]:
    """Host the rendezvous store (server side) listening on ``host`` only (a wildcard host: every
    interface). port 0 picks a free port. → (store, port). torch's TCPStore server binds every
    interface whatever ``host`` says; given a listening socket (``master_listen_fd``) it uses that."""
    wildcard = host in ("", "0.0.0.0", "::", "[::]")
    bind_host = host.strip("[]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("" if wildcard else bind_host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    store = dist.TCPStore(bind_host if not wildcard else "127.0.0.1", bound, is_master=True, wait_for_workers=False,
                          master_listen_fd=sock.detach())      # the store owns the socket now
    return store, store.port


@dataclass(frozen=True)
class TorchGroup:
    """This process's membership: its rank, the layout, the links formed at join (peer rank →
    Link), and what forming more takes: the store's address, the deadline, and on an expert
    rank the token its links are offered under (``torch_links``)."""

    rank: int
    world_size: int
    num_attention_ranks: int
    device: torch.device
    links: dict[int, Link]
    dist_init_addr: str = ""
    timeout_s: float = 30.0
    token: str = ""

    @property
    def num_expert_ranks(self) -> int:
        return self.world_size - self.num_attention_ranks

    @property
    def is_attention(self) -> bool:
        return self.rank < self.num_attention_ranks

    def expert_rank(self, worker: int) -> int:
        return self.num_attention_ranks + worker


def join_group(rank: int, world_size: int, dist_init_addr: str, timeout_s: float, *,
               num_attention_ranks: int, device: torch.device | str = "cpu", eager: bool = True) -> TorchGroup:
    """Join the data plane as ``rank``: an expert rank publishes its incarnation token. With
    ``eager`` this returns once this rank has a link with every peer of the other role.

    gloo on CPU, NCCL on CUDA. Raises DataPlaneTimeout when the store or a peer does not show up
    within ``timeout_s`` (every step has that deadline).
    """
    if not 0 < num_attention_ranks < world_size or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size and 0 < attention ranks < world_size; got rank {rank}, "
                         f"world_size {world_size}, {num_attention_ranks} attention ranks")
    device = torch.device(device)
    client = StoreClient(dist_init_addr, timeout_s)
    is_attention = rank < num_attention_ranks
    token = "" if is_attention else new_token()
    links: dict[int, Link] = {}
    try:
        if not is_attention:
            publish_incarnation(client, rank, token)
        if eager:
            links = _join_eagerly(client, rank, world_size, num_attention_ranks, timeout_s, device, token)
    except (RuntimeError, TimeoutError, ConnectionError) as exc:   # DistError, DataPlaneTimeout, PeerLost
        raise DataPlaneTimeout(f"rank {rank} could not join the data plane of {world_size} ranks at "
                               f"{dist_init_addr} within {timeout_s}s: {exc}") from exc
    logger.info("rank %d joined the %s data plane: %d attention + %d expert ranks, %d links formed",
                rank, "nccl" if device.type == "cuda" else "gloo", num_attention_ranks,
                world_size - num_attention_ranks, len(links))
    return TorchGroup(rank, world_size, num_attention_ranks, device, links, dist_init_addr, timeout_s, token)


def _join_eagerly(client, rank: int, world_size: int, num_attention: int, timeout_s: float, device: torch.device,
                  token: str) -> dict[int, Link]:
    """Attention: a link to every expert rank (each waited for, within the deadline); expert: the
    first offer of every attention rank."""
    deadline = time.monotonic() + timeout_s
    links = {}
    if rank < num_attention:
        for expert_rank in range(num_attention, world_size):
            key = incarnation_key(expert_rank)
            remaining = max(deadline - time.monotonic(), 0.001)
            client.call(lambda s: s.wait([key], timedelta(seconds=remaining)))
            links[expert_rank] = connect(client, rank, expert_rank, max(deadline - time.monotonic(), 0.001), device)
        return links
    never = threading.Event()
    for attention_rank in range(num_attention):
        acceptor = LinkAcceptor(client.address, attention_rank, rank, token, timeout_s, device, lambda link: None,
                                never)
        link = acceptor.accept_one(max(deadline - time.monotonic(), 0.001))
        if link is None:
            raise DataPlaneTimeout(f"attention rank {attention_rank} did not offer a link within {timeout_s}s")
        links[attention_rank] = link
    return links


def close_group(group: dist.ProcessGroup) -> None:
    """Break ``group`` now: pending and later operations on it fail, on both sides.

    gloo cannot cancel a posted receive and ``abort()``/``shutdown()`` do not wake a thread
    blocked in one (checked with torch 2.13); what does is gloo's own rule that a wait
    passing its timeout closes every pair of the group. So: wait 1 ms on a receive that no
    one ever sends. Blocked receivers wake with an error, the peer sees "Connection closed".
    """
    if group.size() > 1 and not isinstance(group, dist.ProcessGroupGloo):
        group.abort()
        return
    try:
        peer = 1 - group.rank()
        group.recv([torch.empty(1)], peer, TAG_CLOSE_LINK).wait(timedelta(milliseconds=1))
    except RuntimeError:
        pass   # the expected timeout, or the group was already broken
