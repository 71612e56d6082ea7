"""Hybrid capacity benchmark: one fast and one slow expert worker, served traffic under the
capacity-aware planner vs a capacity-blind one (issue 13 item 4).

Each mode starts a whole deployment (placement, 2 expert workers, attention workers, gateway as
separate processes, the torch data plane), serves warm-up traffic so attention workers report
expert load, asks placement for a rebalance from that load (so both modes hold a load-balanced map),
then measures closed-loop greedy streams through the public gRPC API. The modes differ only in the
capacities the expert workers register:

- ``aware``: ``--expert-capacities`` when given, else each worker measures its own (``--capacity
  auto``: its MoE runner's expert GEMM rate on its device, in TFLOP/s) — the slow worker gets fewer
  and colder experts;
- ``blind``: every capacity 1, as if the workers were equal.

Modes alternate (blind, aware, blind, aware, ...) for ``--rounds`` rounds; the table quotes the
median. On CPU (default) the two expert workers differ only in ``--expert-num-threads`` (1 and 4):
which of them is faster depends on the machine (on a 2-core VM, 4 threads oversubscribe the cores
and make small expert GEMMs several times slower), which is what ``--capacity auto`` measures; on a
GPU machine: ``--attention-device cuda:0 --expert-devices cuda:0,cpu --load-format dummy``.

    .venv/bin/python bench/hybrid_capacity.py [--rounds 2] [--concurrency 8] [--max-new-tokens 48]
    python3 bench/hybrid_capacity.py --attention-device cuda:0 --expert-devices cuda:0,cpu \\
        --load-format dummy --dtype bfloat16 --out bench/results/hybrid_capacity_h100

The model is made with ``make_tiny_model`` at the size given (``--hidden-size``, ``--moe-intermediate-
size``, ``--num-experts``, ``--num-layers``; ``--router-skew`` makes some experts hot); with
``--load-format dummy`` only its config and tokenizer are read. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.expert_map_codec import expert_map_from_proto
from epserve.gateway.client import stream_generate
from epserve.placement_service import eplb
from epserve.protos import placement_pb2, placement_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="blind/aware pairs (default 3)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent greedy streams (default 8)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--attention-workers", type=int, default=1)
    p.add_argument("--ep-num-redundant-experts", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--attention-device", default="cpu")
    p.add_argument("--expert-devices", default="cpu,cpu", help="one device per expert worker (default cpu,cpu)")
    p.add_argument("--expert-num-threads", default="1,4", help="torch threads per expert worker (default 1,4)")
    p.add_argument("--expert-capacities", default="",
                   help="capacities of the aware mode, e.g. 1,0.25 (default: measured, --capacity auto)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--moe-intermediate-size", type=int, default=256)
    p.add_argument("--router-skew", type=float, default=1.2)
    p.add_argument("--out", default="bench/results/hybrid_capacity_cpu", help="results path without suffix")
    p.add_argument("--note", default="", help="a paragraph for the markdown (what the figures mean on this machine)")
    return p.parse_args(argv)


def make_model(args: argparse.Namespace, directory: Path) -> Path:
    """The model at the size asked; with dummy weights a small checkpoint whose config.json then
    names the size (workers read only the config and the tokenizer)."""
    from epserve.tiny_model import make_tiny_model

    size = dict(num_layers=args.num_layers, num_experts=args.num_experts, top_k=args.top_k,
                hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden_size // 8)
    if args.load_format != "dummy":
        return make_tiny_model(directory, seed=0, router_skew=args.router_skew, **size)
    model = make_tiny_model(directory, seed=0)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=size["hidden_size"], intermediate_size=3 * size["hidden_size"],
                  moe_intermediate_size=size["moe_intermediate_size"], num_experts=size["num_experts"],
                  num_experts_per_tok=size["top_k"], num_hidden_layers=size["num_layers"],
                  max_window_layers=size["num_layers"], num_attention_heads=size["num_attention_heads"],
                  num_key_value_heads=size["num_key_value_heads"], head_dim=size["head_dim"])
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model


def one_request(address: str, prompt: str, max_new_tokens: int) -> dict:
    start, stamps = time.perf_counter(), []
    for response in stream_generate(address, prompt, max_new_tokens=max_new_tokens, temperature=0.0,
                                     ignore_eos=True, timeout_s=900):
        if response.token_ids:
            stamps += [time.perf_counter()] * len(response.token_ids)
    itl = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    return {"tokens": len(stamps), "latency_s": time.perf_counter() - start, "itl_s": itl}


def serve(address: str, args: argparse.Namespace, tag: str, max_new_tokens: int) -> dict:
    prompts = [f"{tag} client {c} request {r}: tell me about the number {c * 100 + r}"
               for c in range(args.concurrency) for r in range(args.requests_per_client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda p: one_request(address, p, max_new_tokens), prompts))
    wall = time.perf_counter() - start
    itl = sorted(x for r in results for x in r["itl_s"])
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "itl_median_ms": 1e3 * statistics.median(itl) if itl else 0.0,
            "itl_p99_ms": 1e3 * itl[int(0.99 * (len(itl) - 1))] if itl else 0.0}


def rebalance(admin, timeout_s: float = 60.0) -> placement_pb2.RebalanceResponse:
    """Rebalance from the reported load (waits until a report has reached placement)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.Rebalance(placement_pb2.RebalanceRequest(), timeout=120)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_mode(args: argparse.Namespace, model: Path, mode: str, capacities: list[float] | str,
             log_dir: Path) -> dict:
    devices = args.expert_devices.split(",")
    config = DeploymentConfig(
        model_path=str(model), num_attention_workers=args.attention_workers, num_expert_workers=len(devices),
        num_redundant_experts=args.ep_num_redundant_experts, dtype=args.dtype, load_format=args.load_format,
        attention_device=args.attention_device, expert_devices=devices, expert_capacities=capacities,
        expert_num_threads=[int(t) for t in args.expert_num_threads.split(",")],
        attention_backend=args.attention_backend, extra_attention_args=["--load-report-interval-s", "0.5"],
        extra_placement_args=["--eplb-algorithm", "deepseek"], log_dir=str(log_dir), startup_timeout_s=600.0)
    with LocalDeployment(config) as deployment:
        address = f"127.0.0.1:{deployment.gateway_port}"
        with grpc.insecure_channel(f"127.0.0.1:{deployment.placement_port}") as channel:
            admin = placement_pb2_grpc.PlacementAdminStub(channel)
            serve(address, args, f"warm-up {mode}", 8)
            changed = rebalance(admin)
            workers = {w.worker_id: w for w in admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers}
            placement = expert_map_from_proto(admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5).map)
            snapshot = admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=10)
            measured = serve(address, args, f"measure {mode}", args.max_new_tokens)
    per = placement.num_physical_slots // placement.num_workers
    slots = [int((placement.phy2log[:, w * per:(w + 1) * per] >= 0).sum()) for w in range(placement.num_workers)]
    owners = list(placement.slot_owners)
    return {"mode": mode, **measured, "worker_ids": owners,
            "workers": [f"{w} ({workers[w].device})" for w in owners],
            "registered_capacities": [workers[w].capacity for w in owners],
            "filled_slots": slots, "slots_per_worker": per * placement.num_layers,
            "map_version": placement.version, "rebalance_moved": changed.experts_moved,
            "phy2log": placement.phy2log.tolist(), "snapshot_counts": _counts(snapshot)}


def _counts(snapshot) -> list[list[float]] | None:
    data = json.loads(snapshot.json) if getattr(snapshot, "json", "") else None
    return None if data is None else data.get("logical_count")


def evaluate(rows: list[dict], speeds: dict[str, float]) -> None:
    """Per row: the slowest worker's share of expert tokens and the balancedness under ``speeds`` (the
    relative speeds the aware runs registered, whatever capacities the row's mode registered), from the
    load placement recorded."""
    for row in rows:
        if row["snapshot_counts"] is None:
            continue
        load = torch.tensor(row["snapshot_counts"], dtype=torch.float64)              # [L, E]
        phy = torch.tensor(row["phy2log"])                                             # [L, P]
        held = phy.clamp(min=0)
        counts = torch.stack([torch.bincount(r[r >= 0], minlength=load.shape[1]) for r in phy])
        slot = torch.where(phy >= 0, load.gather(1, held) / counts.gather(1, held).clamp(min=1), 0.0)
        owner_speeds = [speeds[w] for w in row["worker_ids"]]                         # slot-owner order
        tokens = slot.view(phy.shape[0], len(owner_speeds), -1).sum((0, 2))
        slowest = min(range(len(owner_speeds)), key=owner_speeds.__getitem__)
        row["slowest_worker"] = row["workers"][slowest]
        row["slow_token_share"] = float(tokens[slowest] / tokens.sum())
        row["balancedness_at_measured_speeds"] = eplb.balancedness(phy, load, len(owner_speeds),
                                                                   torch.tensor(owner_speeds, dtype=torch.float64))


def machine(args: argparse.Namespace) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    if "cuda" in args.attention_device + args.expert_devices and torch.cuda.is_available():
        return f"{platform.node()}: {torch.cuda.get_device_name(0)} + CPU ({cpu})"
    return f"{platform.node()} (CPU only, {cpu})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="epserve-hybrid-"))
    model = make_model(args, workdir / "model")
    given = [float(c) for c in args.expert_capacities.split(",")] if args.expert_capacities else "auto"
    load_average = os.getloadavg()[0]
    rows = []
    for round_index in range(args.rounds):
        for mode, capacities in (("blind", [1.0] * len(args.expert_devices.split(","))), ("aware", given)):
            row = run_mode(args, model, mode, capacities, workdir / f"logs-{mode}-{round_index}")
            row["round"] = round_index
            rows.append(row)
            print(f"round {round_index} {mode:>5}: {row['tokens_per_s']:7.1f} tok/s  ITL median "
                  f"{row['itl_median_ms']:6.1f} ms  p99 {row['itl_p99_ms']:6.1f} ms  capacities "
                  f"{[round(c, 4) for c in row['registered_capacities']]}  filled slots {row['filled_slots']}",
                  flush=True)
    aware = [dict(zip(r["worker_ids"], r["registered_capacities"])) for r in rows if r["mode"] == "aware"]
    speeds = {w: statistics.median(c[w] for c in aware) for w in aware[0]}          # worker id → capacity
    evaluate(rows, speeds)
    summary = {mode: {key: statistics.median(r[key] for r in rows if r["mode"] == mode)
                      for key in ("tokens_per_s", "itl_median_ms", "itl_p99_ms")} for mode in ("blind", "aware")}
    ratio = summary["aware"]["tokens_per_s"] / summary["blind"]["tokens_per_s"]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(args),
            "command": shlex.join(["python", "bench/hybrid_capacity.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": _git_commit(), "load_average_at_start": load_average,
            "torch": torch.__version__, "speeds_for_evaluation": speeds, "args": vars(args)}
    result = {"meta": meta, "summary": summary, "aware_over_blind_tokens_per_s": ratio, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(to_json(result))
    out.with_suffix(".md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0


def to_json(result: dict) -> str:
    """Indented JSON with every list of numbers on one line (the maps and load counts)."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[[-0-9.e,\s]+\]", lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]",
                  text) + "\n"


def render_markdown(result: dict) -> str:
    meta, args = result["meta"], result["meta"]["args"]
    lines = [
        "# Hybrid capacity: capacity-aware vs capacity-blind placement\n",
        f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- torch {meta['torch']}, commit "
        f"{meta['git_commit']}", f"- command: `{meta['command']}`",
        f"- deployment: {args['attention_workers']} attention worker(s) on {args['attention_device']}, "
        f"expert workers on "
        f"{args['expert_devices']} with {args['expert_num_threads']} torch threads, "
        f"{args['ep_num_redundant_experts']} redundant slots, {args['dtype']}, torch (gloo) data plane, "
        f"load format {args['load_format']}",
        f"- model: {args['num_layers']} MoE layers, {args['num_experts']} experts top-{args['top_k']}, hidden "
        f"{args['hidden_size']}, expert intermediate {args['moe_intermediate_size']}, "
        + (f"router skew {args['router_skew']} (some experts hot)" if args["load_format"] != "dummy" else
           "dummy weights (random router: expert load roughly even; the router skew is not applied)"),
        f"- traffic: {args['concurrency']} concurrent greedy streams x {args['requests_per_client']} requests x "
        f"{args['max_new_tokens']} tokens (ignore_eos), after warm-up traffic and a rebalance from its load",
        f"- aware: capacities {args['expert_capacities'] or 'measured by each worker (--capacity auto, TFLOP/s)'}; "
        "blind: all 1",
        f"- 1-minute load average when it started: {meta['load_average_at_start']:.1f} (others share this "
        "machine's cores)", "",
        "| round | mode | output tok/s | ITL median (ms) | ITL p99 (ms) | registered capacities | filled slots "
        "per expert worker | slowest worker's token share | balancedness at the aware capacities |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        share = r.get("slow_token_share")
        bal = r.get("balancedness_at_measured_speeds")
        lines.append(f"| {r['round']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['itl_median_ms']:.1f} | "
                     f"{r['itl_p99_ms']:.1f} | {', '.join(f'{c:.4g}' for c in r['registered_capacities'])} | "
                     f"{', '.join(map(str, r['filled_slots']))} of {r['slots_per_worker']} each | "
                     f"{'-' if share is None else f'{share:.2f}'} | {'-' if bal is None else f'{bal:.2f}'} |")
    s = result["summary"]
    slowest = result["rows"][0].get("slowest_worker")
    lines += ["", "Capacities and slots are listed in slot-owner order (the order the workers registered, per "
              "row): " + "; ".join(f"round {r['round']} {r['mode']}: {', '.join(r['workers'])}" for r in result["rows"])
              + f". The slowest worker (by the aware runs' capacities) is {slowest}. Balancedness = "
              "ideal time / the busiest worker's time (load / capacity), under the load placement recorded during "
              "warm-up.", ""]
    if meta["args"].get("note"):
        lines += [meta["args"]["note"], ""]
    lines += [f"Median output tokens/s: aware {s['aware']['tokens_per_s']:.1f}, blind "
              f"{s['blind']['tokens_per_s']:.1f}: aware / blind = **{result['aware_over_blind_tokens_per_s']:.2f}**. "
              f"ITL median {s['aware']['itl_median_ms']:.1f} ms vs {s['blind']['itl_median_ms']:.1f} ms.", ""]
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
