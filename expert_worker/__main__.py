"""``python -m epserve.expert_worker``: one expert-parallel worker."""

from __future__ import annotations

import argparse
import os
import sys

from epserve.expert_worker.config import DEFAULT_DUTY_CYCLE, ExpertWorkerConfig, parse_capacity
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.process_flags import add_telemetry_arguments, add_worker_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epserve.expert_worker",
        description="Expert-parallel worker: holds the physical expert slots the placement service assigns "
                    "it (every MoE layer), loads only those experts, and serves batches dispatched by "
                    "attention workers on the data plane through the MoE runner.")
    add_worker_arguments(p, dtype_help="expert weights dtype")
    p.add_argument("--moe-runner-backend", default="auto",
                   help="expert kernels: auto|torch|triton|deep_gemm|flashinfer_cutlass (default auto)")
    p.add_argument("--capacity", type=parse_capacity, default=1.0, metavar="FLOAT|auto",
                   help="relative expert throughput, so placement gives slower workers fewer and colder experts "
                        "(default 1); auto = measure it at start-up: this worker's MoE runner on --device times a "
                        "small batch of the model's expert GEMMs and reports the rate in TFLOP/s (1.0 = 10^12 "
                        "expert flops/s; only ratios between workers matter)")
    p.add_argument("--expert-load-duty-cycle", type=float, default=DEFAULT_DUTY_CYCLE, metavar="FRACTION",
                   help="while serving, a map change loads its experts for at most this fraction of the wall "
                        "time and sleeps the rest, so loading on CPU cores does not slow decode steps in "
                        "flight; 1 = load at full speed (the first map always loads at full speed) "
                        f"(default {DEFAULT_DUTY_CYCLE})")
    add_telemetry_arguments(p, "epserve-expert-worker", "EXPERT_WORKER_PORT")
    add_security_arguments(p, token_help="the deployment's token: callers must send it, and this worker sends it "
                                         "to placement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from epserve.process import configure_logging

    configure_logging(args.log_level)
    try:
        kwargs = {"worker_id": args.worker_id} if args.worker_id else {}
        config = ExpertWorkerConfig(
            model_path=args.model_path, placement=args.placement, host=args.host, port=args.port,
            advertise_host=args.advertise_host, dtype=args.dtype, device=args.device,
            load_format=args.load_format, moe_runner_backend=args.moe_runner_backend, capacity=args.capacity,
            num_threads=args.num_threads,
            expert_load_duty_cycle=args.expert_load_duty_cycle,
            metrics_port=args.metrics_port,
            otlp_endpoint=args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            security=security_from_args(args), **kwargs)
    except ValueError as exc:
        print(f"expert_worker: {exc}", file=sys.stderr)
        return 2
    from epserve.process import run_worker_process
    from epserve.telemetry import ExpertWorkerMetrics
    from epserve.expert_worker.worker import TRACING_SERVICE_NAME, ExpertWorker

    return run_worker_process("expert_worker", TRACING_SERVICE_NAME, config, ExpertWorkerMetrics, ExpertWorker, "EXPERT_WORKER_PORT")


if __name__ == "__main__":
    from epserve.process import exit_now

    exit_now(main())
