"""``python -m epserve.gateway``: parse flags, build the Gateway, serve until SIGTERM/SIGINT, exit 0.

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
import signal
import sys
import threading
from collections.abc import Sequence

from epserve.gateway.config import build_parser, config_from_args
from epserve.process import set_process_title

logger = logging.getLogger("epserve.gateway")


def _die_on_thread_crash(args: threading.ExceptHookArgs) -> None:
    logger.critical("thread %s crashed; exiting", args.thread.name if args.thread else "?",
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.otlp_endpoint:
        args.otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    # heavy imports (grpc, tokenizers, OTel) after flag parsing
    from epserve.telemetry import GatewayMetrics, setup_tracing, start_metrics_server
    from epserve.gateway.observer import NullObserver, TelemetryObserver
    from epserve.gateway.server import TRACING_SERVICE_NAME, Gateway

    set_process_title("gateway")
    threading.excepthook = _die_on_thread_crash
    try:
        tracing = setup_tracing(TRACING_SERVICE_NAME, config.otlp_endpoint)
    except ValueError as exc:
        parser.error(str(exc))
    metrics = GatewayMetrics() if config.metrics_port is not None else None
    observer = TelemetryObserver(metrics) if metrics is not None or tracing.enabled else NullObserver()
    try:
        gateway = Gateway(config, observer, tracing)
    except ValueError as exc:
        parser.error(str(exc))
    metrics_server = None
    if metrics is not None:
        metrics_server = start_metrics_server(config.metrics_port, metrics.registry, config.host)
        print(f"METRICS_PORT={metrics_server.port}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    port = gateway.start()
    print(f"GATEWAY_PORT={port}", flush=True)
    while not stop.wait(0.5):
        pass
    logger.info("signal received: shutting down")
    gateway.shutdown()
    tracing.shutdown()
    if metrics_server is not None:
        metrics_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
