"""``--capacity auto``: measure this worker's expert throughput once at start-up.

Legend: T tokens, K top-k, S slots, D hidden, I MoE intermediate size.

Placement weighs expert load by worker capacity (a relative speed: a worker's time is its tokens
divided by its capacity), so a CPU expert worker beside GPU ones gets fewer and colder experts.
``measure_capacity`` times this worker's own MoE runner on its own device and dtype: a batch of
``MEASURE_TOKENS`` tokens, each choosing K of ``S`` random experts of the model's shape
(``w13 [S, 2I, D]``, ``w2 [S, D, I]``), the fastest of at least ``MEASURE_REPEATS`` runs and
``MEASURE_MIN_S`` seconds after a warm-up (expert workers started together measure at the same
time on shared CPU cores; the fastest run is the one least disturbed by the others). The
figure it reports is the achieved expert GEMM rate in TFLOP/s (``6·D·I`` flops per token and
choice: gate_up and down), i.e. capacity 1.0 = 10^12 expert flops per second. Only ratios between
workers matter to placement, so measured figures of different workers compare directly; given
capacities (``--capacity 0.1``) should be in the same unit when mixed with measured ones.
"""

from __future__ import annotations

import logging
import time

import torch

from epserve.model_config import ModelSpec
from epserve.moe_runner import MoERunner

logger = logging.getLogger(__name__)

MEASURE_TOKENS = 64
MEASURE_SLOTS = 8
MEASURE_REPEATS = 5
MEASURE_MIN_S = 0.5
TFLOP = 1e12


def measure_capacity(spec: ModelSpec, runner: MoERunner, dtype: torch.dtype, device: torch.device | str,
                     num_tokens: int = MEASURE_TOKENS, repeats: int = MEASURE_REPEATS,
                     min_s: float = MEASURE_MIN_S) -> float:
    """This worker's expert GEMM rate in TFLOP/s (> 0), from timing ``runner`` (module docstring)."""
    device = torch.device(device)
    d, i = spec.hidden_size, spec.moe_intermediate_size
    k = min(spec.num_experts_per_tok, MEASURE_SLOTS)
    generator = torch.Generator().manual_seed(0)
    w13 = (torch.randn(MEASURE_SLOTS, 2 * i, d, generator=generator) * d ** -0.5).to(device, dtype)   # [S, 2I, D]
    w2 = (torch.randn(MEASURE_SLOTS, d, i, generator=generator) * i ** -0.5).to(device, dtype)        # [S, D, I]
    hidden = torch.randn(num_tokens, d, generator=generator).to(device, dtype)                        # [T, D]
    slot_ids = torch.stack([torch.randperm(MEASURE_SLOTS, generator=generator)[:k]
                            for _ in range(num_tokens)]).to(device)                                    # [T, K]
    weights = torch.full((num_tokens, k), 1.0 / k, dtype=dtype).to(device)                           # [T, K]
    runner.run(hidden, slot_ids, weights, w13, w2)      # warm-up: allocations, kernel compiles
    _sync(device)
    best, runs, began = float("inf"), 0, time.perf_counter()
    while runs < repeats or time.perf_counter() - began < min_s:
        started = time.perf_counter()
        runner.run(hidden, slot_ids, weights, w13, w2)
        _sync(device)
        best, runs = min(best, time.perf_counter() - started), runs + 1
    flops = 6.0 * d * i * num_tokens * k
    capacity = flops / max(best, 1e-9) / TFLOP
    logger.info("measured capacity %.4g (TFLOP/s of expert GEMMs: %d tokens x top-%d, D=%d, I=%d, %s on %s, "
                "best of %d: %.3f ms)", capacity, num_tokens, k, d, i, runner.name, device, runs, best * 1e3)
    return capacity


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
