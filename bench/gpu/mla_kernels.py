"""Benchmark the MLA kernels (kernels/mla_attention.py) on one GPU at DeepSeek-V3's attention shape,
against the copy bandwidth measured in the same run; and time the tile configs beside the default.

Legend: B sequences, L context per sequence, T prompt tokens, H=128 heads, C=512 kv_lora_rank,
Dr=64, W = C + Dr = 576 cached values per token, Bs=16 tokens per block, bf16, S decode splits.

Run from the repository root (epserve need not be installed):
    python3 bench/gpu/mla_kernels.py --out /tmp/mla.json

Accounting:
- decode: bytes = every context token's cached row once (B·L·W·2) + q (B·H·W·2) + out (B·H·C·2);
  the fraction is of the device-to-device copy bandwidth (bytes read + written by ``copy_``, 2 GiB,
  best of three). Each sequence's blocks are a random permutation of the pool. A CUDA graph holds R
  calls on disjoint blocks (R·bytes >= 128 MiB, so the rows come from HBM, not the 50 MB L2),
  replayed; time = median replay / R. S = ``mla_decode_num_splits`` for a graph serving contexts up
  to GRAPH_MAX_CONTEXT (or L, if longer), as the engine captures it.
- prefill: flops = 2·H·(W + C)·(causal query-key pairs) (the absorbed form's score and value dots);
  one graph per call.
- every timed config is first checked against the float32 torch reference (rel. err. < 1e-2); one
  that fails is reported, not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epserve.kernels.mla_attention import (MlaDecodeConfig, MlaPrefillConfig, mla_decode_attention,  # noqa: E402
                                           mla_decode_attention_reference, mla_decode_num_splits,
                                           mla_prefill_attention, mla_prefill_attention_reference)
from epserve.kernels.paged_attention import DecodeWorkspace, num_sms_of  # noqa: E402

H, C, DR, BS = 128, 512, 64, 16
W = C + DR
DEVICE = "cuda"
DTYPE = torch.bfloat16
SCALE = 192 ** -0.5
DECODE_SHAPES = [(1, 2048), (1, 32768), (32, 2048), (128, 2048), (256, 1024)]
PREFILL_SHAPES = [(1, 4096), (8, 512)]
DECODE_CONFIGS = [MlaDecodeConfig(), MlaDecodeConfig(block_n=64), MlaDecodeConfig(num_stages=3),
                  MlaDecodeConfig(block_h=32, num_warps=8), MlaDecodeConfig(block_h=64, num_warps=8),
                  MlaDecodeConfig(block_n=64, num_stages=3)]
PREFILL_CONFIGS = [MlaPrefillConfig(), MlaPrefillConfig(block_n=64), MlaPrefillConfig(block_m=64),
                   MlaPrefillConfig(num_warps=4), MlaPrefillConfig(num_stages=3)]
GRAPH_MAX_CONTEXT = 4112
COLD_BYTES = 128 << 20
POOL_TOKENS = 1 << 20                             # 1.1 GiB of cached rows


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                      # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, per_replay: int, reps: int = 15) -> float:
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_replay)
    return statistics.median(times[3:])


def copy_tb_per_s() -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = max(best, 2 * src.numel() * 2 / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def random_tables(perm: torch.Tensor, offset: int, contexts: list[int]) -> tuple[torch.Tensor, int]:
    """[B, M] int32 block tables taken from ``perm`` (a permutation of the pool's blocks) from ``offset``."""
    width = max(-(-c // BS) for c in contexts)
    tables = torch.zeros(len(contexts), width, dtype=torch.int32)
    for b, context in enumerate(contexts):
        used = -(-context // BS)
        tables[b, :used] = perm[offset:offset + used]
        offset += used
    return tables.to(DEVICE), offset


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def time_decode(cache: torch.Tensor, batch: int, context: int, config: MlaDecodeConfig, num_sms: int,
                references: dict) -> dict:
    """``references``: the float32 reference per shape, computed once (every config gets the same data)."""
    torch.manual_seed(batch * 100003 + context)
    contexts = [context] * batch
    nbytes = batch * context * W * 2 + batch * H * (W + C) * 2
    count = max(1, min(64, COLD_BYTES // nbytes, cache.shape[0] // (batch * -(-context // BS))))
    perm = torch.randperm(cache.shape[0], dtype=torch.int32)
    offset, calls = 0, []
    splits = mla_decode_num_splits(batch, H, max(context, GRAPH_MAX_CONTEXT), num_sms, config)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    for _ in range(count):
        tables, offset = random_tables(perm, offset, contexts)
        q = torch.randn(batch, H, W, device=DEVICE, dtype=DTYPE)
        workspace = DecodeWorkspace.allocate(batch, H, splits, C, DEVICE) if splits > 1 else None
        calls.append((q, tables, q.new_empty(batch, H, C), workspace))
    q, tables, out, workspace = calls[0]
    mla_decode_attention(q, cache, tables, lens, SCALE, splits, C, out=out, workspace=workspace, config=config)
    key = ("decode", batch, context)
    if key not in references:
        references[key] = mla_decode_attention_reference(q, cache, tables, lens, SCALE, C, torch.float32)
    err = rel_err(out, references[key])
    if err >= 1e-2:
        return {"error": err}

    def run():
        for q, tables, out, workspace in calls:
            mla_decode_attention(q, cache, tables, lens, SCALE, splits, C, out=out, workspace=workspace,
                                 config=config)
    us = replay_us(capture(run), count)
    return {"us": us, "splits": splits, "bytes": nbytes, "rel_err": err}


def time_prefill(cache: torch.Tensor, num_seqs: int, tokens: int, config: MlaPrefillConfig,
                 references: dict) -> dict:
    torch.manual_seed(num_seqs * 100003 + tokens)
    contexts = [tokens] * num_seqs
    tables, _ = random_tables(torch.randperm(cache.shape[0], dtype=torch.int32), 0, contexts)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=DEVICE) * tokens
    q = torch.randn(num_seqs * tokens, H, W, device=DEVICE, dtype=DTYPE)
    out = q.new_empty(num_seqs * tokens, H, C)

    def run():
        mla_prefill_attention(q, cache, tables, starts, lens, tokens, SCALE, C, out=out, config=config)
    run()
    key = ("prefill", num_seqs, tokens)
    if key not in references:     # [H, T, T] float32 scores per sequence: 8.6 GB at T = 4096
        references[key] = mla_prefill_attention_reference(q, cache, tables, starts, lens, SCALE, C, torch.float32)
    err = rel_err(out, references[key])
    if err >= 1e-2:
        return {"error": err}
    us = replay_us(capture(run), 1, reps=5)
    flops = 2 * H * (W + C) * num_seqs * tokens * (tokens + 1) // 2
    return {"us": us, "tflops": flops / us / 1e6, "rel_err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--default-only", action="store_true", help="time the default configs only")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(DEVICE)
    num_sms = num_sms_of(device)
    bandwidth = copy_tb_per_s()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.2f} TB/s, {num_sms} SMs", flush=True)
    cache = torch.randn(POOL_TOKENS // BS, BS, W, device=DEVICE, dtype=DTYPE)
    decode_configs = DECODE_CONFIGS[:1] if args.default_only else DECODE_CONFIGS
    prefill_configs = PREFILL_CONFIGS[:1] if args.default_only else PREFILL_CONFIGS
    references: dict = {}
    result = {"device": torch.cuda.get_device_name(), "copy_tb_per_s": bandwidth, "decode": [], "prefill": []}
    for batch, context in DECODE_SHAPES:
        for config in decode_configs:
            row = {"batch": batch, "context": context, "config": repr(config),
                   **time_decode(cache, batch, context, config, num_sms, references)}
            if "us" in row:
                row["frac_of_copy_bw"] = row["bytes"] / (row["us"] * 1e-6) / (bandwidth * 1e12)
                print(f"decode B={batch:4d} L={context:6d} S={row['splits']:3d} {row['us']:9.1f} us "
                      f"{row['frac_of_copy_bw']:.2f} of copy BW  {config}", flush=True)
            else:
                print(f"decode B={batch} L={context} {config}: rel. err. {row['error']:.2e}, not timed", flush=True)
            result["decode"].append(row)
    for num_seqs, tokens in PREFILL_SHAPES:
        for config in prefill_configs:
            row = {"sequences": num_seqs, "tokens": tokens, "config": repr(config),
                   **time_prefill(cache, num_seqs, tokens, config, references)}
            if "us" in row:
                print(f"prefill {num_seqs}x{tokens}: {row['us']:9.1f} us {row['tflops']:6.1f} TFLOP/s  {config}",
                      flush=True)
            else:
                print(f"prefill {num_seqs}x{tokens} {config}: rel. err. {row['error']:.2e}, not timed", flush=True)
            result["prefill"].append(row)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
