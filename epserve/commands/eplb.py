"""``epserve eplb``: offline EPLB planning.

``epserve eplb simulate --load-file F --num-redundant-experts R --num-workers W ...`` plans a
placement for the per-expert load in F (``logical_count`` [layers, experts], JSON or .pt, the
``--init-expert-location`` format) and reports how long planning took, how balanced the
result is and how many (layer, slot) entries moved against ``--previous``. ``--output``
writes the placement as a snapshot that ``--init-expert-location`` accepts.

Errors (bad files, shapes that do not fit) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys

ALGORITHMS = ("auto", "deepseek", "deepseek_hierarchical", "elasticity_aware", "movement_aware")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eplb", help="expert-parallel load balancing tools",
                                   description="Expert-parallel load balancing (EPLB) tools.")
    commands = parser.add_subparsers(dest="eplb_command", metavar="SUBCOMMAND", required=True)
    sim = commands.add_parser(
        "simulate", help="plan a placement for a recorded load and report its quality",
        description="Plan an expert placement for the load in --load-file and report plan time, "
                    "balancedness and experts moved against --previous.")
    sim.add_argument("--load-file", required=True,
                     help="JSON or .pt file with logical_count [layers, experts] (load per logical expert)")
    sim.add_argument("--num-redundant-experts", type=int, required=True,
                     help="redundant physical slots R (physical slots = experts + R)")
    sim.add_argument("--num-workers", type=int, required=True, help="expert workers W (EP size)")
    sim.add_argument("--num-nodes", type=int, default=1, help="nodes the workers are spread over (default 1)")
    sim.add_argument("--num-groups", type=int, default=None,
                     help="expert groups of the model (e.g. 8 for DeepSeek-V3); enables deepseek_hierarchical")
    sim.add_argument("--algorithm", "--eplb-algorithm", dest="algorithm", default="auto", choices=ALGORITHMS,
                     help="EPLB algorithm (default auto: hierarchical when num_groups %% num_nodes == 0)")
    sim.add_argument("--previous", default=None,
                     help="snapshot with the physical_to_logical_map in service (movement is counted against it)")
    sim.add_argument("--output", default=None, help="write the planned placement to this snapshot (.json or .pt)")
    sim.add_argument("--worker-capacity", default=None,
                     help="comma-separated relative speed per worker, e.g. 1,1,0.25,0.25")
    sim.add_argument("--dead-workers", default=None,
                     help="comma-separated ids of workers that are down (elasticity_aware / movement_aware)")
    sim.add_argument("--tolerance", type=float, default=0.01,
                     help="movement_aware: allowed max-load excess over a from-scratch plan (default 0.01)")
    sim.add_argument("--model-name", default=None, help="model identity written to / checked in snapshots")
    sim.add_argument("--repeat", type=int, default=1, help="plan this many times and report the median time")
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.eplb_command == "simulate":
        return simulate(args)
    print(f"error: unknown eplb sub-command {args.eplb_command!r}", file=sys.stderr)
    return 2


def simulate(args: argparse.Namespace) -> int:
    try:
        report = _simulate(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _simulate(args: argparse.Namespace) -> dict:
    import statistics
    import time

    import torch

    from epserve.placement_service.eplb import balancedness, experts_moved, plan, resolve_algorithm
    from epserve.placement_service.snapshot import load_snapshot, save_snapshot

    load = load_snapshot(args.load_file)
    if load.logical_count is None:
        raise ValueError(f"--load-file {args.load_file} has no logical_count [layers, experts]")
    weight = load.logical_count  # [L, E]
    num_layers, num_logical = weight.shape
    load.validate(num_layers=num_layers, num_logical_experts=num_logical, model_name=args.model_name)
    if args.num_redundant_experts < 0:
        raise ValueError(f"--num-redundant-experts must be >= 0, got {args.num_redundant_experts}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    num_slots = num_logical + args.num_redundant_experts
    capacity = _parse_floats(args.worker_capacity, "--worker-capacity", args.num_workers)
    live = None
    if args.dead_workers:
        dead = [int(v) for v in _split(args.dead_workers)]
        if any(not 0 <= d < args.num_workers for d in dead):
            raise ValueError(f"--dead-workers must be worker ids in [0, {args.num_workers}), got {dead}")
        live = torch.ones(args.num_workers, dtype=torch.bool)
        live[dead] = False

    previous = None
    if args.previous:
        snap = load_snapshot(args.previous)
        if snap.physical_to_logical_map is None:
            raise ValueError(f"--previous {args.previous} has no physical_to_logical_map")
        snap.validate(num_layers=num_layers, num_logical_experts=num_logical,
                      num_physical_slots=num_slots, model_name=args.model_name)
        previous = snap.physical_to_logical_map

    algorithm = resolve_algorithm(args.algorithm, args.num_groups, args.num_nodes, live)
    times_ms = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        phy2log = plan(weight, num_slots, args.num_groups, args.num_nodes, args.num_workers,
                       algorithm=algorithm, previous_phy2log=previous, worker_capacity=capacity,
                       live_workers=live, tolerance=args.tolerance)
        times_ms.append((time.perf_counter() - start) * 1e3)
    if args.output:
        save_snapshot(args.output, num_logical_experts=num_logical, physical_to_logical_map=phy2log,
                      model_name=args.model_name or load.model_name)
    moved = experts_moved(previous, phy2log) if previous is not None else 0
    return {
        "algorithm": algorithm.value,
        "requested_algorithm": args.algorithm,
        "plan_ms": round(statistics.median(times_ms), 3),
        "balancedness": round(balancedness(phy2log, weight, args.num_workers, capacity, live), 6),
        "balancedness_before": (round(balancedness(previous, weight, args.num_workers, capacity, live), 6)
                                if previous is not None else None),
        "experts_moved": moved,
        "moved_fraction": round(moved / phy2log.numel(), 6),
        "num_layers": num_layers,
        "num_logical_experts": num_logical,
        "num_physical_slots": num_slots,
        "num_workers": args.num_workers,
        "num_nodes": args.num_nodes,
        "num_groups": args.num_groups,
        "output": args.output,
    }


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_floats(text: str | None, flag: str, expected: int):
    if text is None:
        return None
    import torch

    try:
        values = [float(v) for v in _split(text)]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if len(values) != expected:
        raise ValueError(f"{flag} has {len(values)} values, --num-workers is {expected}")
    return torch.tensor(values, dtype=torch.float64)


def _print_table(report: dict) -> None:
    rows = [
        ("algorithm", report["algorithm"] + (f" (from {report['requested_algorithm']})"
                                             if report["requested_algorithm"] != report["algorithm"] else "")),
        ("layers x logical experts", f"{report['num_layers']} x {report['num_logical_experts']}"),
        ("physical slots / workers / nodes",
         f"{report['num_physical_slots']} / {report['num_workers']} / {report['num_nodes']}"),
        ("plan time", f"{report['plan_ms']:.2f} ms"),
        ("balancedness", f"{report['balancedness']:.4f}"),
        ("balancedness before", "-" if report["balancedness_before"] is None
         else f"{report['balancedness_before']:.4f}"),
        ("experts moved", f"{report['experts_moved']} ({100 * report['moved_fraction']:.1f}% of slots)"),
    ]
    if report["output"]:
        rows.append(("written to", report["output"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
