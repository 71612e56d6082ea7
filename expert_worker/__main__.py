"""``python -m epserve.expert_worker``: one expert-parallel worker."""

from __future__ import annotations

import argparse
import os
import sys

from epserve.dummy_weights import LOAD_FORMAT_HELP, LOAD_FORMATS
from epserve.grpc_security import add_security_arguments, security_from_args
from epserve.expert_worker.config import DEFAULT_DUTY_CYCLE, DTYPES, ExpertWorkerConfig, parse_capacity



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epserve.expert_worker",
        description="Expert-parallel worker: holds the physical expert slots the placement service assigns "
                    "it (every MoE layer), loads only those experts, and serves batches dispatched by "
                    "attention workers on the data plane through the MoE runner.")
    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--placement", required=True, metavar="HOST:PORT", help="placement service address")
    p.add_argument("--host", default="127.0.0.1", help="gRPC (health) bind address")
    p.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one")
    p.add_argument("--advertise-host", default="", help="host others use to reach this worker (default: --host)")
    p.add_argument("--worker-id", default=os.environ.get("EPSERVE_WORKER_ID", ""),
                   help="stable worker id (default: generated; env EPSERVE_WORKER_ID)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="expert weights dtype (default bfloat16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help=LOAD_FORMAT_HELP)
    p.add_argument("--moe-runner-backend", default="auto",
                   help="expert kernels: auto|torch|triton|deep_gemm|flashinfer_cutlass (default auto)")
    p.add_argument("--capacity", type=parse_capacity, default=1.0, metavar="FLOAT|auto",
                   help="relative expert throughput, so placement gives slower workers fewer and colder experts "
                        "(default 1); auto = measure it at start-up: this worker's MoE runner on --device times a "
                        "small batch of the model's expert GEMMs and reports the rate in TFLOP/s (1.0 = 10^12 "
                        "expert flops/s; only ratios between workers matter)")
    p.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--expert-load-duty-cycle", type=float, default=DEFAULT_DUTY_CYCLE, metavar="FRACTION",
                   help="while serving, a map change loads its experts for at most this fraction of the wall "
                        "time and sleeps the rest, so loading on CPU cores does not slow decode steps in "
                        "flight; 1 = load at full speed (the first map always loads at full speed) "
                        f"(default {DEFAULT_DUTY_CYCLE})")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (printed as "
                        "METRICS_PORT=<port> before EXPERT_WORKER_PORT=); default: off")
    p.add_argument("--otlp-endpoint", default="",
                   help="OTLP gRPC collector HOST:PORT for traces (service.name epserve-expert-worker); "
                        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing")
    add_security_arguments(p, token_help="the deployment's token: callers must send it, and this worker sends it "
                                         "to placement")
    p.add_argument("--log-level", default="INFO")
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
