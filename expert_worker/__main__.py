"""``python -m epserve.expert_worker``: one expert-parallel worker.

``main()`` is the process skeleton (``epserve.process.run_process``): flags (``build_parser``) →
``ExpertWorkerConfig`` (``config_from_args``) → serve (``epserve.process.serve_worker``: join the
deployment, serve until SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import threading

from epserve.expert_worker.config import ExpertWorkerConfig, parse_capacity
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.process import run_process
from epserve.process_flags import add_telemetry_arguments, add_worker_arguments, config_defaults, config_kwargs

PORT_LINE = "EXPERT_WORKER_PORT"


def build_parser() -> argparse.ArgumentParser:
    defaults = config_defaults(ExpertWorkerConfig)
    p = argparse.ArgumentParser(
        prog="python -m epserve.expert_worker",
        description="Expert-parallel worker: holds the physical expert slots the placement service assigns "
                    "it (every MoE layer), loads only those experts, and serves batches dispatched by "
                    "attention workers on the data plane through the MoE runner.")
    add_worker_arguments(p, defaults, dtype_help="expert weights dtype", port_line=PORT_LINE)
    p.add_argument("--moe-runner-backend", default=defaults["moe_runner_backend"],
                   help="expert kernels: auto|torch|triton|deep_gemm|flashinfer_cutlass (default %(default)s)")
    p.add_argument("--capacity", type=parse_capacity, default=defaults["capacity"], metavar="FLOAT|auto",
                   help="relative expert throughput, so placement gives slower workers fewer and colder experts "
                        "(default %(default)s); auto = measure it at start-up: this worker's MoE runner on --device "
                        "times a small batch of the model's expert GEMMs and reports the rate in TFLOP/s (1.0 = "
                        "10^12 expert flops/s; only ratios between workers matter)")
    p.add_argument("--expert-load-duty-cycle", type=float, default=defaults["expert_load_duty_cycle"],
                   metavar="FRACTION",
                   help="while serving, a map change loads its experts for at most this fraction of the wall "
                        "time and sleeps the rest, so loading on CPU cores does not slow decode steps in "
                        "flight; 1 = load at full speed (the first map always loads at full speed) "
                        "(default %(default)s)")
    add_telemetry_arguments(p, defaults, "epserve-expert-worker", PORT_LINE)
    add_security_arguments(p, token_help="the deployment's token: callers must send it, and this worker sends it "
                                         "to placement")
    return p


def config_from_args(args: argparse.Namespace) -> ExpertWorkerConfig:
    """The config from parsed flags; ValueError naming the flag."""
    return ExpertWorkerConfig(**config_kwargs(ExpertWorkerConfig, args, security=security_from_args(args)))


def serve(config: ExpertWorkerConfig, stop: threading.Event) -> int:
    from epserve.process import serve_worker
    from epserve.telemetry import ExpertWorkerMetrics
    from epserve.expert_worker.worker import TRACING_SERVICE_NAME, ExpertWorker

    return serve_worker(config, stop, name="expert_worker", service_name=TRACING_SERVICE_NAME,
                        make_metrics=ExpertWorkerMetrics, build_worker=ExpertWorker, port_line=PORT_LINE)


def main(argv: list[str] | None = None) -> int:
    return run_process("expert_worker", build_parser(), config_from_args, lambda config: config.worker_id, serve,
                       argv)


if __name__ == "__main__":
    from epserve.process import exit_now

    exit_now(main())
