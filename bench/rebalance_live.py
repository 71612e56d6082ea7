"""Live rebalancing benchmark (CPU): inter-token latency while the expert map changes vs steady state.

Starts a real deployment (LocalDeployment: placement, expert workers, attention workers, gateway as
separate processes) on a router-skewed tiny model and keeps ``--streams`` closed-loop streaming
clients busy the whole time. Each repeat has two phases of ``--phase-s`` seconds:

- steady: no map change;
- rebalancing: a map change through PlacementAdmin every ``--change-interval-s`` (start to start;
  back to back when a change takes longer), alternating between the map in service and a changed
  one: ``--change plan`` (default) what EPLB would do: the deepseek plan for the load reported
  during warm-up; ``--change full``: the two halves of every layer's slots swapped, so almost
  every expert moves and each expert worker loads a whole new set of weights while serving the
  old one (the worst case); ``--change small``: two slots of one layer on one worker.

Every inter-token gap (time between two streamed tokens of one request) is attributed to the phase
it ends in; rebalancing-phase gaps count only while a change is in flight (from the admin call to
its answer: PREPARE, load, COMMIT, switch, RETIRE). Per repeat: p99 of each, their ratio; the
figures quoted are medians over repeats (plus p99 of all repeats' gaps pooled). Also: change
durations and experts / bytes moved.

Selecting gaps by a short window is biased towards long gaps (a window that starts at a random
time more likely falls into a long step, and a change lasts until every attention worker has
finished its current step), so the steady phase is also sampled the same way: windows with the
change durations, at random times of the steady phase ("control"). ``p99_ratio_vs_control``
compares like with like; ``p99_ratio`` compares against every steady gap.

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
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import stream_generate
from epserve.protos import placement_pb2, placement_pb2_grpc


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


def changed(phy2log: list[list[int]], kind: str, planned: list[list[int]] | None = None) -> list[list[int]]:
    """plan: ``planned``; full: the two halves of every layer's slots swapped (every expert moves;
    with 2 workers each loads a whole new set); small: two slots of worker 0 swapped in layer 0
    (one layer reloaded on one worker)."""
    if kind == "plan":
        assert planned is not None
        return planned
    if kind == "full":
        half = len(phy2log[0]) // 2
        return [row[half:] + row[:half] for row in phy2log]
    rows = [list(row) for row in phy2log]
    rows[0][0], rows[0][1] = rows[0][1], rows[0][0]
    return rows


def run_repeat(streams: Streams, admin, snapshot: dict, phase_s: float, interval_s: float,
               target: list[list[int]], timeout_s: float = 120) -> dict:
    steady_start = time.perf_counter()
    time.sleep(phase_s)
    steady_end = time.perf_counter()
    changes = []  # (start, end, response)
    maps = [target, snapshot["physical_to_logical_map"]]
    deadline = time.perf_counter() + phase_s
    while time.perf_counter() < deadline or len(changes) % 2:  # end on the original map
        if changes:
            time.sleep(max(0.0, changes[-1][0] + interval_s - time.perf_counter()))
        target = dict(snapshot, physical_to_logical_map=maps[len(changes) % 2])
        start = time.perf_counter()
        response = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(target)), timeout=timeout_s)
        changes.append((start, time.perf_counter(), response))
    steady_timed = streams.gaps_between(steady_start, steady_end)
    steady = [g for _, g in steady_timed]
    starts = [c[0] for c in changes]
    during, where = [], []
    for t, gap in streams.gaps_between(changes[0][0], changes[-1][1]):
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t <= changes[i][1]:
            during.append(gap)
            where.append((gap, t - changes[i][0], changes[i][1] - changes[i][0]))
    rng = random.Random(len(changes))
    control = []
    for _ in range(5):  # 5 control windows per change
        for start, end, _ in changes:
            at = rng.uniform(steady_start, steady_end - (end - start))
            control += [g for t, g in steady_timed if at <= t <= at + (end - start)]
    result = {
        "steady_gaps_s": steady, "during_gaps_s": during, "control_gaps_s": control,
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
    result["control_itl_median_ms"] = 1e3 * statistics.median(control)
    result["control_itl_p99_ms"] = 1e3 * p99(control)
    result["p99_ratio"] = result["during_itl_p99_ms"] / result["steady_itl_p99_ms"]
    result["p99_ratio_vs_control"] = result["during_itl_p99_ms"] / result["control_itl_p99_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds of each steady / rebalancing phase")
    parser.add_argument("--change-interval-s", type=float, default=1.0, help="start-to-start time between changes")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layers-per-chunk", type=int, default=0, help="--eplb-rebalance-layers-per-chunk")
    parser.add_argument("--change", choices=("plan", "full", "small"), default="plan",
                        help="plan: the deepseek plan for the warm-up load; full: every expert moves; "
                             "small: two slots of one layer on one worker")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--moe-intermediate-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--expert-load-duty-cycle", type=float, default=None,
                        help="expert workers' --expert-load-duty-cycle (default: theirs)")
    parser.add_argument("--out", default="bench/results/rebalance_live_cpu",
                        help="results base path: OUT.json (every run, by label) and OUT.md (tables + notes)")
    parser.add_argument("--label", default="", help="name of this run in the results (default: from the options)")
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
                              "--eplb-expert-dtype-bytes", "4" if args.dtype == "float32" else "2"],
        extra_expert_args=([] if args.expert_load_duty_cycle is None
                           else ["--expert-load-duty-cycle", str(args.expert_load_duty_cycle)]))
    load_average = os.getloadavg()[0]
    repeats = []
    with LocalDeployment(config) as deployment:
        channel = grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}")
        admin = placement_pb2_grpc.PlacementAdminStub(channel)
        snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=10).json)
        snapshot.pop("logical_count", None)
        streams = Streams(f"127.0.0.1:{deployment.gateway_port}", args.streams, args.max_new_tokens)
        try:
            time.sleep(5)  # warm up; attention workers report load every 2 s
            planned = None
            if args.change == "plan":
                plan = admin.PlanRebalance(placement_pb2.RebalanceRequest(algorithm="deepseek"), timeout=30)
                planned = [list(plan.map.phy2log[i * plan.map.num_physical_slots:(i + 1) * plan.map.num_physical_slots])
                           for i in range(plan.map.num_layers)]
                print(f"plan: balancedness {plan.balancedness_before:.3f} → {plan.balancedness_after:.3f}, "
                      f"{plan.experts_moved} experts moved", flush=True)
            target = changed(snapshot["physical_to_logical_map"], args.change, planned)
            for index in range(args.repeats):
                repeats.append(run_repeat(streams, admin, snapshot, args.phase_s, args.change_interval_s, target))
                r = repeats[-1]
                print(f"repeat {index}: ITL p99 steady {r['steady_itl_p99_ms']:.1f} ms, during "
                      f"{r['during_itl_p99_ms']:.1f} ms (x{r['p99_ratio']:.2f}); median "
                      f"{r['steady_itl_median_ms']:.1f} / {r['during_itl_median_ms']:.1f} ms; "
                      f"control p99 {r['control_itl_p99_ms']:.1f} ms (x{r['p99_ratio_vs_control']:.2f}); "
                      f"{r['num_changes']} changes, median "
                      f"{statistics.median(r['change_ms']):.0f} ms", flush=True)
        finally:
            streams.stop()
            channel.close()
    pooled_steady = [g for r in repeats for g in r.pop("steady_gaps_s")]
    pooled_during = [g for r in repeats for g in r.pop("during_gaps_s")]
    pooled_control = [g for r in repeats for g in r.pop("control_gaps_s")]
    summary = {
        "p99_ratio_vs_control": statistics.median(r["p99_ratio_vs_control"] for r in repeats),
        "control_itl_p99_ms": statistics.median(r["control_itl_p99_ms"] for r in repeats),
        "control_itl_median_ms": statistics.median(r["control_itl_median_ms"] for r in repeats),
        "pooled_control_itl_p99_ms": 1e3 * p99(pooled_control),
        "pooled_p99_ratio_vs_control": p99(pooled_during) / p99(pooled_control),
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
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "label")),
            "load_average_at_start": load_average,
            "model": {"num_layers": args.num_layers, "num_experts": args.num_experts, "top_k": 2,
                      "hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
                      "router_skew": 1.2, "dtype": args.dtype},
            "deployment": {"attention_workers": 2, "expert_workers": 2, "redundant_experts": 2,
                           "layers_per_chunk": args.layers_per_chunk, "streams": args.streams,
                           "change": args.change}}
    label = args.label or f"{args.change}, {args.layers_per_chunk or 'all'} layers per version"
    write_results(Path(args.out), label, {"meta": meta, "summary": summary, "repeats": repeats})
    print(json.dumps(summary, indent=2))


NOTES_MARKER = "<!-- notes: kept when the tables are rewritten -->"


def write_results(out: Path, label: str, run: dict) -> None:
    """Add (or replace) run ``label`` in OUT.json and rewrite OUT.md's tables from every run,
    keeping the notes after NOTES_MARKER."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[label] = run
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    md = out.with_suffix(".md")
    notes = md.read_text().split(NOTES_MARKER, 1)[1] if md.exists() and NOTES_MARKER in md.read_text() else "\n"
    lines = ["# Live rebalancing (CPU): inter-token latency during map changes vs steady state\n",
             "Target (issue 4): p99 inter-token latency during a rebalance <= 1.25 x steady state. Figures are "
             "medians over repeats (per repeat: p99 of the gaps in each phase, and their ratio). \"control\" "
             "samples the steady phase with windows of the changes' durations, as the in-flight gaps are "
             "sampled (see bench/rebalance_live.py). Produced by `bench/rebalance_live.py`.\n",
             "| run | date | load avg at start | steady p99 (ms) | in-flight p99 (ms) | **ratio** | control p99 (ms) "
             "| ratio vs control | pooled ratio | median ITL steady / in flight (ms) | change ms median (p90) "
             "| experts moved | MiB moved | changes | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        m, x = r["meta"], r["summary"]
        lines.append(
            f"| {name} | {m['date'][:16]} | {m['load_average_at_start']:.1f} | {x['steady_itl_p99_ms']:.1f} | "
            f"{x['during_itl_p99_ms']:.1f} | **{x['p99_ratio']:.2f}** | {x['control_itl_p99_ms']:.1f} | "
            f"{x['p99_ratio_vs_control']:.2f} | {x['pooled_p99_ratio']:.2f} | {x['steady_itl_median_ms']:.1f} / "
            f"{x['during_itl_median_ms']:.1f} | {x['change_ms_median']:.0f} ({x['change_ms_p90']:.0f}) | "
            f"{x['experts_moved_median']:.0f} | {x['bytes_moved_median'] / 2 ** 20:.1f} | {x['num_changes']} | "
            f"{x['errors']} |")
    lines.append("")
    for name, r in runs.items():
        m = r["meta"]
        lines.append(f"- **{name}**: `{m['command']}` on {m['machine']}; model {m['model']}; "
                     f"deployment {m['deployment']}")
    md.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)


if __name__ == "__main__":
    main()
