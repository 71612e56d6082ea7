"""Dump the expert distribution on an admin request (``AttentionWorker/DumpExpertDistribution``).

The servicer calls ``dump_expert_distribution`` on a gRPC thread; it reads the recorder under
the recorder's lock (the engine thread keeps recording) and writes one ``.pt`` file named
``expert_distribution_<worker id>_<UTC time>.pt`` so workers sharing a directory never
overwrite each other. Errors are typed so the servicer can map each to one status code.

Legend: L MoE layers, P physical slots, W expert workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode
from epserve.expert_map import ExpertMap
from epserve.status_error import StatusCode, StatusError


class DumpRejected(StatusError):
    """A dump that cannot be made; ``code`` is the status it is answered with."""
    code = StatusCode.INTERNAL


class InvalidDumpDirectory(DumpRejected):
    code = StatusCode.INVALID_ARGUMENT


class DumpNotRecorded(DumpRejected):
    code = StatusCode.FAILED_PRECONDITION


class DumpWriteFailed(DumpRejected):
    code = StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class DumpResult:
    path: str
    mode: str
    num_passes: int
    num_token_records: int


def check_dump_directory(directory: str) -> Path:
    """The request's directory as a Path; InvalidDumpDirectory naming the field otherwise."""
    if not directory:
        raise InvalidDumpDirectory("directory is empty: give an absolute path on the worker's machine")
    path = Path(directory)
    if not path.is_absolute():
        raise InvalidDumpDirectory(f"directory {directory!r} is relative: give an absolute path (workers do not "
                                   "share the caller's working directory)")
    return path


def dump_file_name(worker_id: str, now_s: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_s)) + f"{now_s % 1:.6f}"[1:]
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)
    return f"expert_distribution_{safe_id}_{stamp}Z.pt"


def dump_expert_distribution(recorder: ExpertLoadRecorder, directory: str, worker_id: str,
                             expert_map: ExpertMap) -> DumpResult:
    """Write the recorder's per_pass / per_token entries since the last dump under ``directory``
    (created when missing), with the worker id and the map in use (``phy2log [L, P]``, slot
    owners [W]) so slots can be turned into logical experts and expert workers."""
    path = check_dump_directory(directory)
    if recorder.mode is RecorderMode.STAT:
        raise DumpNotRecorded(f"attention worker {worker_id} records in stat mode, which keeps only the load window "
                              "reported to placement; start it with --expert-distribution-recorder-mode "
                              "per_pass|per_token to dump per-pass counts or per-token choices")
    target = path / dump_file_name(worker_id, time.time())
    extra = {"worker_id": worker_id, "map_version": expert_map.version,
             "physical_to_logical_map": expert_map.phy2log.clone(), "slot_owners": list(expert_map.slot_owners),
             "num_logical_experts": expert_map.num_logical_experts}
    try:
        path.mkdir(parents=True, exist_ok=True)
        record = recorder.dump(target, extra)
    except OSError as exc:
        raise DumpWriteFailed(f"cannot write {target}: {exc.strerror or exc}; choose a directory attention worker "
                              f"{worker_id} can write") from None
    return DumpResult(str(target), record["mode"], record["num_passes"], record["num_token_records"])
