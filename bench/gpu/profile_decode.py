"""Where a decode step's time goes: host work, GPU time of the graph replay, and GPU time per kernel.

Run from the repository root on the GPU machine (epserve need not be installed):
    python3 bench/gpu/profile_decode.py [--layers 48] [--batches 1 32 128] [--out FILE]

Qwen3-30B-A3B's shape with dummy weights (bench/serve_gpu.py's model). For each batch size B, the
engine is brought to a decode state (B sequences, prompt 128 each), then:
- ``wall``: median ``Engine.step`` (scheduler, host metadata, graph replay, sampling, token copy);
- ``replay``: median GPU time of the graph replay alone (CUDA events around ``DecodeGraphs.replay``);
- per-kernel GPU time of 5 steps under ``torch.profiler`` (kernels inside graphs are recorded),
  grouped by kernel name: calls per step and µs per call; ``busy`` is their sum per step, so
  ``replay - busy`` is what the GPU spends between kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_gpu import prompts, write_model_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from epserve.attention_worker.colocated import build_colocated_engine
    from epserve.attention_worker.engine import EngineLimits
    from epserve.attention_worker.sampler import SamplingParams

    max_bs = max(args.batches)
    limits = EngineLimits(num_kv_blocks=max_bs * 16 + 64, kv_block_size=16, max_num_batched_tokens=8192,
                          max_num_seqs=max_bs, num_micro_batches=1, cuda_graph_max_bs=max_bs)
    model_dir = write_model_dir("qwen3-30b-a3b", args.layers)
    engine = build_colocated_engine(str(model_dir), torch.bfloat16, "cuda", "auto", limits,
                                    max_context=4096, load_format="dummy")
    spec, graphs = engine.model.spec, engine.runner.graphs
    results = {}
    for batch in args.batches:
        params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
        for i, ids in enumerate(prompts(batch, 128, spec.vocab_size, seed=batch)):
            engine.add_request(f"p{batch}-{i}", ids, params)
        engine.step()
        while engine.scheduler.waiting or any(s.num_generated == 0 for s in engine.scheduler.running):
            engine.step()
        replay = graphs.replay
        gpu_ms: list[float] = []

        def timed_replay(chunks):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = replay(chunks)
            end.record()
            end.synchronize()
            gpu_ms.append(start.elapsed_time(end))
            return out

        graphs.replay = timed_replay
        wall = []
        for _ in range(12):
            t0 = time.perf_counter()
            engine.step()
            wall.append((time.perf_counter() - t0) * 1e3)
        graphs.replay = replay
        steps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = defaultdict(list)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
                kernels[event.name[:90]].append(event.device_time)
        busy = sum(sum(v) for v in kernels.values()) / steps / 1e3
        top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:18]
        rows = [{"kernel": name, "calls_per_step": len(t) / steps, "us_per_call": statistics.median(t),
                 "ms_per_step": sum(t) / steps / 1e3} for name, t in top]
        results[batch] = {"wall_ms": statistics.median(wall[2:]), "replay_ms": statistics.median(gpu_ms[2:]),
                          "busy_ms": busy, "kernels": rows}
        print(f"\nB={batch}: step {results[batch]['wall_ms']:.3f} ms wall, graph replay {results[batch]['replay_ms']:.3f} "
              f"ms GPU, kernels busy {busy:.3f} ms")
        print(f"{'kernel':92s} {'calls':>6s} {'us/call':>8s} {'ms/step':>8s}")
        for row in rows:
            print(f"{row['kernel']:92s} {row['calls_per_step']:6.0f} {row['us_per_call']:8.2f} {row['ms_per_step']:8.3f}")
        while engine.has_work:
            engine.step()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
