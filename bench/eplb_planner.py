"""EPLB planner benchmark on the DeepSeek-V3 shape (CPU).

Legend: L MoE layers, E logical experts, R redundant slots, P = E + R physical slots,
W expert workers, N nodes, G expert groups.

Shape: L=58, E=256, R=32 (P=288), W=32 on N=4 nodes, G=8 (DeepSeek-V3's published config).
Loads: Zipf(exponent) token counts per expert, hot experts permuted per layer (seeded).

Scenarios, for every algorithm and Zipf exponent:
- ``fresh``: plan from scratch for the load (movement_aware with no previous map is its
  reference plan, i.e. deepseek).
- ``drift``: the map in service is the same algorithm's plan for the old load; the load
  drifts (every expert × lognormal(0, sigma); two pairs of experts among the 16 hottest
  swap loads in every layer); re-plan and count the (layer, slot) entries that changed.
- ``severe drift`` (extra, not in the targets): the three hottest experts of every layer
  swap loads with experts ranked 20th-34th (hot experts go cold and vice versa).
- ``worker down`` (extra): worker 5 dies; elasticity_aware re-plans from scratch on the live
  workers, movement_aware repairs the map in service (deepseek's).

Reported per row: plan_ms (median of --repeat wall-clock runs after one warm-up, and the
median thread CPU time, since the CI box is shared), balancedness (mean over layers of mean
worker load / max worker load), balancedness of the old map on the new load, experts moved.

Targets (from the issue): plan_ms <= 50; movement_aware balancedness >= deepseek_hierarchical's
and within 1% of deepseek's; after drift movement_aware moves <= 50% of what deepseek moves.

Run: .venv/bin/python bench/eplb_planner.py --json-out bench/results/eplb_planner_cpu.json
                                          --md-out bench/results/eplb_planner_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epserve.placement_service.eplb import EplbAlgorithm, balancedness, experts_moved, plan  # noqa: E402

L, E, R, W, N, G = 58, 256, 32, 32, 4, 8
P = E + R
ALGORITHMS = [EplbAlgorithm.deepseek, EplbAlgorithm.deepseek_hierarchical, EplbAlgorithm.elasticity_aware,
              EplbAlgorithm.movement_aware]


def zipf_load(exponent: float, seed: int, tokens_per_layer: float = 8 * 16384) -> torch.Tensor:
    """[L, E] expert token counts: Zipf over ranks, ranks permuted per layer."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(1, E + 1, dtype=torch.float64) ** -exponent
    base = base / base.sum() * tokens_per_layer
    return torch.stack([base[torch.randperm(E, generator=gen)] for _ in range(L)])


def drift(weight: torch.Tensor, sigma: float, num_swaps: int, top: int, seed: int) -> torch.Tensor:
    """Multiply by lognormal noise; swap ``num_swaps`` random pairs among the ``top`` hottest."""
    gen = torch.Generator().manual_seed(seed)
    out = weight * torch.exp(sigma * torch.randn(weight.shape, generator=gen, dtype=torch.float64))
    order = weight.argsort(dim=1, descending=True)
    for layer in range(L):
        pick = order[layer, torch.randperm(top, generator=gen)[:2 * num_swaps]]
        a, b = pick[0::2], pick[1::2]
        out[layer, a], out[layer, b] = out[layer, b].clone(), out[layer, a].clone()
    return out


def severe_drift(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The 3 hottest experts swap loads with experts ranked 20, 27, 34 (plus mild noise)."""
    gen = torch.Generator().manual_seed(seed)
    out = weight * torch.exp(0.1 * torch.randn(weight.shape, generator=gen, dtype=torch.float64))
    order = weight.argsort(dim=1, descending=True)
    rows = torch.arange(L)
    for hot, cold in [(0, 19), (1, 26), (2, 33)]:
        a, b = order[:, hot], order[:, cold]
        out[rows, a], out[rows, b] = out[rows, b].clone(), out[rows, a].clone()
    return out


def timed_plan(repeat: int, weight: torch.Tensor, algorithm: EplbAlgorithm, **kwargs):
    plan(weight, P, G, N, W, algorithm=algorithm, **kwargs)  # warm-up
    wall, cpu = [], []
    result = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.thread_time()
        result = plan(weight, P, G, N, W, algorithm=algorithm, **kwargs)
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return result, statistics.median(wall), statistics.median(cpu), min(wall)


def run(repeat: int, exponents: list[float], sigma: float) -> list[dict]:
    rows = []
    for exponent in exponents:
        seed = int(exponent * 100)
        old = zipf_load(exponent, seed)
        scenarios = {
            "fresh": (old, None),
            "drift": (drift(old, sigma, num_swaps=2, top=16, seed=seed + 1), None),
            "severe drift": (severe_drift(old, seed=seed + 2), None),
        }
        previous_by_alg = {alg: plan(old, P, G, N, W, algorithm=alg) for alg in ALGORITHMS}
        for scenario, (weight, _) in scenarios.items():
            for alg in ALGORITHMS:
                kwargs = {}
                previous = None if scenario == "fresh" else previous_by_alg[alg]
                if previous is not None and alg is EplbAlgorithm.movement_aware:
                    kwargs["previous_phy2log"] = previous
                phy2log, wall_ms, cpu_ms, min_ms = timed_plan(repeat, weight, alg, **kwargs)
                rows.append({
                    "exponent": exponent, "scenario": scenario, "algorithm": alg.value,
                    "plan_ms": round(wall_ms, 2), "plan_cpu_ms": round(cpu_ms, 2), "plan_min_ms": round(min_ms, 2),
                    "balancedness": round(balancedness(phy2log, weight, W), 4),
                    "balancedness_before": (None if previous is None
                                            else round(balancedness(previous, weight, W), 4)),
                    "experts_moved": None if previous is None else experts_moved(previous, phy2log),
                })
        # one worker down: elasticity_aware from scratch vs movement_aware repairing deepseek's map
        live = torch.ones(W, dtype=torch.bool)
        live[5] = False
        previous = previous_by_alg[EplbAlgorithm.deepseek]
        for alg, kwargs in [(EplbAlgorithm.elasticity_aware, {}),
                            (EplbAlgorithm.movement_aware, {"previous_phy2log": previous})]:
            phy2log, wall_ms, cpu_ms, min_ms = timed_plan(repeat, old, alg, live_workers=live, **kwargs)
            rows.append({
                "exponent": exponent, "scenario": "worker down", "algorithm": alg.value,
                "plan_ms": round(wall_ms, 2), "plan_cpu_ms": round(cpu_ms, 2), "plan_min_ms": round(min_ms, 2),
                "balancedness": round(balancedness(phy2log, old, W, live_workers=live), 4),
                "balancedness_before": None,
                "experts_moved": experts_moved(previous, phy2log),
            })
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """One entry per (exponent, target) with the measured value and the ratio to the target."""
    checks = []
    by = {(r["exponent"], r["scenario"], r["algorithm"]): r for r in rows}
    for exponent in sorted({r["exponent"] for r in rows}):
        worst_ms = max(r["plan_ms"] for r in rows if r["exponent"] == exponent
                       and r["scenario"] in ("fresh", "drift"))
        checks.append({"exponent": exponent, "target": "plan_ms <= 50 (fresh + drift, every algorithm; wall median)",
                       "value": worst_ms, "ok": worst_ms <= 50, "ratio": round(worst_ms / 50, 3)})
        worst_cpu = max(r["plan_cpu_ms"] for r in rows if r["exponent"] == exponent
                        and r["scenario"] in ("fresh", "drift"))
        checks.append({"exponent": exponent, "target": "plan_ms <= 50 (same, thread CPU median)",
                       "value": worst_cpu, "ok": worst_cpu <= 50, "ratio": round(worst_cpu / 50, 3)})
        for scenario in ("fresh", "drift"):
            ma = by[(exponent, scenario, "movement_aware")]
            ds = by[(exponent, scenario, "deepseek")]
            hier = by[(exponent, scenario, "deepseek_hierarchical")]
            ratio = ma["balancedness"] / ds["balancedness"]
            checks.append({"exponent": exponent, "target": f"{scenario}: movement_aware balancedness >= 0.99 x deepseek",
                           "value": round(ratio, 4), "ok": ratio >= 0.99, "ratio": round(ratio / 0.99, 3)})
            checks.append({"exponent": exponent,
                           "target": f"{scenario}: movement_aware balancedness >= deepseek_hierarchical",
                           "value": f"{ma['balancedness']} vs {hier['balancedness']}",
                           "ok": ma["balancedness"] >= hier["balancedness"],
                           "ratio": round(ma["balancedness"] / hier["balancedness"], 3)})
        ma, ds = by[(exponent, "drift", "movement_aware")], by[(exponent, "drift", "deepseek")]
        fraction = ma["experts_moved"] / ds["experts_moved"]
        checks.append({"exponent": exponent, "target": "drift: movement_aware moves <= 50% of deepseek's",
                       "value": f"{ma['experts_moved']} / {ds['experts_moved']} = {fraction:.3f}",
                       "ok": fraction <= 0.5, "ratio": round(fraction / 0.5, 3)})
    return checks


def format_rows(rows: list[dict]) -> list[str]:
    header = ("| Zipf | scenario | algorithm | plan_ms (wall, median) | plan_ms (thread CPU, median) | "
              "plan_ms (wall, min) | balancedness | before | experts moved (of 16704) |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        before = "-" if r["balancedness_before"] is None else f"{r['balancedness_before']:.4f}"
        moved = "-" if r["experts_moved"] is None else str(r["experts_moved"])
        lines.append(f"| {r['exponent']} | {r['scenario']} | {r['algorithm']} | {r['plan_ms']:.2f} | "
                     f"{r['plan_cpu_ms']:.2f} | {r['plan_min_ms']:.2f} | {r['balancedness']:.4f} | {before} | {moved} |")
    return lines


def format_checks(checks: list[dict]) -> list[str]:
    lines = ["| Zipf | target | measured | ratio to target | met |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['exponent']} | {c['target']} | {c['value']} | {c['ratio']} | "
                     f"{'yes' if c['ok'] else 'NO'} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per row (median reported)")
    parser.add_argument("--exponents", default="0.6,1.0,1.4", help="Zipf exponents")
    parser.add_argument("--sigma", type=float, default=0.25, help="lognormal drift sigma")
    parser.add_argument("--json-out", default=None, help="write results as JSON here")
    parser.add_argument("--md-out", default=None, help="write a Markdown report here")
    args = parser.parse_args()
    exponents = [float(v) for v in args.exponents.split(",")]

    load_before = os.getloadavg()
    started = time.time()
    rows = run(args.repeat, exponents, args.sigma)
    load_after = os.getloadavg()
    checks = check_targets(rows)
    command = " ".join([".venv/bin/python", *sys.argv])
    machine = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
    }
    print("\n".join(format_rows(rows)))
    print()
    print("\n".join(format_checks(checks)))
    print(f"\nload average before/after: {machine['loadavg_before']} / {machine['loadavg_after']}"
          f" on {machine['cpus']} CPUs; {time.time() - started:.0f} s")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "machine": machine,
        "shape": {"layers": L, "logical_experts": E, "redundant": R, "physical_slots": P,
                  "workers": W, "nodes": N, "groups": G},
        "drift_sigma": args.sigma, "repeat": args.repeat, "rows": rows, "checks": checks,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if args.md_out:
        Path(args.md_out).write_text(render_markdown(result) + "\n")
    return 0


def render_markdown(result: dict) -> str:
    m = result["machine"]
    return "\n".join([
        "# EPLB planner benchmark (CPU)",
        "",
        f"- Date: {result['date']}",
        f"- Machine: the project's 2-core CPU development box ({m['platform']}, {m['cpus']} CPUs, "
        f"Python {m['python']}, torch {m['torch']}), shared with other jobs: load average "
        f"{m['loadavg_before']} before, {m['loadavg_after']} after. Wall-clock times on a busy box run "
        "above the thread CPU times; both are medians.",
        f"- Command: `{result['command']}`",
        f"- Shape: DeepSeek-V3, {L} MoE layers, {E} experts + {R} redundant = {P} slots, {W} workers "
        f"on {N} nodes, {G} expert groups. Zipf loads, hot experts permuted per layer (seeded).",
        f"- Drift: every expert × lognormal(0, {result['drift_sigma']}), and 2 pairs among the 16 "
        "hottest experts swap loads, in every layer. The map in service is each algorithm's own plan "
        "for the old load. Severe drift: the 3 hottest swap with ranks 20/27/34. Worker down: worker 5 "
        "dies, the map in service is deepseek's.",
        f"- plan_ms: median of {result['repeat']} runs after a warm-up.",
        "",
        "## Targets",
        "",
        *format_checks(result["checks"]),
        "",
        "## All rows",
        "",
        *format_rows(result["rows"]),
        "",
        "## Notes",
        "",
        "- movement_aware: replica-count corrections (1 changed slot each) until no expert's load per "
        "replica exceeds the from-scratch plan's largest, then swap search (2 changed slots each; k-th "
        "hottest with k-th coldest worker, the hottest with any slot when its pair cannot help) until "
        "every worker is within 1.01 x the from-scratch plan's max worker time; a layer still above that "
        "takes the from-scratch plan relabelled to keep previous entries. Its balancedness is >= "
        "deepseek's / 1.01 per layer by construction (so >= 0.990 x deepseek's).",
        "- deepseek_hierarchical's low balancedness at Zipf >= 1.0 is the policy's own limit, not a bug: "
        "all replicas of a group stay on the group's node, so the node holding the hottest group carries "
        "at least that group's load; the per-layer hot experts here are spread over groups at random.",
        "- Worker down at Zipf 1.4 (extra scenario): swaps cannot reach the target there (mid-size "
        "replicas would need a chain of moves), so every layer falls back to the relabelled reference: "
        "fewer moves than elasticity_aware but far more than after a drift, and the slowest row.",
        "- Timing: the box is shared with other jobs (see load average); wall-clock medians include time "
        "waiting for a core, the thread CPU medians measure the planner's own work. The targets are "
        "checked against both.",
    ])


if __name__ == "__main__":
    sys.exit(main())
