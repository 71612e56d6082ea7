"""Live rebalancing benchmark (CPU): inter-token latency while the expert map changes vs steady state.

Starts a real deployment (LocalDeployment: placement, expert workers, attention workers, gateway as
separate processes) on a router-skewed tiny model and keeps ``--streams`` closed-loop streaming
clients busy the whole time. Each repeat has two phases of ``--phase-s`` seconds:

- steady: no map change;
- rebalancing: a map change through PlacementAdmin every ``--change-interval-s`` (start to start;
  back to back when a change takes longer), alternating between the map in service and a changed
  one (``--change full``: the two halves of every layer's slots swapped, so almost every expert
  moves and each expert worker loads a whole new set of weights while serving the old one;
  ``--change small``: two slots of one layer on one worker).

Every inter-token gap (time between two streamed tokens of one request) is attributed to the phase
it ends in; rebalancing-phase gaps count only while a change is in flight (from the admin call to
its answer: PREPARE, load, COMMIT, switch, RETIRE). Per repeat: p99 of each, their ratio; the
figures quoted are medians over repeats (plus p99 of all repeats' gaps pooled). Also: change
durations and experts / bytes moved.

    .venv/bin/python bench/rebalance_live.py [--repeats 5] [--phase-s 10] [--change-interval-s 1]
        [--streams 4] [--layers-per-chunk 0] [--change full|small]

Writes bench/results/rebalance_live_cpu.{json,md}. Target: p99 ITL during a rebalance <= 1.25 x steady.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from epserve.deployment import DeploymentConfig, LocalDeployment
from gateway.client import stream_generate
from protos import placement_pb2, placement_pb2_grpc


class Streams:
    """Closed-loop streaming clients; every token's arrival time is kept per request."""

    def __init__(self, address: str, num_streams: int, max_new_tokens: int) -> None:
        self.address, self.max_new_tokens = address, max_new_tokens
        self.gaps: list[tuple[float, float]] = []  # (arrival time of the later token, gap seconds)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(num_streams)]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            last = None
            try:
                for response in stream_generate(self.address, f"client {index} request {n}: a long story about",
                                                max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                ignore_eos=True, timeout_s=300):
                    now = time.perf_counter()
                    if response.token_ids:
                        if last is not None:
                            with self._lock:
                                self.gaps.append((now, now - last))
                        last = now
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def gaps_between(self, start: float, end: float) -> list[tuple[float, float]]:
        with self._lock:
            return [(t, g) for t, g in self.gaps if start <= t < end]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1) + 0.5))]


def changed(phy2log: list[list[int]], kind: str) -> list[list[int]]:
    """full: the two halves of every layer's slots swapped (every expert moves; with 2 workers each
    loads a whole new set); small: two slots of worker 0 swapped in layer 0 (one layer reloaded on
    one worker)."""
    if kind == "full":
        half = len(phy2log[0]) // 2
        return [row[half:] + row[:half] for row in phy2log]
    rows = [list(row) for row in phy2log]
    rows[0][0], rows[0][1] = rows[0][1], rows[0][0]
    return rows


def run_repeat(streams: Streams, admin, snapshot: dict, phase_s: float, interval_s: float, kind: str,
               timeout_s: float = 120) -> dict:
    steady_start = time.perf_counter()
    time.sleep(phase_s)
    steady_end = time.perf_counter()
    changes = []  # (start, end, response)
    maps = [changed(snapshot["physical_to_logical_map"], kind), snapshot["physical_to_logical_map"]]
    deadline = time.perf_counter() + phase_s
    while time.perf_counter() < deadline or len(changes) % 2:  # end on the original map
        if changes:
            time.sleep(max(0.0, changes[-1][0] + interval_s - time.perf_counter()))
        target = dict(snapshot, physical_to_logical_map=maps[len(changes) % 2])
        start = time.perf_counter()
        response = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(target)), timeout=timeout_s)
        changes.append((start, time.perf_counter(), response))
    steady = [g for _, g in streams.gaps_between(steady_start, steady_end)]
    starts = [c[0] for c in changes]
    during, where = [], []
    for t, gap in streams.gaps_between(changes[0][0], changes[-1][1]):
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t <= changes[i][1]:
            during.append(gap)
            where.append((gap, t - changes[i][0], changes[i][1] - changes[i][0]))
    result = {
        "steady_gaps_s": steady, "during_gaps_s": during,
        "steady_gaps": len(steady), "during_gaps": len(during),
        "steady_itl_median_ms": 1e3 * statistics.median(steady), "steady_itl_p99_ms": 1e3 * p99(steady),
        "during_itl_median_ms": 1e3 * statistics.median(during), "during_itl_p99_ms": 1e3 * p99(during),
        "num_changes": len(changes),
        "change_ms": [c[2].duration_ms for c in changes],
        "change_wall_ms": [1e3 * (c[1] - c[0]) for c in changes],
        "experts_moved": [c[2].experts_moved for c in changes],
        "bytes_moved": [c[2].bytes_moved for c in changes],
        "versions": [c[2].version for c in changes],
        # the 3 longest gaps in flight: (gap, when it ended after its change started, change wall time), ms
        "worst_during_ms": [[round(1e3 * v, 1) for v in w] for w in sorted(where, reverse=True)[:3]],
        "worst_steady_ms": [round(1e3 * g, 1) for g in sorted(steady, reverse=True)[:3]],
    }
    result["p99_ratio"] = result["during_itl_p99_ms"] / result["steady_itl_p99_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds of each steady / rebalancing phase")
    parser.add_argument("--change-interval-s", type=float, default=1.0, help="start-to-start time between changes")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layers-per-chunk", type=int, default=0, help="--eplb-rebalance-layers-per-chunk")
    parser.add_argument("--change", choices=("full", "small"), default="full",
                        help="full: every expert moves; small: two slots of one layer on one worker")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--moe-intermediate-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="bench/results/rebalance_live_cpu")
    args = parser.parse_args()

    from epserve.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="epserve-rebalance-bench-"))
    model = make_tiny_model(work / "model", seed=7, num_layers=args.num_layers, num_experts=args.num_experts,
                            top_k=2, hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                            router_skew=1.2)
    config = DeploymentConfig(
        model_path=str(model), num_attention_workers=2, num_expert_workers=2, num_redundant_experts=2,
        dtype=args.dtype, log_dir=str(work / "logs"),
        extra_placement_args=["--eplb-rebalance-layers-per-chunk", str(args.layers_per_chunk),
                              "--eplb-expert-dtype-bytes", "4" if args.dtype == "float32" else "2"])
    load_average = os.getloadavg()[0]
    repeats = []
    with LocalDeployment(config) as deployment:
        channel = grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}")
        admin = placement_pb2_grpc.PlacementAdminStub(channel)
        snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=10).json)
        snapshot.pop("logical_count", None)
        streams = Streams(f"127.0.0.1:{deployment.gateway_port}", args.streams, args.max_new_tokens)
        try:
            time.sleep(3)  # warm up
            for index in range(args.repeats):
                repeats.append(run_repeat(streams, admin, snapshot, args.phase_s, args.change_interval_s, args.change))
                r = repeats[-1]
                print(f"repeat {index}: ITL p99 steady {r['steady_itl_p99_ms']:.1f} ms, during "
                      f"{r['during_itl_p99_ms']:.1f} ms (x{r['p99_ratio']:.2f}); median "
                      f"{r['steady_itl_median_ms']:.1f} / {r['during_itl_median_ms']:.1f} ms; "
                      f"{r['num_changes']} changes, median "
                      f"{statistics.median(r['change_ms']):.0f} ms", flush=True)
        finally:
            streams.stop()
            channel.close()
    pooled_steady = [g for r in repeats for g in r.pop("steady_gaps_s")]
    pooled_during = [g for r in repeats for g in r.pop("during_gaps_s")]
    summary = {
        "pooled_steady_itl_p99_ms": 1e3 * p99(pooled_steady), "pooled_during_itl_p99_ms": 1e3 * p99(pooled_during),
        "pooled_p99_ratio": p99(pooled_during) / p99(pooled_steady),
        "steady_itl_p99_ms": statistics.median(r["steady_itl_p99_ms"] for r in repeats),
        "during_itl_p99_ms": statistics.median(r["during_itl_p99_ms"] for r in repeats),
        "p99_ratio": statistics.median(r["p99_ratio"] for r in repeats),
        "steady_itl_median_ms": statistics.median(r["steady_itl_median_ms"] for r in repeats),
        "during_itl_median_ms": statistics.median(r["during_itl_median_ms"] for r in repeats),
        "change_ms_median": statistics.median(ms for r in repeats for ms in r["change_ms"]),
        "change_ms_p90": sorted(ms for r in repeats for ms in r["change_ms"])[
            int(0.9 * (sum(r["num_changes"] for r in repeats) - 1))],
        "experts_moved_median": statistics.median(m for r in repeats for m in r["experts_moved"]),
        "bytes_moved_median": statistics.median(b for r in repeats for b in r["bytes_moved"]),
        "num_changes": sum(r["num_changes"] for r in repeats),
        "errors": len(streams.errors),
    }
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} (CPU, {os.cpu_count()} cores)",
            "command": "python bench/rebalance_live.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "load_average_at_start": load_average,
            "model": {"num_layers": args.num_layers, "num_experts": args.num_experts, "top_k": 2,
                      "hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
                      "router_skew": 1.2, "dtype": args.dtype},
            "deployment": {"attention_workers": 2, "expert_workers": 2, "redundant_experts": 2,
                           "layers_per_chunk": args.layers_per_chunk, "streams": args.streams,
                           "change": args.change}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "repeats": repeats}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
