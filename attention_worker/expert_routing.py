"""Logical → physical expert choice for each token (``--ep-dispatch-algorithm``).

Legend: T tokens, K top-k, E logical experts, L MoE layers, R replicas of an expert.

- ``static``: attention rank r always uses replica ``r % R`` of each expert, so different
  attention workers spread over the replicas and each one's traffic pattern is stable.
- ``dynamic``: each (token, choice) picks a replica at random, spreading one worker's load
  over all replicas (deterministic per step through a seeded generator).
- ``fake``: ignores the router and sends tokens to uniformly random logical experts — for
  benchmarks of the data plane only; outputs are then meaningless.

Every replica holds identical weights, so ``static`` and ``dynamic`` never change outputs.
"""

from __future__ import annotations

import enum

import torch

from epserve.expert_map import ExpertMap


class DispatchAlgorithm(enum.Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    FAKE = "fake"


class ExpertRouter:
    def __init__(self, algorithm: DispatchAlgorithm, rank: int, seed: int = 0) -> None:
        self.algorithm = algorithm
        self.rank = rank
        self.generator = torch.Generator().manual_seed(seed + rank)

    def to_physical(self, expert_map: ExpertMap, moe_layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] logical → [T, K] physical slot ids."""
        if self.algorithm is DispatchAlgorithm.FAKE:
            topk_ids = torch.randint(0, expert_map.num_logical_experts, topk_ids.shape,
                                     generator=self.generator)
        counts = expert_map.logcnt[moe_layer][topk_ids]                            # [T, K]
        if self.algorithm is DispatchAlgorithm.STATIC:
            replica = torch.full_like(topk_ids, self.rank) % counts
        else:
            draw = torch.randint(0, 1 << 30, topk_ids.shape, generator=self.generator)
            replica = draw % counts
        return expert_map.log2phy[moe_layer][topk_ids, replica]
