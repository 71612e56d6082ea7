"""Process-level helpers shared by every epserve process's ``main()``."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

PR_SET_NAME = 15                         # prctl(2): the calling thread's name, /proc/self/comm
TASK_COMM_LEN = 16                       # the kernel keeps 15 bytes of it and a NUL


def set_process_title(name: str) -> None:
    """Show this process in ``ps`` by role and id, e.g. ``name`` = ``expert-1``: ``/proc/self/comm``
    (``ps -e``, ``top``, ``pgrep``) becomes ``expert-1`` (prctl PR_SET_NAME; 15 bytes at most, so
    the name alone), and the command line (``ps -f``, ``ps aux``, ``pgrep -f``) becomes
    ``epserve expert-1``, written over the process's own argv memory (never longer than it was).
    Call it from the main thread before starting others (they inherit the name). Linux only:
    elsewhere, or if /proc is unreadable, the title stays as it was."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:TASK_COMM_LEN - 1]), 0, 0, 0)
        with open("/proc/self/stat") as f:       # fields after the ")" that ends comm start at field 3
            fields = f.read().rsplit(")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])          # fields 48 and 49
    except (OSError, IndexError, ValueError):
        return
    size = arg_end - arg_start
    title = f"epserve {name}".encode()[:size - 1]
    ctypes.memmove(arg_start, title + b"\0" * (size - len(title)), size)


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


def run_worker_process(prog: str, service_name: str, config, metrics_class, build_worker, port_key: str) -> int:
    """The common life of a worker process after its config is built: tracing and metrics,
    ``torch`` threads, build the worker, announce its port, join the deployment, serve until
    SIGTERM/SIGINT, stop. ``config`` needs ``otlp_endpoint``, ``worker_id``, ``metrics_port``,
    ``host`` and ``num_threads``; ``build_worker(config, tracing, metrics)`` returns an object
    with ``server.port``, ``start()`` and ``stop()``. Returns the exit code."""
    import torch

    from epserve.telemetry import setup_tracing, start_metrics_server

    set_process_title(config.worker_id)

    try:
        tracing = setup_tracing(service_name, config.otlp_endpoint,
                                resource_attributes={"service.instance.id": config.worker_id})
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    metrics = metrics_class() if config.metrics_port is not None else None
    metrics_server = None
    if metrics is not None:
        metrics_server = start_metrics_server(config.metrics_port, metrics.registry, config.host)
        announce("METRICS_PORT", metrics_server.port)
    torch.set_num_threads(config.num_threads)
    stop = shutdown_event()
    worker = build_worker(config, tracing, metrics)
    announce(port_key, worker.server.port)
    code = 0
    try:
        worker.start()
    except Exception as exc:  # registration refused or timed out
        logger.error("%s cannot join the deployment: %s", prog, exc)
        code = 1
    else:
        stop.wait()
        logger.info("signal received; shutting down")
    worker.stop()
    tracing.shutdown()
    if metrics_server is not None:
        metrics_server.stop()
    return code
