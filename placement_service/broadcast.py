"""Fan-out of placement updates to WatchPlacement streams: one queue per subscriber.

``Broadcaster.publish`` appends to every subscriber's queue and returns at once; each
stream's gRPC thread blocks in ``Subscription.get`` on its own condition variable, so a
slow subscriber delays only itself. A subscriber more than ``max_pending`` updates behind
is closed (its stream ends; the worker reconnects and receives the current map), which
bounds memory. ``close_all`` (shutdown) wakes every stream so it ends cleanly.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


class SubscriptionClosed(Exception):
    pass


class Subscription(Generic[Item]):
    def __init__(self, name: str, max_pending: int) -> None:
        self.name, self.max_pending = name, max_pending
        self._cond = threading.Condition()
        self._items: deque[Item] = deque()
        self._closed = False
        self.overflowed = False

    def put(self, item: Item) -> bool:
        """Queue ``item``; False if the subscription is (now) closed."""
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.max_pending:
                self._closed = self.overflowed = True
                self._items.clear()
                self._cond.notify_all()
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float | None = None) -> Item | None:
        """The next item; None after ``timeout_s`` with nothing queued; SubscriptionClosed once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout=timeout_s)
            if self._closed:
                raise SubscriptionClosed(self.name)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Broadcaster(Generic[Item]):
    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription[Item]] = set()
        self._closed = False

    def subscribe(self, name: str, initial: list[Item]) -> Subscription[Item]:
        """A new subscription with ``initial`` already queued. Raises SubscriptionClosed after close_all."""
        subscription: Subscription[Item] = Subscription(name, self.max_pending)
        for item in initial:
            subscription.put(item)
        with self._lock:
            if self._closed:
                raise SubscriptionClosed(name)
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[Item]) -> None:
        subscription.close()
        with self._lock:
            self._subscriptions.discard(subscription)

    def publish(self, item: Item, skip: Callable[[str], bool] | None = None) -> None:
        """Queue ``item`` for every subscriber whose name ``skip`` does not reject."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        if skip is not None:  # outside our lock: ``skip`` may take the caller's locks
            subscriptions = [s for s in subscriptions if not skip(s.name)]
        for subscription in subscriptions:
            if not subscription.put(item):
                if subscription.overflowed:
                    logger.warning("watcher %s fell %d updates behind; closing its stream (it will resync)",
                                   subscription.name, self.max_pending)
                self.unsubscribe(subscription)

    def subscriber_names(self) -> set[str]:
        with self._lock:
            return {subscription.name for subscription in self._subscriptions}

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            subscriptions = list(self._subscriptions)
            self._subscriptions.clear()
        for subscription in subscriptions:
            subscription.close()
