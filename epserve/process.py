"""Process-level helpers shared by every epserve process's ``main()``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def shutdown_event() -> threading.Event:
    """An Event set by SIGTERM or SIGINT (call from the main thread)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def start_daemon_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread whose crash takes the process down instead of leaving it half alive."""

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


def announce(name: str, value: object) -> None:
    """Print ``NAME=value`` on stdout for a launcher to read (logs go to stderr)."""
    print(f"{name}={value}", flush=True)


def exit_now(code: int) -> None:
    """Exit without running C++ static destructors: gloo's threads may still be parked in the
    data plane's receives, and destroying them at interpreter exit aborts the process (134)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
