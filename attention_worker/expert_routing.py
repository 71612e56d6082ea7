"""Logical → physical expert choice for each token (``--ep-dispatch-algorithm``).

Legend: T tokens, K top-k, E logical experts, L MoE layers, R replicas of an expert.

- ``static``: attention rank r always uses replica ``r % R`` of each expert, so different
  attention workers spread over the replicas and each one's traffic pattern is stable.
- ``dynamic``: each (token, choice) picks a replica at random, spreading one worker's load
  over all replicas (deterministic per step through a seeded generator).
- ``fake``: ignores the router and sends tokens to uniformly random logical experts — for
  benchmarks of the data plane only; outputs are then meaningless.

Every replica holds identical weights, so ``static`` and ``dynamic`` never change outputs.

On a GPU the choice runs on the device: ``prepare(map)`` (host, at a step boundary) copies the
map's ``log2phy``/``logcnt`` into persistent device buffers in place, so CUDA graphs captured
once keep routing with whatever map is current; ``dynamic`` then draws from the device's
default generator.
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
    def __init__(self, algorithm: DispatchAlgorithm, rank: int, seed: int = 0, map_is_fixed: bool = False) -> None:
        """``map_is_fixed``: the map never changes (colocated mode), so an identity map may be
        routed with no work at all — captured graphs keep whatever routing they recorded."""
        self.algorithm = algorithm
        self.map_is_fixed = map_is_fixed
        self.rank = rank
        self.generator = torch.Generator().manual_seed(seed + rank)
        self._device_version: int | None = None
        self._device_log2phy: torch.Tensor | None = None     # [L, E, Rcap] on the device, -1 padded
        self._device_logcnt: torch.Tensor | None = None      # [L, E]
        self._device_static: torch.Tensor | None = None      # [L, E] static: this rank's replica per expert
        self._identity = False                               # slot p holds expert p: physical = logical

    def prepare(self, expert_map: ExpertMap, device: torch.device) -> None:
        """Mirror ``expert_map`` on ``device`` (no-op on the CPU or when already current). The
        buffers are allocated once, for the most replicas the slot count allows, and updated in
        place: a graph that captured them routes with the new map on its next replay."""
        if device.type == "cpu" or self._device_version == expert_map.version:
            return
        num_layers, num_experts, replicas = expert_map.log2phy.shape
        self._identity = (self.map_is_fixed and self.algorithm is not DispatchAlgorithm.FAKE
                          and expert_map.num_physical_slots == num_experts
                          and bool((expert_map.phy2log == torch.arange(num_experts)).all()))
        capacity = expert_map.num_physical_slots - num_experts + 1
        if self._device_log2phy is None or self._device_log2phy.shape[:2] != (num_layers, num_experts) \
                or self._device_log2phy.shape[2] < replicas:
            self._device_log2phy = torch.full((num_layers, num_experts, max(capacity, replicas)), -1,
                                              dtype=torch.int64, device=device)
            self._device_logcnt = torch.ones(num_layers, num_experts, dtype=torch.int64, device=device)
            self._device_static = torch.empty(num_layers, num_experts, dtype=torch.int64, device=device)
        self._device_log2phy.fill_(-1)
        self._device_log2phy[:, :, :replicas].copy_(expert_map.log2phy)
        self._device_logcnt.copy_(expert_map.logcnt)
        replica = torch.full_like(expert_map.logcnt, self.rank) % expert_map.logcnt           # [L, E]
        self._device_static.copy_(expert_map.log2phy.gather(2, replica.unsqueeze(2)).squeeze(2))
        self._device_version = expert_map.version

    def to_physical(self, expert_map: ExpertMap, moe_layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] logical → [T, K] physical slot ids (on topk_ids' device)."""
        if topk_ids.device.type != "cpu":
            return self._to_physical_on_device(expert_map, moe_layer, topk_ids)
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

    def _to_physical_on_device(self, expert_map: ExpertMap, moe_layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """No host sync: capturable in a CUDA graph. Needs ``prepare(expert_map)`` first."""
        assert self._device_version == expert_map.version, (
            f"ExpertRouter.prepare(map version {expert_map.version}) must run before routing on the device")
        if self._identity:
            return topk_ids
        if self.algorithm is DispatchAlgorithm.STATIC:
            return self._device_static[moe_layer][topk_ids.long()]                 # one gather
        topk_ids = topk_ids.long()
        if self.algorithm is DispatchAlgorithm.FAKE:
            topk_ids = torch.randint(0, expert_map.num_logical_experts, topk_ids.shape, device=topk_ids.device)
        counts = self._device_logcnt[moe_layer][topk_ids]                         # [T, K]
        replica = torch.remainder(torch.randint(0, 1 << 30, topk_ids.shape, device=topk_ids.device), counts)
        return self._device_log2phy[moe_layer][topk_ids, replica]
