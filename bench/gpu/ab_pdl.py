"""A/B on the GPU, in one process: the aligned MoE pipeline launched with and without
programmatic dependent launch (kernels/pdl.py).

Each variant is a CUDA graph of R routing instances (as bench/moe_kernels.py times them);
the variants are replayed in turn, round after round, and the median per variant is printed
in µs per instance. Run from the repo root on the GPU machine:

    PYTHONPATH=. python3 bench/gpu/ab_pdl.py [--models ...] [--tokens ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_kernels as mk  # noqa: E402

from epserve.moe_runner import make_moe_runner  # noqa: E402
from epserve.kernels import pdl  # noqa: E402


def capture(fn, use_pdl: bool) -> torch.cuda.CUDAGraph:
    with contextlib.nullcontext() if use_pdl else pdl.disabled():
        return mk.capture_graph(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(mk.SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=mk.TOKENS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    runner = make_moe_runner("triton", "cuda")
    print(f"{'model':16s} {'T':>6s} {'PDL':>9s} {'plain':>9s}  (µs per instance, median of rounds)")
    for model in args.models:
        shape = mk.SHAPES[model]
        w13, w2 = mk.make_weights(shape)
        for num_tokens in args.tokens:
            insts = mk.make_instances(shape, num_tokens, mk.num_instances(num_tokens))

            def run():
                for i in insts:
                    runner.run(i.hidden, i.slot_ids, i.weights, w13, w2)
            graphs = {"PDL": capture(run, True), "plain": capture(run, False)}
            med = mk.interleaved_medians(graphs, len(insts), args.rounds, args.reps)
            print(f"{model:16s} {num_tokens:6d} {med['PDL']:9.1f} {med['plain']:9.1f}", flush=True)
            del graphs, insts
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
