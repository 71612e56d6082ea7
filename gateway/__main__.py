"""``python -m epserve.gateway``: parse flags, build the Gateway, serve until SIGTERM/SIGINT, exit 0 (2 for bad
flags or configuration): the process skeleton, ``epserve.process.run_process``.

The epserve gateway: the public ``epserve.v1.Generation`` gRPC API in front of the attention workers.

``python -m epserve.gateway --help`` lists the flags. A request flows through these pieces:

    servicer.py          proto <-> dataclasses, error -> status code (thin)
    request_manager.py   tokenize (tokenizer.py), validate (validation.py), register the request id,
                         pick a worker (router.py, least outstanding tokens), stream its token ids,
                         turn them into text (output_processor.py: detokenizer.py + stop_strings.py),
                         abort / cancel / retry on another worker when one is lost
    worker_pool.py       the attention workers known (static list and/or placement discovery),
                         which of them answer (GetLoad probes), one gRPC client each (worker_client.py)
    sglang_servicer.py   SGLang's SglangScheduler on the same port, for SGLang's model gateway (smg):
                         token ids in (sglang_convert.py), n samples (parallel_samples.py), the
                         same request manager
    server.py            builds the objects above from a GatewayConfig (config.py), serves, shuts down

Context length: a prompt must be shorter than the model's context (max_position_embeddings);
``max_new_tokens`` may ask for more than fits, in which case the gateway lowers it to
``context - prompt_tokens`` before sending the request to a worker and the stream ends with
finish_reason LENGTH when the context is full.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

from epserve.gateway.config import PORT_LINE, GatewayConfig, build_parser, config_from_args
from epserve.process import announce, refuse, run_process

logger = logging.getLogger("epserve.gateway")


def _die_on_thread_crash(args: threading.ExceptHookArgs) -> None:
    logger.critical("thread %s crashed; exiting", args.thread.name if args.thread else "?",
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    os._exit(1)


def serve(config: GatewayConfig, stop: threading.Event) -> int:
    # heavy imports (grpc, tokenizers, OTel) after flag parsing
    from epserve.gateway.observer import NullObserver, TelemetryObserver
    from epserve.gateway.server import TRACING_SERVICE_NAME, Gateway
    from epserve.process import start_telemetry
    from epserve.telemetry import GatewayMetrics

    threading.excepthook = _die_on_thread_crash
    try:
        telemetry = start_telemetry(TRACING_SERVICE_NAME, config, GatewayMetrics)
    except ValueError as exc:
        return refuse("gateway", exc)
    observer = (TelemetryObserver(telemetry.metrics) if telemetry.metrics is not None or telemetry.tracing.enabled
                else NullObserver())
    try:
        gateway = Gateway(config, observer, telemetry.tracing)
    except ValueError as exc:
        telemetry.stop()
        return refuse("gateway", exc)
    announce(PORT_LINE, gateway.start())
    stop.wait()
    logger.info("signal received; shutting down")
    gateway.shutdown()
    telemetry.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_process("gateway", build_parser(), config_from_args, lambda config: "gateway", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
