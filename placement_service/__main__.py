"""``python -m epserve.placement_service``: parse flags, build PlacementConfig, serve until SIGTERM/SIGINT
(the process skeleton, ``epserve.process.run_process``).

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
import sys
import threading

from epserve.dummy_weights import LOAD_FORMATS
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.placement_service.config import (ELASTIC_EP_BACKENDS, EPLB_ALGORITHMS, MOE_A2A_BACKENDS,
                                              PlacementConfig)
from epserve.placement_service.server import start_placement_server
from epserve.process import announce, refuse, run_process
from epserve.process_flags import add_bind_arguments, add_telemetry_arguments, config_defaults, config_kwargs

logger = logging.getLogger("epserve.placement_service")

PORT_LINE = "PLACEMENT_PORT"


def build_parser() -> argparse.ArgumentParser:
    defaults = config_defaults(PlacementConfig)
    parser = argparse.ArgumentParser(
        prog="python -m epserve.placement_service",
        description="The placement service: registers attention and expert workers, assigns data-plane "
                    "ranks, owns the versioned expert map and pushes it to workers, tracks worker health.")
    parser.add_argument("--model-path", required=True,
                        help="model directory; only its config.json is read (MoE layers, experts, fingerprint)")
    parser.add_argument("--load-format", default=defaults["load_format"], choices=LOAD_FORMATS,
                        help="the workers' --load-format: workers on dummy (random) weights have another model "
                             "fingerprint than workers reading the checkpoint, and only those matching this are "
                             "accepted (default: %(default)s)")
    add_bind_arguments(parser, defaults, PORT_LINE)
    parser.add_argument("--dp-size", type=int, default=defaults["dp_size"],
                        help="number of attention (DP) workers expected (default: %(default)s)")
    parser.add_argument("--ep-size", type=int, default=defaults["ep_size"],
                        help="number of expert workers expected; 0 (and only 0) with --moe-a2a-backend local "
                             "(default: %(default)s)")
    parser.add_argument("--ep-num-redundant-experts", type=int, default=defaults["ep_num_redundant_experts"],
                        help="redundant physical expert slots R per MoE layer; (experts + R) must divide "
                             "evenly by --ep-size (default: %(default)s)")
    parser.add_argument("--init-expert-location", default=defaults["init_expert_location"],
                        help="initial placement: 'trivial' (slot p holds expert p %% E) or a snapshot file "
                             "(.json / .pt) (default: %(default)s)")
    parser.add_argument("--moe-a2a-backend", default=defaults["moe_a2a_backend"], choices=MOE_A2A_BACKENDS,
                        help="data-plane backend, passed on to workers; local = a colocated deployment: every "
                             "attention worker holds all experts, no expert workers (--ep-size 0), no expert map, "
                             "EPLB and map-changing admin RPCs answer FAILED_PRECONDITION (default: %(default)s)")
    parser.add_argument("--dist-port", type=int, default=defaults["dist_port"],
                        help="port of the torch.distributed rendezvous store hosted here; 0 picks one "
                             "(reused across restarts with --state-db) (default: %(default)s)")
    parser.add_argument("--advertise-host", default=defaults["advertise_host"],
                        help="host workers use to reach the rendezvous store (default: --host, or "
                             "127.0.0.1 when --host is a wildcard)")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=defaults["heartbeat_interval_ms"],
                        help="how often workers heartbeat (default: %(default)s)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=defaults["heartbeat_timeout_ms"],
                        help="a worker is SUSPECT after 2 missed heartbeats and DEAD after this long "
                             "without one (default: %(default)s)")
    parser.add_argument("--state-db", default=defaults["state_db"],
                        help="SQLite file for map versions, settings and the worker registry; a restart "
                             "with the same file resumes at the same version and ranks (default: none, in memory)")
    add_telemetry_arguments(parser, defaults, "epserve-placement", PORT_LINE)
    eplb = parser.add_argument_group("EPLB and map changes (see docs/operations.md)")
    eplb.add_argument("--enable-eplb", action="store_true",
                      help="rebalance expert placement automatically from the load attention workers report")
    eplb.add_argument("--eplb-algorithm", default=defaults["eplb_algorithm"], choices=EPLB_ALGORITHMS,
                      help="planner for EPLB and admin rebalances; auto = SGLang's rule: elasticity_aware when "
                           "a worker is drained or dead, deepseek_hierarchical when --num-groups divides by "
                           "--num-nodes, else deepseek (default: %(default)s)")
    eplb.add_argument("--eplb-rebalance-num-iterations", type=int,
                      default=defaults["eplb_rebalance_num_iterations"],
                      help="decide every N forward passes (counted per attention worker from its load "
                           "reports; the busiest worker's count) (default: %(default)s)")
    eplb.add_argument("--eplb-rebalance-layers-per-chunk", type=int,
                      default=defaults["eplb_rebalance_layers_per_chunk"],
                      help="layers changed per map version during a rebalance; 0 = all at once (default: %(default)s)")
    eplb.add_argument("--eplb-min-rebalancing-utilization-threshold", type=float,
                      default=defaults["eplb_min_rebalancing_utilization_threshold"],
                      help="rebalance only when the current balancedness (mean/max load per expert worker) is "
                           "below this, in [0, 1] (default: %(default)s)")
    eplb.add_argument("--eplb-min-gain", type=float, default=defaults["eplb_min_gain"],
                      help="apply an EPLB plan only when its predicted balancedness gain is >= this times the "
                           "share of slots it changes (and > 0) (default: %(default)s)")
    eplb.add_argument("--eplb-prepare-timeout-s", type=float, default=defaults["eplb_prepare_timeout_s"],
                      help="expert workers must load a new map's experts within this, else it is rolled back "
                           "(default: %(default)s)")
    eplb.add_argument("--eplb-commit-timeout-s", type=float, default=defaults["eplb_commit_timeout_s"],
                      help="attention workers must switch to a committed map within this before older "
                           "versions are retired (default: %(default)s)")
    eplb.add_argument("--eplb-expert-dtype-bytes", type=int, default=defaults["eplb_expert_dtype_bytes"],
                      choices=(1, 2, 4, 8),
                      help="bytes per expert weight element, for the bytes_moved estimate (default: %(default)s, bf16)")
    eplb.add_argument("--num-nodes", type=int, default=defaults["num_nodes"],
                      help="nodes the expert workers span, for hierarchical planning (default: %(default)s)")
    eplb.add_argument("--num-groups", type=int, default=defaults["num_groups"],
                      help="expert groups, for hierarchical planning (default: %(default)s = the model's: DeepSeek's "
                           "n_group, none for other families)")
    elastic = parser.add_argument_group("elastic expert parallelism (see docs/operations.md)")
    elastic.add_argument("--elastic-ep-backend", default=defaults["elastic_ep_backend"],
                         choices=ELASTIC_EP_BACKENDS,
                         help="placement: keep serving when expert workers die (routing-only map versions around "
                              "them, their experts reloaded on survivors when no replica is left, an "
                              "elasticity_aware rebalance, restarted and new expert workers taken in); mooncake: "
                              "the same, for --moe-a2a-backend mooncake; implies --eplb-algorithm elasticity_aware "
                              "when it is auto (default: %(default)s)")
    elastic.add_argument("--elastic-ep-probe-timeout-ms", type=int, default=defaults["elastic_ep_probe_timeout_ms"],
                         help="a worker reported by a peer (data-plane timeout or broken link) is probed at once: "
                              "DEAD when its gRPC port does not accept a connection within this (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=defaults["max_message_bytes"],
                        help="largest gRPC message a caller may send; larger ones get RESOURCE_EXHAUSTED unread "
                             "(default: %(default)s)")
    add_security_arguments(parser, token_help="the deployment's token: workers and `epserve admin` must send it "
                                              "(UNAUTHENTICATED otherwise), and placement sends it to the "
                                              "attention workers")
    return parser


def config_from_args(args: argparse.Namespace) -> PlacementConfig:
    """The config from parsed flags; ValueError naming the flag (PlacementConfig also reads config.json)."""
    return PlacementConfig(**config_kwargs(PlacementConfig, args, security=security_from_args(args)))


def serve(config: PlacementConfig, stop: threading.Event) -> int:
    try:
        server = start_placement_server(config)
    except (ValueError, OSError) as exc:     # a bad --otlp-endpoint, a port in use, an unreadable --state-db
        return refuse("placement_service", exc)
    if server.metrics_port:
        announce("METRICS_PORT", server.metrics_port)
    announce(PORT_LINE, server.port)
    stop.wait()
    logger.info("signal received; shutting down")
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_process("placement_service", build_parser(), config_from_args, lambda config: "placement", serve,
                       argv)


if __name__ == "__main__":
    sys.exit(main())
