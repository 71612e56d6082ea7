"""``python -m epserve.placement_service``: parse flags, build PlacementConfig, serve until SIGTERM/SIGINT.

Prints one line ``PLACEMENT_PORT=<port>`` on stdout once the gRPC server listens (so a
launcher can read the port when ``--port 0``); logs go to stderr. Exits 0 after a graceful
shutdown, 2 for bad flags or configuration.

The placement service process (``python -m epserve.placement_service``).

Owns the worker registry (ranks, health), the versioned expert map and its persistence,
and pushes maps to workers over the Placement gRPC service; PlacementAdmin answers
operators. Files: ``config`` (flags → PlacementConfig), ``registry`` (workers, ranks,
health), ``state`` (map versions, load), ``state_db`` (SQLite), ``broadcast`` (watch
queues), ``controller`` (the logic, no gRPC), ``service`` (thin servicers), ``server``
(build / stop), ``eplb/`` (placement algorithms).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from epserve.dummy_weights import LOAD_FORMATS
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.placement_service.config import (ELASTIC_EP_BACKENDS, EPLB_ALGORITHMS, MOE_A2A_BACKENDS,
                                              PlacementConfig)
from epserve.placement_service.server import start_placement_server
from epserve.process import set_process_title

logger = logging.getLogger("epserve.placement_service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m epserve.placement_service",
        description="The placement service: registers attention and expert workers, assigns data-plane "
                    "ranks, owns the versioned expert map and pushes it to workers, tracks worker health.")
    parser.add_argument("--model-path", required=True,
                        help="model directory; only its config.json is read (MoE layers, experts, fingerprint)")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="the workers' --load-format: workers on dummy (random) weights have another model "
                             "fingerprint than workers reading the checkpoint, and only those matching this are "
                             "accepted (default: auto)")
    parser.add_argument("--host", default="127.0.0.1", help="address the gRPC server binds (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="gRPC port; 0 picks a free one (default: 0). The bound port is printed as "
                             "PLACEMENT_PORT=<port> on stdout")
    parser.add_argument("--dp-size", type=int, default=1, help="number of attention (DP) workers expected (default: 1)")
    parser.add_argument("--ep-size", type=int, default=1,
                        help="number of expert workers expected; 0 (and only 0) with --moe-a2a-backend local "
                             "(default: 1)")
    parser.add_argument("--ep-num-redundant-experts", type=int, default=0,
                        help="redundant physical expert slots R per MoE layer; (experts + R) must divide "
                             "evenly by --ep-size (default: 0)")
    parser.add_argument("--init-expert-location", default="trivial",
                        help="initial placement: 'trivial' (slot p holds expert p %% E) or a snapshot file "
                             "(.json / .pt) (default: trivial)")
    parser.add_argument("--moe-a2a-backend", default="torch", choices=MOE_A2A_BACKENDS,
                        help="data-plane backend, passed on to workers; local = a colocated deployment: every "
                             "attention worker holds all experts, no expert workers (--ep-size 0), no expert map, "
                             "EPLB and map-changing admin RPCs answer FAILED_PRECONDITION (default: torch)")
    parser.add_argument("--dist-port", type=int, default=0,
                        help="port of the torch.distributed rendezvous store hosted here; 0 picks one "
                             "(reused across restarts with --state-db) (default: 0)")
    parser.add_argument("--advertise-host", default=None,
                        help="host workers use to reach the rendezvous store (default: --host, or "
                             "127.0.0.1 when --host is a wildcard)")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=1000,
                        help="how often workers heartbeat (default: 1000)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                        help="a worker is SUSPECT after 2 missed heartbeats and DEAD after this long "
                             "without one (default: 5000)")
    parser.add_argument("--state-db", default=None,
                        help="SQLite file for map versions, settings and the worker registry; a restart "
                             "with the same file resumes at the same version and ranks (default: none, in memory)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (printed "
                             "as METRICS_PORT=<port> before PLACEMENT_PORT=); default: off")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="OTLP gRPC collector HOST:PORT for traces (service.name epserve-placement) "
                             "(default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing)")
    eplb = parser.add_argument_group("EPLB and map changes (see docs/operations.md)")
    eplb.add_argument("--enable-eplb", action="store_true",
                      help="rebalance expert placement automatically from the load attention workers report")
    eplb.add_argument("--eplb-algorithm", default="auto", choices=EPLB_ALGORITHMS,
                      help="planner for EPLB and admin rebalances; auto = SGLang's rule: elasticity_aware when "
                           "a worker is drained or dead, deepseek_hierarchical when --num-groups divides by "
                           "--num-nodes, else deepseek (default: auto)")
    eplb.add_argument("--eplb-rebalance-num-iterations", type=int, default=1000,
                      help="decide every N forward passes (counted per attention worker from its load "
                           "reports; the busiest worker's count) (default: 1000)")
    eplb.add_argument("--eplb-rebalance-layers-per-chunk", type=int, default=0,
                      help="layers changed per map version during a rebalance; 0 = all at once (default: 0)")
    eplb.add_argument("--eplb-min-rebalancing-utilization-threshold", type=float, default=1.0,
                      help="rebalance only when the current balancedness (mean/max load per expert worker) is "
                           "below this, in [0, 1] (default: 1.0)")
    eplb.add_argument("--eplb-min-gain", type=float, default=0.05,
                      help="apply an EPLB plan only when its predicted balancedness gain is >= this times the "
                           "share of slots it changes (and > 0) (default: 0.05)")
    eplb.add_argument("--eplb-prepare-timeout-s", type=float, default=120.0,
                      help="expert workers must load a new map's experts within this, else it is rolled back "
                           "(default: 120)")
    eplb.add_argument("--eplb-commit-timeout-s", type=float, default=30.0,
                      help="attention workers must switch to a committed map within this before older "
                           "versions are retired (default: 30)")
    eplb.add_argument("--eplb-expert-dtype-bytes", type=int, default=2, choices=(1, 2, 4, 8),
                      help="bytes per expert weight element, for the bytes_moved estimate (default: 2, bf16)")
    eplb.add_argument("--num-nodes", type=int, default=1,
                      help="nodes the expert workers span, for hierarchical planning (default: 1)")
    eplb.add_argument("--num-groups", type=int, default=0,
                      help="expert groups, for hierarchical planning (default: 0 = the model's: DeepSeek's "
                           "n_group, none for other families)")
    elastic = parser.add_argument_group("elastic expert parallelism (see docs/operations.md)")
    elastic.add_argument("--elastic-ep-backend", default="none", choices=ELASTIC_EP_BACKENDS,
                         help="placement: keep serving when expert workers die (routing-only map versions around "
                              "them, their experts reloaded on survivors when no replica is left, an "
                              "elasticity_aware rebalance, restarted and new expert workers taken in); mooncake: "
                              "the same, for --moe-a2a-backend mooncake; implies --eplb-algorithm elasticity_aware "
                              "when it is auto (default: none)")
    elastic.add_argument("--elastic-ep-probe-timeout-ms", type=int, default=500,
                         help="a worker reported by a peer (data-plane timeout or broken link) is probed at once: "
                              "DEAD when its gRPC port does not accept a connection within this (default: 500)")
    parser.add_argument("--max-message-bytes", type=int, default=64 << 20,
                        help="largest gRPC message a caller may send; larger ones get RESOURCE_EXHAUSTED unread "
                             "(default: %(default)s)")
    add_security_arguments(parser, token_help="the deployment's token: workers and `epserve admin` must send it "
                                              "(UNAUTHENTICATED otherwise), and placement sends it to the "
                                              "attention workers")
    parser.add_argument("--log-level", default=None,
                        help="stderr log level (default: $EPSERVE_LOG_LEVEL or INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(args.log_level or os.environ.get("EPSERVE_LOG_LEVEL", "INFO")).upper(),
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = PlacementConfig(
            model_path=args.model_path, load_format=args.load_format, host=args.host, port=args.port,
            dp_size=args.dp_size, ep_size=args.ep_size, ep_num_redundant_experts=args.ep_num_redundant_experts,
            init_expert_location=args.init_expert_location, moe_a2a_backend=args.moe_a2a_backend,
            dist_port=args.dist_port, advertise_host=args.advertise_host,
            heartbeat_interval_ms=args.heartbeat_interval_ms, heartbeat_timeout_ms=args.heartbeat_timeout_ms,
            state_db=args.state_db, metrics_port=args.metrics_port,
            enable_eplb=args.enable_eplb, eplb_algorithm=args.eplb_algorithm,
            eplb_rebalance_num_iterations=args.eplb_rebalance_num_iterations,
            eplb_rebalance_layers_per_chunk=args.eplb_rebalance_layers_per_chunk,
            eplb_min_rebalancing_utilization_threshold=args.eplb_min_rebalancing_utilization_threshold,
            eplb_min_gain=args.eplb_min_gain, eplb_prepare_timeout_s=args.eplb_prepare_timeout_s,
            eplb_commit_timeout_s=args.eplb_commit_timeout_s, eplb_expert_dtype_bytes=args.eplb_expert_dtype_bytes,
            num_nodes=args.num_nodes, num_groups=args.num_groups,
            elastic_ep_backend=args.elastic_ep_backend,
            elastic_ep_probe_timeout_ms=args.elastic_ep_probe_timeout_ms,
            security=security_from_args(args), max_message_bytes=args.max_message_bytes,
            otlp_endpoint=args.otlp_endpoint if args.otlp_endpoint is not None
            else os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: stop.set())
        set_process_title("placement")
        server = start_placement_server(config)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    if server.metrics_port:
        print(f"METRICS_PORT={server.metrics_port}", flush=True)
    print(f"PLACEMENT_PORT={server.port}", flush=True)
    stop.wait()
    logger.info("signal received; shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
