"""Decode-size dense projections: which cuBLAS call reads the weights fastest (issue 12, batch 1).

Run on the GPU machine: ``PYTHONPATH=. python3 bench/gpu/dense_gemv.py --out dense_gemv.json``

At batch 1 the output projection ([2048, 4096], 16.8 MB) runs as a split-K GEMM plus a reduce
kernel (H100 profile: 8.3 + 1.8 µs, 0.58 of copy bandwidth). Variants of y [M, N] = x [M, K] @ W.T
for W [N, K], per shape and M: ``linear`` (F.linear, what the engine calls), ``w_x`` ((W @ x.T).T:
cuBLAS sees a tall GEMM, N rows by M columns), ``mv`` (torch.mv, M = 1 only). Each is timed inside a
CUDA graph that walks 48 different weight copies (as the 48 layers do, so nothing is served from
L2), median over repeats, µs per call and the fraction of the copy bandwidth it reaches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_gpu import copy_bandwidth  # noqa: E402

SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096)}
LAYERS = 48


def variants(m: int):
    out = {"linear": lambda x, w: F.linear(x, w), "w_x": lambda x, w: (w @ x.T).T}
    if m == 1:
        out["mv"] = lambda x, w: torch.mv(w, x[0])[None]
    return out


def time_call(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    for w in weights[:2]:
        fn(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0]).float()
            for variant, fn in variants(m).items():
                err = (fn(x, weights[0]).float() - ref).abs().max().item()
                us = time_call(fn, x, weights)
                frac = n * k * 2 / bandwidth / (us * 1e-6)
                rows.append({"shape": name, "tokens": m, "variant": variant, "us": us, "bw_frac": frac,
                             "max_abs_diff": err})
                print(f"{name:7s} M={m:3d} {variant:7s} {us:7.2f} us  {frac:.2f} of copy BW  (max diff {err:.3g})",
                      flush=True)
        del weights
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                   "copy_bandwidth": bandwidth, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
