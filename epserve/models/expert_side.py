"""Expert side: SwiGLU routed experts held per physical slot, for every MoE layer.

Legend: L MoE layers, S slots held here, D hidden, I MoE intermediate size, n tokens, K top-k.

``ExpertSlots`` holds ``w13 [S, 2I, D]`` and ``w2 [S, D, I]`` per MoE layer for the slots this
process owns, as listed by ``slot_experts [L, S]`` (logical expert per local slot, -1 empty).
``load_expert_slots`` reads only those experts' tensors from the checkpoint. Slots holding the
same expert share nothing special: each is a copy, as on a real redundant replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.model_config import ModelSpec
from epserve.moe_runner import MoERunner
from epserve.weights import CheckpointReader


@dataclass
class ExpertSlots:
    slot_experts: torch.Tensor       # [L, S] logical expert per local slot, -1 = empty
    w13: list[torch.Tensor]          # L × [S, 2I, D]
    w2: list[torch.Tensor]           # L × [S, D, I]

    @property
    def num_slots(self) -> int:
        return int(self.slot_experts.shape[1])

    def compute(self, runner: MoERunner, moe_layer: int, hidden: torch.Tensor,
                local_slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [n, D], local_slot_ids [n, K] in [-1, S), weights [n, K] → [n, D]."""
        return runner.run(hidden, local_slot_ids, weights, self.w13[moe_layer], self.w2[moe_layer])


def load_expert_slots(spec: ModelSpec, reader: CheckpointReader, slot_experts: torch.Tensor,
                      dtype: torch.dtype, device: torch.device | str = "cpu") -> ExpertSlots:
    """slot_experts [L, S]: read each distinct expert of each layer once, fill its slots."""
    num_layers, num_slots = slot_experts.shape
    if num_layers != spec.num_moe_layers:
        raise ValueError(f"slot_experts has {num_layers} layers, the model has {spec.num_moe_layers} MoE layers")
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    w13, w2 = [], []
    for moe_layer, decoder_layer in enumerate(spec.moe_layers):
        row = slot_experts[moe_layer].tolist()
        if all(e < 0 for e in row):            # nothing to hold in this layer (caller shares it)
            w13.append(torch.empty(0, 2 * inter, hidden, dtype=dtype, device=device))
            w2.append(torch.empty(0, hidden, inter, dtype=dtype, device=device))
            continue
        experts = reader.read_experts(decoder_layer, [e for e in row if e >= 0], dtype, device,
                                      desc=f"loading experts of layer {decoder_layer}")
        layer_w13 = torch.empty(num_slots, 2 * inter, hidden, dtype=dtype, device=device)
        layer_w2 = torch.empty(num_slots, hidden, inter, dtype=dtype, device=device)
        for slot, expert in enumerate(row):
            if expert >= 0:
                layer_w13[slot], layer_w2[slot] = experts[expert]
            else:                              # an empty slot is never routed to; keep it zero
                layer_w13[slot].zero_()
                layer_w2[slot].zero_()
        w13.append(layer_w13)
        w2.append(layer_w2)
    return ExpertSlots(slot_experts.clone(), w13, w2)
