#!/usr/bin/env python3
"""Container health check: one grpc.health.v1 Check against a local epserve process.

Usage: healthcheck.py HOST:PORT [SERVICE] [--timeout S]
Exits 0 when the server answers SERVING (for SERVICE, default "" = the whole server), 1
otherwise (not serving, unreachable, deadline passed), printing why on stderr, which docker
keeps in `docker inspect --format '{{json .State.Health}}' CONTAINER`.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the process's gRPC server")
    parser.add_argument("service", nargs="?", default="", help='service name (default "": server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.address}: {status}", file=sys.stderr)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
