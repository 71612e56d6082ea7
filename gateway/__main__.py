"""``python -m gateway``: parse flags, build the Gateway, serve until SIGTERM/SIGINT, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from gateway.config import build_parser, config_from_args

logger = logging.getLogger("gateway")


def _die_on_thread_crash(args: threading.ExceptHookArgs) -> None:
    logger.critical("thread %s crashed; exiting", args.thread.name if args.thread else "?",
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from gateway.server import Gateway  # heavy imports (grpc, tokenizers) after flag parsing

    threading.excepthook = _die_on_thread_crash
    try:
        gateway = Gateway(config)
    except ValueError as exc:
        parser.error(str(exc))
    if config.metrics_port is not None:
        logger.warning("--metrics-port %d: metrics are not served yet", config.metrics_port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    port = gateway.start()
    print(f"GATEWAY_PORT={port}", flush=True)
    while not stop.wait(0.5):
        pass
    logger.info("signal received: shutting down")
    gateway.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
