"""Where DeepSeek-V3's shared expert should run: on the attention side, or as an always-routed expert.

Legend: T tokens in a step, D hidden, Is shared-expert width (moe_intermediate_size x n_shared_experts),
E routed experts, K top-k, W expert workers, G expert groups (topk_group of them kept).

Measured on this machine (CPU, float32, one thread) at DeepSeek-V3's per-layer shape (D=7168,
I=2048, one shared expert):
1. compute: the attention side's dense SwiGLU over T rows, and the same rows through the expert
   side's torch MoE runner as one more slot that every token hits (``TorchMoERunner``, the CPU
   expert path), for T in 1, 16, 64, 256 (median of --repeat runs);
2. traffic: DeepSeek-V3 routing (E=256, K=8, G=8, topk_group=4; random logits) over W expert
   workers holding E/W experts each: expert workers a token is sent to (messages of D values),
   routed experts only vs. with the shared expert as a (K+1)-th choice (a) on one worker, (b)
   replicated on every worker with a random replica per token (epserve's ``dynamic`` dispatch),
   (c) replicated and sent to a worker the token already visits; and the load of the shared
   expert's worker relative to the mean worker in case (a);
3. memory: shared-expert parameters per MoE layer and for the 58 MoE layers.

Run: .venv/bin/python bench/shared_experts.py --md-out bench/results/shared_experts_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epserve.moe_runner.torch_runner import TorchMoERunner  # noqa: E402

D, I, E, K, G, TOPK_GROUP, MOE_LAYERS = 7168, 2048, 256, 8, 8, 4, 58


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compute_rows(repeat: int) -> list[tuple[int, float, float]]:
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(I, D, generator=gen) * D**-0.5 for _ in range(2))
    down = torch.randn(D, I, generator=gen) * I**-0.5
    w13, w2 = torch.cat([gate, up])[None], down[None]              # one slot: [1, 2I, D], [1, D, I]
    runner = TorchMoERunner()
    rows = []
    for tokens in (1, 16, 64, 256):
        x = torch.randn(tokens, D, generator=gen)
        dense = median_ms(lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down), repeat)
        slots, weights = torch.zeros(tokens, 1, dtype=torch.int64), torch.ones(tokens, 1)
        routed = median_ms(lambda: runner.run(x, slots, weights, w13, w2), repeat)
        rows.append((tokens, dense, routed))
    return rows


def route(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """DeepSeek-V3's grouped top-k on random logits (no bias): ids [T, K]."""
    scores = torch.randn(num_tokens, E, generator=gen).sigmoid()
    group_scores = scores.view(num_tokens, G, -1).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(TOPK_GROUP, dim=-1)[1], 1)
    keep = keep.repeat_interleave(E // G, dim=1).bool()
    return scores.masked_fill(~keep, 0.0).topk(K, dim=-1)[1]


def traffic_rows(num_tokens: int = 4096) -> list[tuple[int, float, float, float, float, float]]:
    gen = torch.Generator().manual_seed(1)
    ids = route(num_tokens, gen)
    rows = []
    for workers in (8, 32, 64):
        owner = ids // (E // workers)                                           # [T, K] worker of each choice
        visited = torch.zeros(num_tokens, workers, dtype=torch.bool).scatter_(1, owner, True)   # [T, W]
        routed = visited.sum(1).double().mean().item()
        one_worker = visited.clone()
        one_worker[:, 0] = True                                                 # (a) the shared expert on worker 0
        random_replica = visited.clone()
        random_replica[torch.arange(num_tokens), torch.randint(workers, (num_tokens,), generator=gen)] = True
        # (a) load: worker 0 computes K-routed rows plus every token's shared row
        routed_load = torch.bincount(owner.flatten(), minlength=workers).double()
        hot = (routed_load[0] + num_tokens) / ((routed_load.sum() + num_tokens) / workers)
        rows.append((workers, routed, one_worker.sum(1).double().mean().item(),
                     random_replica.sum(1).double().mean().item(), routed, hot.item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--md-out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["# Shared expert: attention side vs always-routed expert (CPU)", "",
             f"torch {torch.__version__}, float32, 1 thread; D={D}, Is={I}; median of {args.repeat} runs.", "",
             "## Compute per MoE layer", "", "| T | attention side: dense SwiGLU (ms) | expert side: one more slot "
             "hit by every token, torch runner (ms) |", "|---|---|---|"]
    for tokens, dense, routed in compute_rows(args.repeat):
        lines.append(f"| {tokens} | {dense:.2f} | {routed:.2f} |")
    lines += ["", "## Expert workers a token is sent to (E=256, K=8, G=8, topk_group=4, 4096 tokens)", "",
              "| W | routed only | + shared on one worker | + shared replicated, random replica | "
              "+ shared replicated, a worker already visited | load of the shared expert's worker / mean (one "
              "worker) |", "|---|---|---|---|---|---|"]
    for workers, routed, one, random_replica, visited, hot in traffic_rows():
        lines.append(f"| {workers} | {routed:.2f} | {one:.2f} | {random_replica:.2f} | {visited:.2f} | {hot:.1f} |")
    params = 3 * D * I
    lines += ["", "## Memory", "", f"Shared expert: {params / 1e6:.1f} M parameters per MoE layer, "
              f"{params * MOE_LAYERS / 1e9:.2f} B for {MOE_LAYERS} MoE layers ({params * MOE_LAYERS * 2 / 2**30:.1f} "
              "GiB in bf16), held by every attention worker (attention side) or by every expert worker "
              "(replicated always-routed expert)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md_out:
        Path(args.md_out).write_text(text)


if __name__ == "__main__":
    main()
