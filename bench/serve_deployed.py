"""Decode throughput of a whole deployment, measured through the gateway: colocated against split.

    PYTHONPATH=. python3 bench/serve_deployed.py --out-dir bench/results [--modes local cuda_ipc cuda_ipc_no_mps]

Each mode starts ``epserve up`` (dummy Qwen3-30B-A3B-shaped weights, bf16, one GPU) and streams
``batch`` concurrent greedy requests of ``--prompt-len`` random token ids through the gateway's
Generate API, ``--new-tokens`` each (ignore_eos). Modes:

- ``local``: one attention worker holding every expert (colocated; the GPU engine, CUDA graphs);
- ``cuda_ipc``: one attention process + one expert process on the same GPU, the step path on device
  flags, both processes under the user-space MPS daemon ``epserve up --mps on`` starts;
- ``cuda_ipc_no_mps``: the same with ``--mps off`` (the GPU time-slices between the two contexts);
- ``torch``: the torch data plane (NCCL between CUDA devices): with ``--up-args --attention-device cuda:0
  --expert-devices cuda:1`` attention and experts on two GPUs (bench/gpu/run_multi_gpu.sh).

Step time per batch: for every stream, (arrival of its last token − arrival of token ``--skip``) /
(tokens in between), the median over streams — every stream is decoding in the same steps as the
others there, so this is the decode step time of that batch as a user sees it. The driver itself
never creates a CUDA context; ``--bandwidth-from serve_gpu.json`` reads the copy bandwidth measured by ``bench/serve_gpu.py``
for the roofline column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from epserve.gateway.client import stream_generate  # noqa: E402
from epserve_up import epserve_up  # noqa: E402

MODES = {"local": ["--moe-a2a-backend", "local", "--expert-workers", "0"],
         "cuda_ipc": ["--moe-a2a-backend", "cuda_ipc", "--expert-workers", "1", "--mps", "on"],
         "cuda_ipc_no_mps": ["--moe-a2a-backend", "cuda_ipc", "--expert-workers", "1", "--mps", "off"],
         "torch": ["--moe-a2a-backend", "torch", "--expert-workers", "1"]}


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def stream_times(gateway: str, prompt: list[int], new_tokens: int, timeout_s: float) -> list[float]:
    """Arrival time of every generated token of one greedy request (a response can carry several)."""
    arrivals: list[float] = []
    for response in stream_generate(gateway, token_ids=prompt, max_new_tokens=new_tokens, temperature=0.0,
                                    ignore_eos=True, timeout_s=timeout_s):
        now = time.perf_counter()
        arrivals += [now] * len(response.token_ids)
    return arrivals


def measure_batch(gateway: str, batch: int, prompt_len: int, new_tokens: int, skip: int, vocab: int,
                  timeout_s: float) -> dict:
    prompts = random_prompts(batch, prompt_len, vocab, seed=batch)
    results: list[list[float] | BaseException] = [[] for _ in range(batch)]

    def one(i: int) -> None:
        try:
            results[i] = stream_times(gateway, prompts[i], new_tokens, timeout_s)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(batch)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5)
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {batch} streams failed; first: {errors[0]!r}")
    steps = []
    for arrivals in results:
        if len(arrivals) != new_tokens:
            raise RuntimeError(f"a stream returned {len(arrivals)} tokens, asked for {new_tokens}")
        steps.append((arrivals[-1] - arrivals[skip]) / (new_tokens - 1 - skip))
    step = statistics.median(steps)
    ttft = statistics.median(arrivals[0] - start for arrivals in results)
    return {"batch": batch, "step_ms": step * 1e3, "tok_per_s": batch / step, "wall_s": wall,
            "median_first_token_ms": ttft * 1e3}


def run_mode(mode: str, model_dir: Path, args, log, rows: list[dict]) -> None:
    """Appends a row per batch to ``rows`` (kept if the deployment fails to stop cleanly)."""
    max_bs = max(args.batches)
    blocks = max_bs * -(-(args.prompt_len + args.new_tokens) // 16) + 64
    load = ["--load-format", "dummy"] if args.model_path is None else []
    up_args = ["--model-path", str(model_dir), *load, "--device", args.device, "--dtype", args.dtype,
               "--attention-workers", "1", "--cuda-graph-max-bs", str(max_bs), "--max-running-requests", str(max_bs),
               "--num-kv-blocks", str(blocks), "--max-num-batched-tokens", "8192", *MODES[mode], *args.up_args]
    start = time.perf_counter()
    with epserve_up(up_args, args.log_dir / mode, start_timeout_s=args.start_timeout_s) as endpoints:
        log(f"{mode}: deployment up in {time.perf_counter() - start:.1f} s")
        gateway = endpoints["gateway"]
        measure_batch(gateway, 1, 16, 8, 2, args.vocab, args.timeout_s)            # warm-up
        for batch in args.batches:
            new_tokens = args.new_tokens if mode != "cuda_ipc_no_mps" else min(args.new_tokens, 24)
            row = {"mode": mode, **measure_batch(gateway, batch, args.prompt_len, new_tokens, args.skip, args.vocab,
                                                 args.timeout_s)}
            rows.append(row)
            log(f"{mode} B={batch}: {row['step_ms']:.2f} ms/step, {row['tok_per_s']:.0f} tok/s "
                f"(first token {row['median_first_token_ms']:.0f} ms)")


def with_tokenizer(model_dir: Path) -> Path:
    """The gateway needs a tokenizer.json; requests here send token ids, so the tiny model's byte-level
    tokenizer does (ids it does not know decode to nothing)."""
    import shutil
    import tempfile

    from epserve.tiny_model import make_tiny_model

    tiny = make_tiny_model(Path(tempfile.mkdtemp(prefix="serve_deployed_tok_")) / "model", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, model_dir / name)
    return model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="serve_deployed_gpu")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a real checkpoint instead of the dummy Qwen3-30B-A3B shape (CPU smoke runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip", type=int, default=8, help="tokens of each stream not timed (ramp-up)")
    parser.add_argument("--modes", nargs="+", default=["local", "cuda_ipc", "cuda_ipc_no_mps"], choices=list(MODES))
    parser.add_argument("--up-args", nargs=argparse.REMAINDER, default=[], help="more `epserve up` flags (last)")
    parser.add_argument("--bandwidth-from", type=Path, default=None, help="serve_gpu.py's JSON (roofline column)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/serve_deployed_logs"))
    parser.add_argument("--start-timeout-s", type=float, default=240.0)
    parser.add_argument("--timeout-s", type=float, default=180.0, help="deadline of each Generate stream")
    args = parser.parse_args()
    from epserve.model_config import load_model_spec
    from serve_gpu import write_model_dir                  # (bench/ is on sys.path) no CUDA context here

    model_dir = args.model_path or with_tokenizer(write_model_dir("qwen3-30b-a3b", args.layers))
    spec = load_model_spec(model_dir)
    args.vocab = spec.vocab_size
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip().splitlines()
    except FileNotFoundError:
        device = [platform.processor() or "CPU"]
    log(f"{device[0] if device else 'GPU'}; model {args.model_path or f'dummy, {args.layers} layers'}; "
        f"modes {' '.join(args.modes)}")
    rows, notes = [], {}
    for mode in args.modes:
        notes[mode] = "epserve up --mps " + ("on (its own user-space daemon)" if mode == "cuda_ipc" else "auto/off: none")
        try:
            run_mode(mode, model_dir, args, log, rows)
        except (RuntimeError, AssertionError) as e:
            log(f"{mode}: FAILED {str(e)[:1500]}")
            notes[mode] = f"failed: {str(e)[:1500]}"
    colocated = {r["batch"]: r for r in rows if r["mode"] == "local"}
    for row in rows:
        if row["batch"] in colocated:
            row["vs_local"] = row["tok_per_s"] / colocated[row["batch"]]["tok_per_s"]
    if args.bandwidth_from and args.bandwidth_from.exists():
        engine = json.loads(args.bandwidth_from.read_text())
        roofline = {r["batch"]: r["roofline_ms"] for r in engine["rows"] if r["mode"] == "colocated"}
        for row in rows:
            if row["batch"] in roofline:
                row["roofline_ms"] = roofline[row["batch"]]
                row["roofline_frac"] = roofline[row["batch"]] / row["step_ms"]
    record = {"machine": f"{device[0] if device else '?'} ({platform.node()})",
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "model": f"Qwen3-30B-A3B shape, {args.layers} layers, bf16, dummy weights", "notes": notes,
              "rows": rows, "log": lines}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    table = ["| mode | batch | ms/step | tok/s | × local | fraction of roofline |", "|---|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['mode']} | {row['batch']} | {row['step_ms']:.2f} | {row['tok_per_s']:.0f} | "
                     f"{row.get('vs_local', float('nan')):.2f} | {row.get('roofline_frac', float('nan')):.2f} |")
    print("\n".join(table))
    (args.out_dir / f"{args.name}.table.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
