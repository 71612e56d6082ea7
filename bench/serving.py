"""Serving benchmark: time to first token and throughput at 1/8/32 concurrent streams.

Starts a real deployment (``epserve up``'s LocalDeployment: placement, expert workers, attention
workers, gateway as separate processes), runs closed-loop clients through the public gRPC API,
prints a table and writes JSON + markdown to bench/results/.

    .venv/bin/python bench/serving.py --model-path DIR [--concurrency 1 8 32] [--requests-per-client 4]

Without --model-path, a tiny model is made into a temporary directory. Quote medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import stream_generate


def one_request(address: str, prompt: str, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    stamps = []
    tokens = 0
    for response in stream_generate(address, prompt, max_new_tokens=max_new_tokens, temperature=0.0,
                                     ignore_eos=True, timeout_s=600):
        now = time.perf_counter()
        if response.token_ids:
            if first is None:
                first = now
            stamps.append(now)
            tokens += len(response.token_ids)
    end = time.perf_counter()
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": tokens, "itl_s": itl}


def run_level(address: str, concurrency: int, requests_per_client: int, max_new_tokens: int) -> dict:
    prompts = [f"client {c} request {r}: tell me about the number {c * 100 + r}"
               for c in range(concurrency) for r in range(requests_per_client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(address, p, max_new_tokens), prompts))
    wall = time.perf_counter() - start
    itl = sorted(x for r in results for x in r["itl_s"])
    return {
        "concurrency": concurrency, "requests": len(results),
        "ttft_median_ms": 1e3 * statistics.median(r["ttft_s"] for r in results),
        "itl_median_ms": 1e3 * statistics.median(itl) if itl else 0.0,
        "itl_p99_ms": 1e3 * itl[int(0.99 * (len(itl) - 1))] if itl else 0.0,
        "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--attention-workers", type=int, default=2)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--ep-num-redundant-experts", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/serving_cpu")
    args = parser.parse_args()
    model_path = args.model_path
    if model_path is None:
        from epserve.tiny_model import default_model_dir

        model_path = str(default_model_dir(tempfile.mkdtemp()))
    config = DeploymentConfig(model_path=model_path, num_attention_workers=args.attention_workers,
                              num_expert_workers=args.expert_workers,
                              num_redundant_experts=args.ep_num_redundant_experts, dtype=args.dtype,
                              log_dir=tempfile.mkdtemp(prefix="epserve-bench-logs-"))
    rows = []
    with LocalDeployment(config) as deployment:
        address = f"127.0.0.1:{deployment.gateway_port}"
        one_request(address, "warm up", 4)
        for level in args.concurrency:
            rows.append(run_level(address, level, args.requests_per_client, args.max_new_tokens))
            r = rows[-1]
            print(f"concurrency {r['concurrency']:>3}  TTFT median {r['ttft_median_ms']:8.1f} ms  "
                  f"ITL median {r['itl_median_ms']:7.1f} ms  p99 {r['itl_p99_ms']:7.1f} ms  "
                  f"{r['output_tokens_per_s']:8.1f} tok/s", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} (CPU, {__import__('os').cpu_count()} cores)",
            "command": "python bench/serving.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if v is not None and k != "out"),
            "load_average_at_start": __import__("os").getloadavg()[0],
            "model": model_path, "deployment": {"attention_workers": args.attention_workers,
                                                "expert_workers": args.expert_workers, "dtype": args.dtype}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Serving benchmark (CPU)\n", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`", f"- deployment: {meta['deployment']}",
             f"- 1-minute load average when it started: {meta['load_average_at_start']:.1f} (other work shares "
             "the 2 cores; figures are a floor, not a ceiling)", "",
             "| concurrency | requests | TTFT median (ms) | ITL median (ms) | ITL p99 (ms) | output tok/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['ttft_median_ms']:.1f} | {r['itl_median_ms']:.1f} | "
              f"{r['itl_p99_ms']:.1f} | {r['output_tokens_per_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
