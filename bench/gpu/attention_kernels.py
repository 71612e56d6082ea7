"""Benchmark the paged attention kernels (kernels/paged_attention.py, kernels/paged_prefill.py) on
one GPU at Qwen3-30B-A3B's attention shape, against the copy bandwidth measured in the same run.

Legend: B sequences, C context per sequence, T prompt tokens, H=32 query heads, Hkv=4 KV heads,
Dh=128, Bs=16 tokens per block, bf16, S decode splits.

Run from the repository root (epserve need not be installed):
    python3 bench/gpu/attention_kernels.py --out /tmp/attention.json [--check] [--sweep]

Accounting:
- decode: bytes = K and V of every context token (B·C·Hkv·Dh·2·2) + q + out; the fraction is of
  the device-to-device copy bandwidth (bytes read + written by ``copy_``, 2 GiB, best of three).
  Each sequence's blocks are a random permutation of the pool (a real cache is not contiguous).
  A CUDA graph holds R calls on disjoint blocks (R·bytes >= 128 MiB, so K/V come from HBM, not
  the 50 MB L2), replayed; time = median replay / R, i.e. per call inside a graph, launch gaps
  included. The headline time is what the engine runs: S = ``decode_num_splits`` for a graph
  serving contexts up to GRAPH_MAX_CONTEXT (or C, if longer), each row splitting itself by its
  context (``tokens_per_split`` for B). ``by_splits``: every row forced to S splits
  (tokens_per_split = 1), S in SPLITS with >= 64 keys a split, to see the best S per shape.
- prefill: flops = 4·H·Dh·(causal query-key pairs); one graph per call. SDPA (torch's own
  backend choice, causal, K/V expanded to H heads, contiguous [B, H, T, Dh]) on the same data.
- ``--check``: the kernels against the float32 torch references first (bf16, rel. err. < 1e-2);
  exit status 1 if any fails (the timings are still written).
- ``--sweep``: also time each config of DECODE_SWEEP (at the engine's S) and PREFILL_SWEEP, each
  first checked against the default config's output on the same data (rel. err. < 1e-2, else
  not timed), and print the best per shape; ~60-90 s more, mostly compiling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epserve.kernels.paged_attention import (DECODE_SWEEP, DecodeConfig, DecodeWorkspace,  # noqa: E402
                                             decode_num_splits, paged_decode_attention,
                                             paged_decode_attention_reference)
from epserve.kernels.paged_prefill import (PREFILL_SWEEP, PrefillConfig, paged_prefill_attention,  # noqa: E402
                                           paged_prefill_attention_reference)

H, HKV, DH, BS = 32, 4, 128, 16
DEVICE = "cuda"
DTYPE = torch.bfloat16
SCALE = DH ** -0.5
DECODE_SHAPES = [(b, c) for b in (1, 32, 128, 256) for c in (256, 2048)] + [(1, 32768)]
PREFILL_SHAPES = [(1, 4096), (8, 512)]            # (sequences, prompt tokens each)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
COLD_BYTES = 128 << 20                            # per graph replay: well past the L2
MAX_INSTANCES = 256
CHECK_TOKENS = 16384                              # the pool holds at least --check's contexts
GRAPH_MAX_CONTEXT = 4112                          # the engine's graphs in the measured setup serve up to this
SWEEP_REL_ERR = 1e-2                              # a swept config's output against the default config's


def capture(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn()'s launches (fn runs twice on a side stream first: compile, warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, per_replay: int, reps: int = 15) -> float:
    """Median µs of one replay, divided by the calls it holds."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times) / per_replay


def copy_tb_per_s() -> float:
    n = 1 << 30                                                          # 2 GiB of bf16
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        dst.copy_(src)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 5)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (best * 1e-3) / 1e12


class Pool:
    """One K and one V pool [N, Bs, Hkv, Dh]; hands out disjoint random blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.k = torch.randn(num_blocks, BS, HKV, DH, device=DEVICE, dtype=DTYPE)
        self.v = torch.randn(num_blocks, BS, HKV, DH, device=DEVICE, dtype=DTYPE)
        self.order = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)
        self.next = 0

    def reset(self) -> None:
        self.next = 0

    def tables(self, contexts: list[int]) -> torch.Tensor:
        """[B, M] int32: each sequence's blocks, fresh ones (disjoint until reset), -1 past them."""
        width = max(triton.cdiv(c, BS) for c in contexts)
        tables = torch.full((len(contexts), width), -1, dtype=torch.int32, device=DEVICE)
        for b, c in enumerate(contexts):
            used = triton.cdiv(c, BS)
            assert self.next + used <= self.order.numel(), "pool too small"
            tables[b, :used] = self.order[self.next:self.next + used]
            self.next += used
        return tables


def decode_bytes(batch: int, context: int) -> int:
    return batch * context * HKV * DH * 2 * 2 + 2 * batch * H * DH * 2


def instances_for(num_bytes: int) -> int:
    return max(1, min(MAX_INSTANCES, triton.cdiv(COLD_BYTES, num_bytes)))


def time_decode(pool: Pool, batch: int, context: int, num_splits: int, config: DecodeConfig,
                tokens_per_split: int | None = None) -> tuple[float, torch.Tensor]:
    """µs per call, and the first call's output (for comparing configs on the same data)."""
    pool.reset()
    torch.manual_seed(batch * 100003 + context)
    reps = instances_for(decode_bytes(batch, context))
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    calls = []
    for _ in range(reps):
        q = torch.randn(batch, H, DH, device=DEVICE, dtype=DTYPE)
        calls.append((q, pool.tables([context] * batch), torch.empty_like(q)))
    workspace = DecodeWorkspace.allocate(batch, H, num_splits, DH, DEVICE) if num_splits > 1 else None

    def run():
        for q, tables, out in calls:
            paged_decode_attention(q, pool.k, pool.v, tables, lens, SCALE, num_splits, out=out, workspace=workspace,
                                   config=config, tokens_per_split=tokens_per_split)
    graph = capture(run)
    us = replay_us(graph, reps)
    del graph
    return us, calls[0][2]


def engine_splits(batch: int, context: int, num_sms: int, config: DecodeConfig = DecodeConfig()) -> int:
    """S of the engine's graph for B rows that serves this context."""
    return decode_num_splits(batch, HKV, max(context, GRAPH_MAX_CONTEXT), num_sms, config)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def causal_pairs(num_seqs: int, tokens: int) -> int:
    return num_seqs * tokens * (tokens + 1) // 2


def prefill_inputs(pool: Pool, num_seqs: int, tokens: int):
    pool.reset()
    q = torch.randn(num_seqs * tokens, H, DH, device=DEVICE, dtype=DTYPE)
    tables = pool.tables([tokens] * num_seqs)
    starts = torch.arange(0, num_seqs + 1, device=DEVICE, dtype=torch.int32) * tokens
    lens = torch.full((num_seqs,), tokens, dtype=torch.int32, device=DEVICE)
    return q, tables, starts, lens


def time_prefill(pool: Pool, num_seqs: int, tokens: int, config: PrefillConfig) -> tuple[float, torch.Tensor]:
    """µs per call, and the output."""
    torch.manual_seed(num_seqs * 100003 + tokens)
    q, tables, starts, lens = prefill_inputs(pool, num_seqs, tokens)
    out = torch.empty_like(q)
    graph = capture(lambda: paged_prefill_attention(q, pool.k, pool.v, tables, starts, lens, tokens, SCALE, out=out,
                                                    config=config))
    return replay_us(graph, 1), out


def time_sdpa(num_seqs: int, tokens: int) -> float:
    q, k, v = (torch.randn(num_seqs, H, tokens, DH, device=DEVICE, dtype=DTYPE) for _ in range(3))
    graph = capture(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE))
    return replay_us(graph, 1)


def check(pool: Pool, num_sms: int) -> dict:
    """Kernels against the float32 references: rel. errors, and whether all are < 1e-2."""
    pool.reset()
    contexts = [1, 17, 300, 4096, 0, 2049, 16, 1000]
    q = torch.randn(len(contexts), H, DH, device=DEVICE, dtype=DTYPE)
    tables = pool.tables(contexts)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_reference(q, pool.k, pool.v, tables, lens, SCALE, torch.float32)
    errors = {}
    engine = decode_num_splits(len(contexts), HKV, 4096, num_sms)
    # (S, tokens_per_split): S = 1; every row 7 ways; the engine's S with rows split by context
    for num_splits, per_split in sorted({(1, None), (7, 1), (engine, None)}, key=str):
        out = paged_decode_attention(q, pool.k, pool.v, tables, lens, SCALE, num_splits, tokens_per_split=per_split)
        name = f"decode_S{num_splits}" + ("_forced" if per_split == 1 else "")
        errors[name] = rel_err(out, ref)
        errors[f"{name}_padding_row_max"] = out[4].abs().max().item()
    q_lens, contexts = [1000, 1, 300, 0, 37, 1], [2500, 3000, 300, 12, 37, 1]
    q = torch.randn(sum(q_lens), H, DH, device=DEVICE, dtype=DTYPE)
    tables = pool.tables(contexts)
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    ref = paged_prefill_attention_reference(q, pool.k, pool.v, tables, starts, lens, SCALE, torch.float32)
    errors["prefill_mixed"] = rel_err(paged_prefill_attention(q, pool.k, pool.v, tables, starts, lens, max(q_lens),
                                                              SCALE), ref)
    ok = all(v < 1e-2 if not k.endswith("_max") else v == 0.0 for k, v in errors.items())
    for key, value in errors.items():
        print(f"check {key:32s} {value:.2e}", flush=True)
    print(f"check {'PASS' if ok else 'FAIL'}", flush=True)
    return {"ok": ok, "errors": errors}


def decode_config_name(config: DecodeConfig) -> str:
    """The fields that differ from the default, e.g. ``block_n=32,num_stages=4`` (``default``)."""
    default = DecodeConfig()
    changed = [f"{k}={v}" for k, v in vars(config).items() if v != getattr(default, k)]
    return ",".join(changed) or "default"


def prefill_config_name(config: PrefillConfig) -> str:
    return f"{config.block_m}x{config.block_n}x{config.num_warps}w{config.num_stages}s"


def sweep_decode(pool: Pool, batch: int, context: int, num_sms: int, default_out: torch.Tensor) -> dict:
    """µs per config of DECODE_SWEEP at its own engine S (None: wrong output, not timed)."""
    times = {}
    for config in DECODE_SWEEP:
        us, out = time_decode(pool, batch, context, engine_splits(batch, context, num_sms, config), config)
        ok = rel_err(out, default_out) < SWEEP_REL_ERR
        times[decode_config_name(config)] = us if ok else None
        if not ok:
            print(f"  sweep decode {decode_config_name(config)}: WRONG output at B={batch} C={context}", flush=True)
    return times


def sweep_prefill(pool: Pool, num_seqs: int, tokens: int, default_out: torch.Tensor) -> dict:
    times = {}
    for config in PREFILL_SWEEP:
        us, out = time_prefill(pool, num_seqs, tokens, config)
        ok = rel_err(out, default_out) < SWEEP_REL_ERR
        times[prefill_config_name(config)] = us if ok else None
        if not ok:
            print(f"  sweep prefill {prefill_config_name(config)}: WRONG output at {num_seqs}x{tokens}", flush=True)
    return times


def best_of(times: dict) -> tuple[str, float]:
    timed = {k: v for k, v in times.items() if v is not None}
    key = min(timed, key=timed.get)
    return key, timed[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="compare with the torch references first")
    parser.add_argument("--sweep", action="store_true", help="also time DECODE_SWEEP and PREFILL_SWEEP")
    args = parser.parse_args()
    begin = time.time()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    copy_bw = copy_tb_per_s()
    max_tokens = max(instances_for(decode_bytes(b, c)) * b * c for b, c in DECODE_SHAPES)
    pool = Pool(triton.cdiv(max(max_tokens, CHECK_TOKENS), BS))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": props.name,
              "num_sms": num_sms, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "shape": {"H": H, "Hkv": HKV, "Dh": DH, "Bs": BS, "dtype": "bf16"},
              "copy_tb_per_s": copy_bw, "graph_max_context": GRAPH_MAX_CONTEXT, "decode": [], "prefill": []}
    if args.check:
        result["check"] = check(pool, num_sms)

    for batch, context in DECODE_SHAPES:
        chosen = engine_splits(batch, context, num_sms)
        adaptive, default_out = time_decode(pool, batch, context, chosen, DecodeConfig())
        by_splits = {s: time_decode(pool, batch, context, s, DecodeConfig(), tokens_per_split=1)[0]
                     for s in SPLITS if s == 1 or context // s >= 64}
        num_bytes = decode_bytes(batch, context)
        best = min(by_splits, key=by_splits.get)
        row = {"batch": batch, "context": context, "num_splits": chosen, "time_us": adaptive,
               "bytes": num_bytes, "instances": instances_for(num_bytes),
               "frac_of_copy_bw": num_bytes / (adaptive * 1e-6) / 1e12 / copy_bw,
               "by_splits": by_splits, "best_splits": best, "adaptive_over_best": adaptive / by_splits[best]}
        if args.sweep:
            row["by_config"] = sweep_decode(pool, batch, context, num_sms, default_out)
        result["decode"].append(row)
        print(f"decode B={batch:3d} C={context:5d} S={chosen:3d} {adaptive:8.1f} us "
              f"{row['frac_of_copy_bw']:.2f} of copy BW  (every row S ways: best S={best} {by_splits[best]:.1f} us, "
              f"S=1 {by_splits[1]:.1f} us)", flush=True)

    for num_seqs, tokens in PREFILL_SHAPES:
        flops = 4 * H * DH * causal_pairs(num_seqs, tokens)
        us, default_out = time_prefill(pool, num_seqs, tokens, PrefillConfig())
        sdpa = time_sdpa(num_seqs, tokens)
        row = {"sequences": num_seqs, "tokens": tokens, "time_us": us, "flops": flops,
               "tflops": flops / (us * 1e-6) / 1e12, "sdpa_time_us": sdpa, "sdpa_tflops": flops / (sdpa * 1e-6) / 1e12}
        if args.sweep:
            row["by_config"] = sweep_prefill(pool, num_seqs, tokens, default_out)
        result["prefill"].append(row)
        print(f"prefill {num_seqs}x{tokens} {us:8.1f} us {row['tflops']:6.1f} TFLOP/s (SDPA {sdpa:.1f} us)", flush=True)

    result["wall_s"] = time.time() - begin
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_summary(result, props.name, args.sweep)
    if args.check and not result["check"]["ok"]:
        sys.exit(1)


def print_summary(result: dict, device: str, sweep: bool) -> None:
    print(f"\n{device}, copy {result['copy_tb_per_s']:.2f} TB/s, {result['wall_s']:.0f} s; decode at the engine's S "
          f"(graphs up to C={GRAPH_MAX_CONTEXT}), rows split by context")
    print(f"{'decode':>14s} {'S':>4s} {'us':>9s} {'MB':>9s} {'TB/s':>6s} {'of copy':>8s} {'best S':>7s} {'us':>9s} "
          f"{'S=1 us':>8s}")
    for r in result["decode"]:
        best = r["best_splits"]
        print(f"{'B=%d C=%d' % (r['batch'], r['context']):>14s} {r['num_splits']:4d} {r['time_us']:9.1f} "
              f"{r['bytes'] / 1e6:9.1f} {r['bytes'] / r['time_us'] / 1e6:6.2f} {r['frac_of_copy_bw']:8.2f} "
              f"{best:7d} {r['by_splits'][best]:9.1f} {r['by_splits'][1]:8.1f}")
    print(f"{'prefill':>14s} {'us':>9s} {'TFLOP/s':>8s} {'SDPA us':>9s} {'TFLOP/s':>8s} {'SDPA/ours':>9s}")
    for r in result["prefill"]:
        print(f"{'%dx%d' % (r['sequences'], r['tokens']):>14s} {r['time_us']:9.1f} {r['tflops']:8.1f} "
              f"{r['sdpa_time_us']:9.1f} {r['sdpa_tflops']:8.1f} {r['sdpa_time_us'] / r['time_us']:9.2f}")
    if not sweep:
        return
    print("\nsweep: the best config per shape (default: its time; 'WRONG': output differed, not timed)")
    for r in result["decode"]:
        name, us = best_of({"default": r["time_us"], **r["by_config"]})
        wrong = [k for k, v in r["by_config"].items() if v is None]
        print(f"{'B=%d C=%d' % (r['batch'], r['context']):>14s} default {r['time_us']:8.1f} us  best {name} {us:.1f} us"
              + (f"  WRONG: {', '.join(wrong)}" if wrong else ""))
    for r in result["prefill"]:
        name, us = best_of({prefill_config_name(PrefillConfig()): r["time_us"], **r["by_config"]})
        wrong = [k for k, v in r["by_config"].items() if v is None]
        print(f"{'%dx%d' % (r['sequences'], r['tokens']):>14s} default {r['time_us']:8.1f} us  best {name} {us:.1f} us "
              f"({r['flops'] / (us * 1e-6) / 1e12:.0f} TFLOP/s)" + (f"  WRONG: {', '.join(wrong)}" if wrong else ""))
    names = [decode_config_name(c) for c in DECODE_SWEEP]
    print("decode µs by config: " + " | ".join(["shape", "default"] + names))
    for r in result["decode"]:
        cells = [f"{r['time_us']:.1f}"] + [("WRONG" if r["by_config"][n] is None else f"{r['by_config'][n]:.1f}")
                                            for n in names]
        print(f"  B={r['batch']} C={r['context']}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
