"""Background threads of the placement service: a crash takes the process down.

A monitor thread that dies silently would leave a service that answers RPCs but never
marks a worker dead; ``start_daemon_thread`` logs the traceback and ``os._exit(1)``s so a
supervisor restarts the service instead.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


def start_daemon_thread(target: Callable[[], None], name: str) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException:  # noqa: BLE001 - any escape is fatal by design
            logger.critical("background thread %s crashed; exiting the process", name, exc_info=True)
            logging.shutdown()
            os._exit(1)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
