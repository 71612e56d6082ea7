"""The attention projections at decode sizes: ``kernels/dense_gemv.py`` against cuBLAS (F.linear).

    PYTHONPATH=. python3 bench/gpu/dense_gemv_ab.py

Qwen3-30B-A3B's qkv (2048 → 5120) and o_proj (4096 → 2048) at 1–8 tokens, bf16. Each timed pass
runs 48 projections back to back (one per layer, rotating over 48 weight copies so nothing is
served from L2) inside a CUDA graph, as a decode step runs them; median of 20 passes, µs per
projection and the weight-read bandwidth it reaches.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from epserve.kernels.dense_gemv import dense_gemv  # noqa: E402

SHAPES = {"qkv_proj": (5120, 2048), "o_proj": (2048, 4096)}
LAYERS = 48


def time_pass(fn, xs, ws) -> float:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for x, w in zip(xs, ws):            # warm-up / compile outside the capture
            fn(x, w)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for x, w in zip(xs, ws):
                fn(x, w)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return statistics.median(times[5:])


def main() -> None:
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        for m in (1, 2, 4, 8):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
            cublas = time_pass(F.linear, xs, ws)
            gemv = time_pass(dense_gemv, xs, ws)
            err = max(((dense_gemv(x, w).float() - F.linear(x, w).float()).norm()
                       / F.linear(x, w).float().norm()).item() for x, w in zip(xs[:4], ws[:4]))
            nbytes = n * k * 2
            rows.append({"proj": name, "tokens": m, "cublas_us": cublas, "gemv_us": gemv,
                         "cublas_TBps": nbytes / cublas / 1e6, "gemv_TBps": nbytes / gemv / 1e6, "rel_err": err})
            print(f"{name:9s} M={m}: cuBLAS {cublas:6.2f} µs ({nbytes / cublas / 1e6:.2f} TB/s)  "
                  f"gemv {gemv:6.2f} µs ({nbytes / gemv / 1e6:.2f} TB/s)  rel err {err:.1e}", flush=True)
        del ws
    print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
