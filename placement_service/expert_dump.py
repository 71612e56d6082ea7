"""Fan an expert-distribution dump out to the attention workers (``PlacementAdmin/DumpExpertDistribution``).

Every attention worker that is not DEAD gets ``AttentionWorker/DumpExpertDistribution`` at once,
from one short-lived thread and channel each, with ``timeout_s`` as the call's deadline; the
answer is one ``WorkerDump`` per worker in rank order, failures included (a worker in ``stat``
mode, an unwritable directory, a worker that did not answer in time). The request's directory
is checked here first, so a malformed one fails the whole call with InvalidArgument.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import PurePosixPath

import grpc

from epserve.grpc_security import PLAINTEXT, Security, open_channel
from epserve.placement_types import WorkerInfo, WorkerRole, WorkerState
from epserve.placement_service.errors import InvalidArgument, Unavailable

DEFAULT_WORKER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerDump:
    worker_id: str
    address: str
    status_code: str                        # gRPC status name: "OK", "FAILED_PRECONDITION", ...
    message: str = ""
    path: str = ""
    mode: str = ""
    num_passes: int = 0
    num_token_records: int = 0


def check_request(directory: str, worker_timeout_s: float) -> float:
    """InvalidArgument naming the field; returns the per-worker deadline in seconds."""
    if not directory:
        raise InvalidArgument("directory is empty: give an absolute path on the attention workers' machines")
    if not PurePosixPath(directory).is_absolute():
        raise InvalidArgument(f"directory {directory!r} is relative: give an absolute path (each attention worker "
                              "resolves it on its own machine)")
    if worker_timeout_s < 0:
        raise InvalidArgument(f"worker_timeout_s must be >= 0 (0 = {DEFAULT_WORKER_TIMEOUT_S:g} s), "
                              f"got {worker_timeout_s}")
    return worker_timeout_s or DEFAULT_WORKER_TIMEOUT_S


def dump_targets(workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """Attention workers that are not DEAD, in rank order; Unavailable when there is none."""
    targets = sorted((w for w in workers if w.role == WorkerRole.ATTENTION and w.state != WorkerState.DEAD),
                     key=lambda w: w.rank)
    if not targets:
        raise Unavailable("no live attention worker is registered: nothing records expert load yet")
    return targets


def dump_on_workers(workers: list[WorkerInfo], directory: str, timeout_s: float,
                    security: Security = PLAINTEXT) -> list[WorkerDump]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="dump") as pool:
        return list(pool.map(lambda worker: _dump_one(worker, directory, timeout_s, security), workers))


def _dump_one(worker: WorkerInfo, directory: str, timeout_s: float, security: Security) -> WorkerDump:
    from epserve.protos import worker_pb2, worker_pb2_grpc

    channel = open_channel(worker.address, security)
    try:
        response = worker_pb2_grpc.AttentionWorkerStub(channel).DumpExpertDistribution(
            worker_pb2.DumpExpertDistributionRequest(directory=directory), timeout=timeout_s)
    except grpc.RpcError as exc:
        return WorkerDump(worker.worker_id, worker.address, exc.code().name, exc.details() or "")
    finally:
        channel.close()
    return WorkerDump(worker.worker_id, worker.address, "OK", "", response.path, response.mode, response.num_passes,
                      response.num_token_records)
