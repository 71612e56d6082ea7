"""A/B on the GPU, in one process: the aligned MoE pipeline with and without programmatic
dependent launch (PDL), and with and without the alignment's split tile table.

Each variant is a CUDA graph of R routing instances (as bench/moe_kernels.py times them);
the variants are replayed in turn, round after round, and the median per variant is printed
in µs per instance. Run from the repo root on the GPU machine:

    PYTHONPATH=. python3 bench/gpu/ab_pdl.py [--models ...] [--tokens ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_kernels as mk  # noqa: E402

from kernels import pdl  # noqa: E402
from kernels.fused_moe import experts_aligned  # noqa: E402
from kernels.moe_align import align_by_slot  # noqa: E402
from kernels.moe_configs import AlignedConfig, get_config  # noqa: E402

VARIANTS = {"pdl+table": (True, True), "pdl": (True, False), "table": (False, True), "neither": (False, False)}


def capture(fn, use_pdl: bool) -> torch.cuda.CUDAGraph:
    ctx = pdl.disabled() if not use_pdl else torch.no_grad()
    with ctx:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(mk.SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(f"{'model':16s} {'T':>6s} " + " ".join(f"{v:>10s}" for v in VARIANTS) + "   (us per instance, median)")
    for model in args.models:
        shape = mk.SHAPES[model]
        w13, w2 = mk.make_weights(shape)
        for num_tokens in args.tokens:
            config = get_config(num_tokens, shape.top_k, shape.num_slots, shape.dim, shape.inter,
                                torch.cuda.get_device_name())
            if not isinstance(config, AlignedConfig):
                continue
            insts = mk.make_instances(shape, num_tokens, mk.num_instances(num_tokens))
            graphs = {}
            for name, (use_pdl, tiles) in VARIANTS.items():
                def run(tiles=tiles):
                    for i in insts:
                        al = align_by_slot(i.slot_ids, shape.num_slots, config.align_block_m, tiles=tiles)
                        experts_aligned(i.hidden, i.slot_ids, i.weights, w13, w2, al, config)
                graphs[name] = capture(run, use_pdl)
            times = {name: [] for name in VARIANTS}
            for _ in range(args.rounds):
                for name, graph in graphs.items():
                    graph.replay()
                    torch.cuda.synchronize()
                    times[name].append(mk._median_ms(graph.replay, args.reps) * 1e3 / len(insts))
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{model:16s} {num_tokens:6d} " + " ".join(f"{med[v]:10.1f}" for v in VARIANTS), flush=True)
            del graphs, insts
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
