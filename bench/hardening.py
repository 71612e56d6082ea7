"""Hardening benchmarks (issue 15): the full-size fuzz, and load / soak runs that record errors,
latency and every process's memory.

    .venv/bin/python bench/hardening.py fuzz --cases 10000
    .venv/bin/python bench/hardening.py load --streams 200 --duration-s 60
    .venv/bin/python bench/hardening.py load --streams 200 --duration-s 600 --name soak

Each run starts its own deployment (LocalDeployment, as `epserve up`: placement, 2 expert workers,
2 attention workers, gateway; a token on every internal RPC; a tiny model made into a temporary
directory unless --model-path), writes JSON and markdown to bench/results/hardening_<name>_cpu.*.

fuzz: tests/fuzz_requests.py's seeded cases (Generate with random and extreme fields, admin calls with
random arguments, undecodable bytes), one at a time; then checks every process is alive and greedy
outputs are unchanged. Any status outside fuzz_requests.ALLOWED is a failure.

load: N closed-loop streams on one asyncio event loop (grpc.aio: N concurrent streams from one
client process), each sending requests back to back for the duration (greedy and sampled, 16-64
new tokens); records per-request status, latency, TTFT and inter-token gaps, and every 5 s each
process's RSS (VmRSS) and CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import build_request, generate
from epserve.grpc_security import ensure_token_file
from epserve.protos import generation_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROMPTS = ["Once upon a time", "The weather today", "A list of fruits:", "In the beginning", "Tell me a story about",
           "The quick brown fox", "My favourite number is", "Here is a poem:"]


def start_deployment(args, workdir: Path) -> LocalDeployment:
    model = args.model_path
    if model is None:
        from epserve.tiny_model import make_tiny_model

        model = str(make_tiny_model(workdir / "model", seed=0))
    token = workdir / "token"
    ensure_token_file(token)
    config = DeploymentConfig(model_path=model, num_attention_workers=args.attention_workers,
                              num_expert_workers=args.expert_workers, num_redundant_experts=2, dtype=args.dtype,
                              auth_token_file=str(token), log_dir=str(workdir / "logs"),
                              max_running_requests=args.max_running_requests)
    deployment = LocalDeployment(config)
    deployment.start()
    return deployment


def greedy_outputs(address: str) -> dict[str, str]:
    return {p: generate(address, p, max_new_tokens=16, temperature=0.0, timeout_s=300).text for p in PROMPTS[:4]}


def dead(deployment: LocalDeployment) -> list[str]:
    return [c.name for c in deployment.children if c.process.poll() is not None]


# -- fuzz ------------------------------------------------------------------------------------------
def load_fuzz_module():
    """tests/fuzz_requests.py, the cases the CI test runs too (loaded by path: putting tests/ on sys.path
    would let tests/epserve join the epserve package's path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_requests", REPO / "tests" / "fuzz_requests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_requests"] = module           # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_fuzz(args, deployment: LocalDeployment, workdir: Path) -> dict:
    fuzz_requests = load_fuzz_module()
    ALLOWED, Fuzzer, Outcome = fuzz_requests.ALLOWED, fuzz_requests.Fuzzer, fuzz_requests.Outcome  # noqa: N806

    address = f"127.0.0.1:{deployment.gateway_port}"
    before = greedy_outputs(address)
    fuzzer = Fuzzer(seed=args.seed, gateway=address, placement=f"127.0.0.1:{deployment.placement_port}",
                    security=deployment.config.security, dump_root=str(workdir / "dumps"))
    outcome = Outcome()
    started = time.perf_counter()
    done = 0
    while done < args.cases:
        batch = min(500, args.cases - done)
        fuzzer.run(batch, outcome)
        done += batch
        print(f"{done} cases, {time.perf_counter() - started:.0f} s: {dict(outcome.counts)}", flush=True)
    fuzzer.close()
    after = greedy_outputs(address)
    return {"cases": done, "seconds": time.perf_counter() - started, "counts": dict(outcome.counts),
            "unexpected": outcome.unexpected, "allowed": sorted(ALLOWED), "processes_dead": dead(deployment),
            "outputs_unchanged": before == after,
            "passed": not outcome.unexpected and not dead(deployment) and before == after}


# -- load ------------------------------------------------------------------------------------------
async def one_stream(stub, rng: random.Random, stop_at: float, records: list[dict]) -> None:
    while time.perf_counter() < stop_at:
        sampling = dict(temperature=0.0) if rng.random() < 0.5 else dict(temperature=0.8, top_p=0.95,
                                                                         seed=rng.randrange(1 << 30))
        request = build_request(rng.choice(PROMPTS), max_new_tokens=rng.choice((16, 32, 64)), ignore_eos=True,
                                **sampling)
        started = time.perf_counter()
        stamps: list[float] = []
        code = "OK"
        try:
            async for response in stub.Generate(request, timeout=300):
                if response.token_ids:
                    stamps.append(time.perf_counter())
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        records.append({"code": code, "start": started, "latency_s": time.perf_counter() - started,
                        "ttft_s": (stamps[0] - started) if stamps else None, "tokens": len(stamps),
                        "itl_s": [b - a for a, b in zip(stamps, stamps[1:])]})


def process_sample(deployment: LocalDeployment) -> dict[str, dict]:
    out = {}
    for child in deployment.children:
        pid = child.process.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            out[child.name] = {"alive": False}
            continue
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        out[child.name] = {"alive": True, "rss_mb": rss_kb / 1024,
                           "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    return out


async def run_load_async(args, deployment: LocalDeployment) -> dict:
    address = f"127.0.0.1:{deployment.gateway_port}"
    records: list[dict] = []
    samples: list[dict] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        started = time.perf_counter()
        stop_at = started + args.duration_s
        tasks = [asyncio.create_task(one_stream(stub, random.Random(i), stop_at, records))
                 for i in range(args.streams)]
        while not all(t.done() for t in tasks):
            samples.append({"t_s": time.perf_counter() - started, "processes": process_sample(deployment)})
            await asyncio.wait(tasks, timeout=5.0)
        wall = time.perf_counter() - started
    samples.append({"t_s": wall, "processes": process_sample(deployment)})
    return summarize(records, samples, wall)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def summarize(records: list[dict], samples: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["code"] == "OK"]
    errors: dict[str, int] = {}
    for r in records:
        if r["code"] != "OK":
            errors[r["code"]] = errors.get(r["code"], 0) + 1
    itl = [x for r in ok for x in r["itl_s"]]
    memory = {}
    for name in samples[0]["processes"]:
        rss = [s["processes"][name]["rss_mb"] for s in samples if s["processes"].get(name, {}).get("alive")]
        cpu = [s["processes"][name]["cpu_s"] for s in samples if s["processes"].get(name, {}).get("alive")]
        memory[name] = {"rss_mb_start": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
                        "rss_mb_end": rss[-1] if rss else None,
                        "cpu_s_used": (cpu[-1] - cpu[0]) if len(cpu) > 1 else None}
    ms = lambda v: None if v is None else round(1e3 * v, 1)  # noqa: E731
    return {"requests": len(records), "ok": len(ok), "errors": errors, "wall_s": wall,
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_ms": {"p50": ms(percentile([r["latency_s"] for r in ok], 0.5)),
                           "p99": ms(percentile([r["latency_s"] for r in ok], 0.99))},
            "ttft_ms": {"p50": ms(percentile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 0.5)),
                        "p99": ms(percentile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 0.99))},
            "itl_ms": {"p50": ms(percentile(itl, 0.5)), "p99": ms(percentile(itl, 0.99))},
            "processes": memory, "memory_samples": samples}


# -- output ----------------------------------------------------------------------------------------
def write_results(args, name: str, result: dict, load_average: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node() or 'vm'} {platform.machine()} (CPU, {os.cpu_count()} cores)",
            "command": "python bench/hardening.py " + " ".join(sys.argv[1:]),
            "load_average_at_start": load_average,
            "deployment": {"attention_workers": args.attention_workers, "expert_workers": args.expert_workers,
                           "dtype": args.dtype, "max_running_requests": args.max_running_requests}}
    stem = RESULTS / f"hardening_{name}_cpu"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "result": result}, indent=1) + "\n")
    lines = [f"# Hardening: {name} (CPU)", "", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`", f"- deployment: {meta['deployment']}",
             f"- 1-minute load average at start: {load_average:.1f} (other work shares the cores)", ""]
    if args.mode == "fuzz":
        lines += [f"- cases: {result['cases']} in {result['seconds']:.0f} s", f"- statuses: {result['counts']}",
                  f"- outside the allowed set: {result['unexpected'] or 'none'}",
                  f"- processes dead afterwards: {result['processes_dead'] or 'none'}",
                  f"- greedy outputs unchanged: {result['outputs_unchanged']}",
                  f"- **{'passed' if result['passed'] else 'FAILED'}**"]
    else:
        lines += [f"- streams: {args.streams}, duration: {args.duration_s:.0f} s (wall {result['wall_s']:.0f} s)",
                  f"- requests: {result['requests']}, OK: {result['ok']}, errors: {result['errors'] or 'none'}",
                  f"- output tokens/s: {result['output_tokens_per_s']:.1f}", "",
                  "| | p50 (ms) | p99 (ms) |", "|---|---|---|",
                  f"| request latency | {result['latency_ms']['p50']} | {result['latency_ms']['p99']} |",
                  f"| time to first token | {result['ttft_ms']['p50']} | {result['ttft_ms']['p99']} |",
                  f"| inter-token latency | {result['itl_ms']['p50']} | {result['itl_ms']['p99']} |", "",
                  "| process | RSS start (MB) | RSS max (MB) | RSS end (MB) | CPU used (s) |", "|---|---|---|---|---|"]
        for proc, m in result["processes"].items():
            lines.append(f"| {proc} | {m['rss_mb_start']:.0f} | {m['rss_mb_max']:.0f} | {m['rss_mb_end']:.0f} | "
                         f"{m['cpu_s_used']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["fuzz", "load"])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--attention-workers", type=int, default=2)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--dtype", default="float64", help="float64 (default): greedy outputs compare exactly")
    parser.add_argument("--max-running-requests", type=int, default=128)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--name", default="", help="results name (default: fuzz, or load_<streams>x<duration>s)")
    args = parser.parse_args()
    name = args.name or ("fuzz" if args.mode == "fuzz" else f"load_{args.streams}x{args.duration_s:.0f}s")
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        deployment = start_deployment(args, Path(directory))
        try:
            result = run_fuzz(args, deployment, Path(directory)) if args.mode == "fuzz" \
                else asyncio.run(run_load_async(args, deployment))
        finally:
            deployment.stop()
    write_results(args, name, result, load_average)
    return 0 if args.mode == "load" or result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
