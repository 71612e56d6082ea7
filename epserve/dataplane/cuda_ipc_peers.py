"""Who is on the other end of a ``cuda_ipc`` channel: rendezvous, liveness, and polite polling.

- Rendezvous: the torch.distributed ``TCPStore`` the placement service hosts (the one the
  ``torch`` backend joins, ``DataPlaneInfo.dist_init_addr``), under the prefix
  ``epserve/cuda_ipc/``. Values are JSON: each rank's process (pid, start time), the attention
  ranks' channel memory descriptions, and the experts' "opened" acknowledgements.
- Liveness: ``PeerProcess`` holds a pidfd of the peer (Linux ≥ 5.3), readable once the process
  has exited (a zombie counts as dead); where pidfds are missing it reads /proc/<pid>/stat
  (state and start time, so a reused pid is not taken for the peer). Same host, same PID
  namespace: that is what sharing memory needs anyway.
- ``Backoff``: every wait polls a sequence number; it spins for ``spin_s`` and then sleeps,
  doubling from 10 µs up to ``max_sleep_s``, so a busy exchange answers in microseconds and an
  idle process wakes a few hundred times a second at most.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from epserve.dataplane.base import DataPlaneTimeout
from epserve.dataplane.torch_links import parse_addr

STORE_PREFIX = "epserve/cuda_ipc/"


def connect_store(dist_init_addr: str, timeout_s: float) -> dist.Store:
    """A client of the rendezvous store at ``host:port``, keys under STORE_PREFIX."""
    host, port = parse_addr(dist_init_addr)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError) as exc:   # DistNetworkError, DistStoreError
        raise DataPlaneTimeout(f"rendezvous store {dist_init_addr} not reachable within {timeout_s}s: {exc}") from exc
    return dist.PrefixStore(STORE_PREFIX, store)


def publish(store: dist.Store, key: str, value: dict) -> None:
    store.set(key, json.dumps(value))


def fetch(store: dist.Store, key: str, timeout_s: float, peer_rank: int | None, what: str) -> dict:
    """The JSON value of ``key`` once some rank has published it; DataPlaneTimeout after ``timeout_s``."""
    try:
        store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
    except (RuntimeError, TimeoutError) as exc:
        raise DataPlaneTimeout(f"{what} did not appear in the rendezvous store within {timeout_s:.1f}s "
                               f"(key {STORE_PREFIX}{key}): {exc}", peer_rank=peer_rank) from exc
    return json.loads(store.get(key).decode("utf-8"))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_identity(pid: int | None = None) -> dict:
    """A process (default: this one) as its peers see it: pid, start time (clock ticks since boot), host name."""
    pid = os.getpid() if pid is None else pid
    fields = _stat_fields(pid)
    return {"pid": pid, "start_time": int(fields[19]) if fields else 0, "host": socket.gethostname()}


class PeerProcess:
    """Whether one peer process still runs. ``alive()`` costs one poll() (or one /proc read)."""

    def __init__(self, identity: dict, rank: int) -> None:
        self.pid, self.start_time, self.rank = int(identity["pid"]), int(identity["start_time"]), rank
        self.host = identity.get("host", "")
        self._pidfd: int | None = None
        if not self._matches():
            raise ValueError(f"rank {rank} (pid {self.pid} on {self.host or '?'}) is not a process this one can see: "
                             "the cuda_ipc data plane needs every worker on one host, in one PID namespace")
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):       # no pidfd: fall back to /proc
            self._pidfd = None
        if self._pidfd is not None and not self._matches():   # the pid was reused before the pidfd opened
            self.close()
            raise ValueError(f"rank {rank} (pid {self.pid}) exited during the join")

    def _matches(self) -> bool:
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] not in ("Z", "X") and \
            (not self.start_time or int(fields[19]) == self.start_time)

    def alive(self) -> bool:
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            return not readable
        return self._matches()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class Backoff:
    """Spin ``spin_s`` after ``reset``, then sleep 10 µs, 20 µs, ... up to ``max_sleep_s`` per ``pause``.

    ``yield_gil``: each ``pause`` of the spin releases the GIL (``time.sleep(0)``) so the process's other
    threads run at once — a poller that spins long (``spin_s`` in milliseconds) must not hold them up to
    the interpreter's switch interval (5 ms)."""

    FIRST_SLEEP_S = 10e-6

    def __init__(self, spin_s: float = 50e-6, max_sleep_s: float = 1e-3, yield_gil: bool = False) -> None:
        self.spin_s, self.max_sleep_s, self.yield_gil = spin_s, max_sleep_s, yield_gil
        self.reset()

    def reset(self) -> None:
        self._spin_until = time.perf_counter() + self.spin_s
        self._sleep_s = 0.0

    def pause(self) -> None:
        if self._sleep_s == 0.0:
            if time.perf_counter() < self._spin_until:
                if self.yield_gil:
                    time.sleep(0)
                return
            self._sleep_s = self.FIRST_SLEEP_S
        time.sleep(self._sleep_s)
        self._sleep_s = min(self._sleep_s * 2, self.max_sleep_s)


LIVENESS_EVERY_S = 0.005   # how often a wait checks that its peer still runs


class PeerGone(Exception):
    """Raised by ``wait_until``'s ``gone`` check: the reason the peer cannot answer."""


def wait_until(ready, deadline: float, gone, backoff: Backoff | None = None) -> bool:
    """Poll ``ready()`` until true (→ True) or ``deadline`` (time.monotonic, → False).

    Every LIVENESS_EVERY_S it calls ``gone()``, which returns a reason (raised as PeerGone) or "".
    """
    backoff = backoff if backoff is not None else Backoff()
    backoff.reset()
    next_check = time.monotonic() + LIVENESS_EVERY_S
    while True:
        if ready():
            return True
        now = time.monotonic()
        if now >= next_check:
            reason = gone()
            if reason:
                raise PeerGone(reason)
            if ready():
                return True
            next_check = now + LIVENESS_EVERY_S
        if now >= deadline:
            return False
        backoff.pause()
