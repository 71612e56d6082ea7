"""``epserve admin``: operate a running placement service (PlacementAdmin gRPC).

    epserve admin --placement HOST:PORT COMMAND [args] [--json] [--timeout S]

Commands: placement, plan, rebalance, set-redundancy N, rollback, pause-eplb, resume-eplb,
export-snapshot FILE, import-snapshot FILE, workers, drain WORKER, dump-expert-distribution DIR.
Readable tables by default; ``--json`` prints one JSON object. Every call carries a deadline
(``--timeout``). A gRPC error prints ``epserve admin: COMMAND: STATUS: message`` on stderr and
exits 1 (so does a dump that failed on some worker, one line per worker, after the results); a
file that cannot be read or written exits 2. docs/operations.md has examples.

Every call carries the deployment's token: ``--auth-token-file``, by default the file ``epserve up``
made (``<cache>/auth_token``) when it exists; ``--tls-ca`` (+ ``--tls-cert``/``--tls-key`` for mTLS)
for a deployment that speaks TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMMANDS = ("placement", "plan", "rebalance", "set-redundancy", "rollback", "pause-eplb", "resume-eplb",
            "export-snapshot", "import-snapshot", "workers", "drain", "dump-expert-distribution")
DEFAULT_TIMEOUT_S = 180.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "admin", help="operate a running placement service: maps, rebalancing, snapshots, workers",
        description="Operate a running placement service through its PlacementAdmin gRPC API. Map-changing "
                    "commands (rebalance, set-redundancy, rollback, import-snapshot, drain) run the "
                    "make-before-break protocol and return once the new map is committed; serving never pauses.")
    parser.add_argument("--placement", required=True, metavar="HOST:PORT", help="placement service address")
    parser.add_argument("--auth-token-file", default=None, metavar="FILE",
                        help="the deployment's token (default: the one `epserve up` made, <cache>/auth_token, when "
                             "it exists)")
    parser.add_argument("--tls-ca", default="", metavar="PEM", help="trust placement's certificate through this CA")
    parser.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default="", metavar="PEM", help="its private key")
    _add_common(parser, None)
    commands = parser.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)

    placement = commands.add_parser("placement", parents=[common], help="the map in service (or --version N)")
    placement.add_argument("--version", type=int, default=0, help="a past version (default: current)")
    for name, text in (("plan", "dry run: what a rebalance would do now"),
                       ("rebalance", "re-plan from reported load and apply it (make-before-break)")):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("--algorithm", default="", help="EPLB algorithm (default: the service's --eplb-algorithm)")
        sub.add_argument("--layers", default="", help="comma-separated MoE layers to re-plan (default: all)")
    redundancy = commands.add_parser("set-redundancy", parents=[common],
                                     help="change the redundant slots per layer R (E + R must divide by the "
                                          "expert workers)")
    redundancy.add_argument("num_redundant_experts", type=int, metavar="N")
    commands.add_parser("rollback", parents=[common],
                        help="back to the map before the last change (as a new version)")
    commands.add_parser("pause-eplb", parents=[common], help="stop automatic rebalancing (persisted)")
    commands.add_parser("resume-eplb", parents=[common], help="resume automatic rebalancing")
    export = commands.add_parser("export-snapshot", parents=[common],
                                 help="write the map (and load) in the --init-expert-location format")
    export.add_argument("file", metavar="FILE", help=".json, or .pt (converted with torch.save)")
    imported = commands.add_parser("import-snapshot", parents=[common],
                                   help="apply a snapshot's map (or a plan from its logical_count)")
    imported.add_argument("file", metavar="FILE", help=".json or .pt snapshot")
    commands.add_parser("workers", parents=[common], help="list workers, ranks, states and map versions")
    drain = commands.add_parser("drain", parents=[common], help="move every expert off one expert worker")
    drain.add_argument("worker_id", metavar="WORKER")
    dump = commands.add_parser(
        "dump-expert-distribution", parents=[common],
        help="every attention worker writes its recorded expert distribution (.pt) under DIR",
        description="Ask every live attention worker (through placement) to write what its expert-load recorder "
                    "kept since the last dump to DIR/expert_distribution_<worker>_<UTC time>.pt on its own machine. "
                    "Needs workers started with --expert-distribution-recorder-mode per_pass or per_token. Prints "
                    "one line (or JSON object) per worker; exits 1 when any worker failed.")
    dump.add_argument("directory", metavar="DIR", help="absolute directory on the workers' machines (made if missing)")
    return parser


def _add_common(parser: argparse.ArgumentParser, default) -> None:
    """--json / --timeout, accepted before and after COMMAND (after: SUPPRESS keeps the value before)."""
    parser.add_argument("--json", action="store_true", default=False if default is None else default,
                        help="print one JSON object instead of a table")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S if default is None else default,
                        metavar="S", help=f"deadline of the call in seconds (default {DEFAULT_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    import grpc

    from epserve.grpc_security import open_channel
    from epserve.protos import placement_pb2_grpc

    if args.timeout <= 0:
        print("epserve admin: --timeout must be > 0", file=sys.stderr)
        return 2
    command = args.admin_command
    try:
        security = _security(args)
    except ValueError as exc:
        print(f"epserve admin: {exc}", file=sys.stderr)
        return 2
    channel = open_channel(args.placement, security)
    stub = placement_pb2_grpc.PlacementAdminStub(channel)
    try:
        result = HANDLERS[command](stub, args)
    except grpc.RpcError as exc:
        print(f"epserve admin: {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"epserve admin: {command}: {exc}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    data, text, *failed = result
    if args.json or text:
        print(json.dumps(data) if args.json else text)
    for line in failed[0] if failed else ():     # partial failures: after the results, on stderr
        print(f"epserve admin: {command}: {line}", file=sys.stderr)
    return 1 if failed and failed[0] else 0


# -- commands: each returns (JSON-able dict, readable text) ------------------------------------
def _placement(stub, args):
    from epserve.protos import placement_pb2

    response = stub.GetPlacement(placement_pb2.GetPlacementRequest(version=args.version), timeout=args.timeout)
    m = response.map
    phy2log = _matrix(m.phy2log, m.num_layers, m.num_physical_slots)
    data = {"version": m.version, "versions": list(response.versions), "num_layers": m.num_layers,
            "num_logical_experts": m.num_logical_experts, "num_physical_slots": m.num_physical_slots,
            "physical_to_logical_map": phy2log, "slot_owners": list(m.slot_owners), "checksum": m.checksum,
            "balancedness": response.balancedness, "window_balancedness": response.window_balancedness,
            "window_num_passes": response.window_num_passes, "eplb_enabled": response.eplb_enabled,
            "eplb_paused": response.eplb_paused, "eplb_algorithm": response.eplb_algorithm,
            "rebalance_in_progress": response.rebalance_in_progress, "num_rebalances": response.num_rebalances,
            "num_rollbacks": response.num_rollbacks, "last_rebalance_ms": response.last_rebalance_ms,
            "last_operation": response.last_operation}
    eplb = ("off" if not response.eplb_enabled else "paused" if response.eplb_paused else "on")
    lines = [f"map version {m.version} (versions {', '.join(map(str, response.versions))}), made by "
             f"{response.last_operation or '?'}, checksum {m.checksum}",
             f"{m.num_layers} MoE layers, {m.num_logical_experts} experts, {m.num_physical_slots} slots "
             f"({m.num_physical_slots - m.num_logical_experts} redundant) over {len(m.slot_owners)} expert workers",
             f"balancedness: {response.balancedness:.3f} measured under this version, "
             f"{response.window_balancedness:.3f} predicted for the open window ({response.window_num_passes} passes)",
             f"EPLB {eplb} ({response.eplb_algorithm}); {response.num_rebalances} map changes, "
             f"{response.num_rollbacks} rolled back, last took {response.last_rebalance_ms:.0f} ms"
             + ("; a change is running now" if response.rebalance_in_progress else ""), ""]
    lines += _map_table(phy2log, list(m.slot_owners))
    return data, "\n".join(lines)


def _plan(stub, args):
    response = stub.PlanRebalance(_rebalance_request(args), timeout=args.timeout)
    m = response.map
    data = {"algorithm": response.algorithm, "balancedness_before": response.balancedness_before,
            "balancedness_after": response.balancedness_after, "experts_moved": response.experts_moved,
            "bytes_moved": response.bytes_moved, "plan_ms": response.plan_ms,
            "changed_layers": list(response.changed_layers),
            "physical_to_logical_map": _matrix(m.phy2log, m.num_layers, m.num_physical_slots)}
    text = (f"plan ({response.algorithm}, {response.plan_ms:.1f} ms): balancedness {response.balancedness_before:.3f}"
            f" → {response.balancedness_after:.3f}, {response.experts_moved} experts moved "
            f"({_bytes(response.bytes_moved)}), layers {list(response.changed_layers)}\n\n"
            + "\n".join(_map_table(data["physical_to_logical_map"], list(m.slot_owners))))
    return data, text


def _rebalance(stub, args):
    return _change(stub.Rebalance(_rebalance_request(args), timeout=args.timeout))


def _set_redundancy(stub, args):
    from epserve.protos import placement_pb2

    return _change(stub.SetRedundancy(placement_pb2.SetRedundancyRequest(
        num_redundant_experts=args.num_redundant_experts), timeout=args.timeout))


def _rollback(stub, args):
    from epserve.protos import placement_pb2

    return _change(stub.Rollback(placement_pb2.RollbackRequest(), timeout=args.timeout))


def _drain(stub, args):
    from epserve.protos import placement_pb2

    return _change(stub.DrainWorker(placement_pb2.DrainWorkerRequest(worker_id=args.worker_id), timeout=args.timeout))


def _eplb_state(method: str):
    def handler(stub, args):
        from epserve.protos import placement_pb2

        request = placement_pb2.PauseEplbRequest() if method == "PauseEplb" else placement_pb2.ResumeEplbRequest()
        response = getattr(stub, method)(request, timeout=args.timeout)
        data = {"enabled": response.enabled, "paused": response.paused}
        return data, (f"EPLB {'enabled' if response.enabled else 'disabled (--enable-eplb not set)'}, "
                      f"{'paused' if response.paused else 'running'}")
    return handler


def _export(stub, args):
    from epserve.protos import placement_pb2

    text = stub.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=args.timeout).json
    path = Path(args.file)
    if path.suffix == ".pt":
        _json_to_pt(text, path)
    else:
        path.write_text(text)
    content = json.loads(text)
    data = {"file": str(path), "num_layers": content.get("num_layers"),
            "num_physical_slots": content.get("num_physical_slots")}
    return data, f"wrote {path} ({data['num_layers']} layers × {data['num_physical_slots']} slots)"


def _import(stub, args):
    from epserve.protos import placement_pb2

    path = Path(args.file)
    if not path.is_file():
        raise OSError(f"snapshot file {path} does not exist")
    text = _pt_to_json(path) if path.suffix == ".pt" else path.read_text()
    return _change(stub.ImportSnapshot(placement_pb2.Snapshot(json=text), timeout=args.timeout))


def _workers(stub, args):
    from epserve.protos import placement_pb2

    workers = stub.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=args.timeout).workers
    now_ms = int(time.time() * 1000)
    rows = [{"worker_id": w.worker_id,
             "role": placement_pb2.WorkerRole.Name(w.role).removeprefix("WORKER_ROLE_").lower(),
             "rank": w.rank, "state": placement_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_"),
             "address": w.address, "map_version": w.map_version, "device": w.device, "capacity": w.capacity,
             "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms} for w in workers]
    header = ("WORKER", "ROLE", "RANK", "STATE", "ADDRESS", "MAP", "DEVICE", "CAPACITY", "HEARD")
    table = [header] + [(r["worker_id"], r["role"], str(r["rank"]), r["state"], r["address"], str(r["map_version"]),
                         r["device"], f"{r['capacity']:g}",
                         f"{(now_ms - r['last_heartbeat_unix_ms']) / 1000:.1f}s ago" if r["last_heartbeat_unix_ms"]
                         else "never") for r in rows]
    return {"workers": rows}, "\n".join(_columns(table))


def _dump(stub, args):
    from epserve.protos import placement_pb2

    response = stub.DumpExpertDistribution(placement_pb2.AdminDumpExpertDistributionRequest(
        directory=args.directory, worker_timeout_s=min(30.0, args.timeout * 0.8)), timeout=args.timeout)
    rows = [{"worker_id": w.worker_id, "address": w.address, "status_code": w.status_code, "message": w.message,
             "path": w.path, "mode": w.mode, "num_passes": w.num_passes, "num_token_records": w.num_token_records}
            for w in response.workers]
    lines = [f"{r['worker_id']}: wrote {r['path']} ({r['mode']}, {r['num_passes']} passes"
             + (f", {r['num_token_records']} token records)" if r["mode"] == "per_token" else ")")
             for r in rows if r["status_code"] == "OK"]
    failed = [f"{r['worker_id']}: {r['status_code']}: {r['message']}" for r in rows if r["status_code"] != "OK"]
    return {"workers": rows}, "\n".join(lines), failed


HANDLERS = {"placement": _placement, "plan": _plan, "rebalance": _rebalance, "set-redundancy": _set_redundancy,
            "rollback": _rollback, "pause-eplb": _eplb_state("PauseEplb"), "resume-eplb": _eplb_state("ResumeEplb"),
            "export-snapshot": _export, "import-snapshot": _import, "workers": _workers, "drain": _drain,
            "dump-expert-distribution": _dump}
assert set(HANDLERS) == set(COMMANDS)


# -- helpers -----------------------------------------------------------------------------------
def _security(args):
    from epserve.grpc_security import Security, default_token_path, read_token_file

    path = args.auth_token_file
    if path is None and default_token_path().is_file():
        path = str(default_token_path())
    token = read_token_file(path) if path else ""
    return Security(token, args.tls_cert, args.tls_key, args.tls_ca)


def _rebalance_request(args):
    from epserve.protos import placement_pb2

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    return placement_pb2.RebalanceRequest(algorithm=args.algorithm, layers=layers)


def _change(response):
    data = {"version": response.version, "previous_version": response.previous_version,
            "num_versions": response.num_versions, "balancedness_before": response.balancedness_before,
            "balancedness_after": response.balancedness_after, "experts_moved": response.experts_moved,
            "bytes_moved": response.bytes_moved, "plan_ms": response.plan_ms, "duration_ms": response.duration_ms,
            "message": response.message}
    if not response.num_versions:
        text = f"no change: version {response.version} stays in service" + (
            f" ({response.message})" if response.message else "")
        return data, text
    text = (f"version {response.previous_version} → {response.version} ({response.num_versions} version"
            f"{'s' if response.num_versions != 1 else ''}) in {response.duration_ms:.0f} ms: balancedness "
            f"{response.balancedness_before:.3f} → {response.balancedness_after:.3f}, {response.experts_moved} "
            f"experts moved ({_bytes(response.bytes_moved)})")
    if response.message:
        text += f"\nnote: {response.message}"
    return data, text


def _matrix(flat, rows: int, cols: int) -> list[list[int]]:
    values = list(flat)
    return [values[r * cols:(r + 1) * cols] for r in range(rows)]


def _map_table(phy2log: list[list[int]], owners: list[str]) -> list[str]:
    """One row per layer, one column per expert worker: the experts of its slots (- = empty)."""
    if not phy2log or not owners:
        return []
    per = len(phy2log[0]) // len(owners)
    table = [("LAYER", *owners)]
    for layer, row in enumerate(phy2log):
        table.append((str(layer), *(" ".join("-" if e < 0 else str(e) for e in row[w * per:(w + 1) * per])
                                    for w in range(len(owners)))))
    return _columns(table)


def _columns(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _json_to_pt(text: str, path: Path) -> None:
    import tempfile

    from epserve.placement_service import snapshot

    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "snapshot.json"
        source.write_text(text)
        loaded = snapshot.load_snapshot(source)
    snapshot.save_snapshot(path, num_logical_experts=loaded.num_logical_experts,
                           physical_to_logical_map=loaded.physical_to_logical_map,
                           logical_count=loaded.logical_count, model_name=loaded.model_name)


def _pt_to_json(path: Path) -> str:
    import tempfile

    from epserve.placement_service import snapshot

    loaded = snapshot.load_snapshot(path)
    num_logical = loaded.num_logical_experts
    if num_logical is None:  # files without identity (e.g. SGLang's): infer E from the tensors
        num_logical = (int(loaded.logical_count.shape[1]) if loaded.logical_count is not None
                       else int(loaded.physical_to_logical_map.max()) + 1)
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / "snapshot.json"
        snapshot.save_snapshot(target, num_logical_experts=num_logical,
                               physical_to_logical_map=loaded.physical_to_logical_map,
                               logical_count=loaded.logical_count, model_name=loaded.model_name)
        return target.read_text()
