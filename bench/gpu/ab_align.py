"""A/B on the GPU, in one process: the alignment's counting atomics with the per-slot counters
packed (stride 1) or spread over cache lines (``kernels.moe_align.COUNTER_STRIDE``), alone and
inside the whole MoE pipeline. Variants are CUDA graphs of R routing instances, replayed in
turn round after round; medians in µs per instance. From the repo root on the GPU machine:

    PYTHONPATH=. python3 bench/gpu/ab_align.py [--strides 1 8 32 64] [--tokens ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_kernels as mk  # noqa: E402

import epserve.kernels.moe_align as ma  # noqa: E402
from epserve.moe_runner import make_moe_runner  # noqa: E402
from epserve.kernels.moe_configs import get_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(mk.SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--strides", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    runner = make_moe_runner("triton", "cuda")
    for model in args.models:
        shape = mk.SHAPES[model]
        w13, w2 = mk.make_weights(shape)
        for num_tokens in args.tokens:
            config = get_config(num_tokens, shape.top_k, shape.num_slots, shape.dim, shape.inter,
                                torch.cuda.get_device_name())
            block_m = getattr(config, "align_block_m", None)
            if block_m is None:
                continue
            insts = mk.make_instances(shape, num_tokens, mk.num_instances(num_tokens))
            graphs = {}
            for stride in args.strides:
                ma.COUNTER_STRIDE = stride
                graphs[("align", stride)] = mk.capture_graph(
                    lambda: [ma.align_by_slot(i.slot_ids, shape.num_slots, block_m) for i in insts])
                graphs[("pipeline", stride)] = mk.capture_graph(
                    lambda: [runner.run(i.hidden, i.slot_ids, i.weights, w13, w2) for i in insts])
            ma.COUNTER_STRIDE = 64
            med = mk.interleaved_medians(graphs, len(insts), args.rounds, args.reps)
            for what in ("align", "pipeline"):
                print(f"{model:16s} T={num_tokens:6d} {what:8s} " +
                      "  ".join(f"stride {s}: {med[(what, s)]:7.1f}" for s in args.strides), flush=True)
            del graphs, insts
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
