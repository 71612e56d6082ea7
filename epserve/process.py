"""The skeleton every epserve process's ``main()`` follows, and the helpers it is built from.

A process ``main()`` is one call, ``run_process(name, parser, make_config, title, serve, argv)``:

    parse flags                  argparse; the shared flags come from ``process_flags``
    resolve telemetry flags      --otlp-endpoint and --log-level fall back on the environment
    configure logging            stderr, at --log-level
    build the config             ``make_config(args)``: the process's config dataclass, validated in
                                 ``__post_init__``; a ValueError exits 2, its message on stderr
    title                        ``ps`` shows ``epserve <title(config)>`` (``set_process_title``)
    serve                        ``serve(config, stop)`` builds the process's objects, prints its
                                 ``NAME_PORT=`` line, waits for ``stop`` (SIGTERM/SIGINT), shuts down
                                 and returns the exit code

``start_telemetry`` is the tracing + /metrics part of ``serve`` that the gateway and the workers
share (placement builds its own inside its server); ``serve_worker`` is the whole ``serve`` of both
worker kinds.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from epserve.process_flags import resolve_telemetry_arguments

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


ConfigT = TypeVar("ConfigT")


def run_process(name: str, parser: argparse.ArgumentParser,
                make_config: Callable[[argparse.Namespace], ConfigT], title: Callable[[ConfigT], str],
                serve: Callable[[ConfigT, threading.Event], int], argv: Sequence[str] | None = None) -> int:
    """Parse flags, build the config, serve until SIGTERM/SIGINT (the module docstring's skeleton).
    ``name``: the process package's, which starts its refusals. Returns the exit code: ``serve``'s,
    or 2 for a bad flag or configuration."""
    args = parser.parse_args(argv)
    resolve_telemetry_arguments(args, os.environ)
    configure_logging(args.log_level)
    try:
        config = make_config(args)
    except (ValueError, OSError) as exc:     # a bad flag, or a file the config reads
        return refuse(name, exc)
    set_process_title(title(config))
    return serve(config, shutdown_event())


def refuse(name: str, exc: Exception) -> int:
    """Report a bad flag or configuration on stderr as ``NAME: MESSAGE`` (the line ``epserve up``
    quotes when a child exits): exit code 2."""
    print(f"{name}: {exc}", file=sys.stderr, flush=True)
    return 2


@dataclass
class Telemetry:
    """A process's tracing and, with ``--metrics-port``, its metrics and their ``/metrics`` endpoint."""
    tracing: Any                            # epserve.telemetry.Tracing (no-op without --otlp-endpoint)
    metrics: Any | None                     # the process's metrics class; None without --metrics-port
    metrics_server: Any | None = None

    def stop(self) -> None:
        """Flush traces, stop the endpoint."""
        self.tracing.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.stop()


def start_telemetry(service_name: str, config: Any, make_metrics: Callable[[], Any],
                    resource_attributes: dict[str, str] | None = None) -> Telemetry:
    """Tracing to ``config.otlp_endpoint`` and, when ``config.metrics_port`` is not None, ``make_metrics()``
    served on it from ``config.host`` (``METRICS_PORT=`` printed). ValueError for a bad endpoint."""
    from epserve.telemetry import setup_tracing, start_metrics_server

    tracing = setup_tracing(service_name, config.otlp_endpoint, resource_attributes=resource_attributes)
    telemetry = Telemetry(tracing, make_metrics() if config.metrics_port is not None else None)
    if telemetry.metrics is not None:
        telemetry.metrics_server = start_metrics_server(config.metrics_port, telemetry.metrics.registry, config.host)
        announce("METRICS_PORT", telemetry.metrics_server.port)
    return telemetry


def serve_worker(config: Any, stop: threading.Event, *, name: str, service_name: str,
                 make_metrics: Callable[[], Any], build_worker: Callable[[Any, Any, Any], Any],
                 port_line: str) -> int:
    """The ``serve`` of an attention or expert worker: telemetry, ``torch`` threads, build the worker,
    print its port, join the deployment, serve until ``stop``, leave. ``config`` needs
    ``otlp_endpoint``, ``worker_id``, ``metrics_port``, ``host`` and ``num_threads``;
    ``build_worker(config, tracing, metrics)`` returns an object with ``server.port``, ``start()``
    (join) and ``stop()``. Returns the exit code: 1 when the worker cannot join."""
    import torch

    try:
        telemetry = start_telemetry(service_name, config, make_metrics, {"service.instance.id": config.worker_id})
    except ValueError as exc:
        return refuse(name, exc)
    torch.set_num_threads(config.num_threads)
    worker = build_worker(config, telemetry.tracing, telemetry.metrics)
    announce(port_line, worker.server.port)
    code = 0
    try:
        worker.start()
    except Exception as exc:  # registration refused or timed out
        logger.error("%s cannot join the deployment: %s", name, exc)
        code = 1
    else:
        stop.wait()
        logger.info("signal received; shutting down")
    worker.stop()
    telemetry.stop()
    return code
