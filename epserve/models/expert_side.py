"""Expert side: SwiGLU routed experts held per physical slot, for every MoE layer.

Legend: L MoE layers, S slots held here, D hidden, I MoE intermediate size, n tokens, K top-k.

``ExpertSlots`` holds ``w13 [S, 2I, D]`` and ``w2 [S, D, I]`` per MoE layer for the slots this
process owns, as listed by ``slot_experts [L, S]`` (logical expert per local slot, -1 empty).
``load_expert_slots`` reads only those experts' tensors from the checkpoint, and copies experts
it already holds (in another version's slots) instead of reading them again. Slots holding the
same expert share nothing special: each is a copy, as on a real redundant replica.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
                      dtype: torch.dtype, device: torch.device | str = "cpu",
                      held: Sequence[ExpertSlots] = (),
                      after_each: Callable[[], None] | None = None) -> ExpertSlots:
    """slot_experts [L, S] → the slots' weights. An expert already resident in one of ``held``
    (same layer, any slot) is copied from there; only the others are read from the checkpoint,
    each once per layer, straight into its first slot. A layer whose row is all -1 gets empty
    tensors (the caller shares that layer with a held version). ``after_each`` runs after each
    expert is in place (the expert worker paces live loading with it)."""
    num_layers, num_slots = slot_experts.shape
    if num_layers != spec.num_moe_layers:
        raise ValueError(f"slot_experts has {num_layers} layers, the model has {spec.num_moe_layers} MoE layers")
    with reader.progress(int((slot_experts >= 0).sum()), "loading expert slots") as bar:
        def done() -> None:
            bar.update(1)
            if after_each is not None:
                after_each()
        return _load_slots(spec, reader, slot_experts, dtype, device, held, done)


def _load_slots(spec: ModelSpec, reader: CheckpointReader, slot_experts: torch.Tensor, dtype: torch.dtype,
                device: torch.device | str, held: Sequence[ExpertSlots],
                after_each: Callable[[], None]) -> ExpertSlots:
    num_slots = slot_experts.shape[1]
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    w13, w2 = [], []
    for moe_layer, decoder_layer in enumerate(spec.moe_layers):
        row = slot_experts[moe_layer].tolist()
        if all(e < 0 for e in row):
            w13.append(torch.empty(0, 2 * inter, hidden, dtype=dtype, device=device))
            w2.append(torch.empty(0, hidden, inter, dtype=dtype, device=device))
            continue
        layer_w13 = torch.empty(num_slots, 2 * inter, hidden, dtype=dtype, device=device)
        layer_w2 = torch.empty(num_slots, hidden, inter, dtype=dtype, device=device)
        resident = _resident_experts(held, moe_layer, dtype)
        first_slot: dict[int, int] = {}
        for slot, expert in enumerate(row):
            if expert < 0:                     # an empty slot is never routed to; keep it zero
                layer_w13[slot].zero_()
                layer_w2[slot].zero_()
            elif expert not in first_slot:
                first_slot[expert] = slot
                if expert in resident:
                    layer_w13[slot].copy_(resident[expert][0])
                    layer_w2[slot].copy_(resident[expert][1])
                    after_each()
        for expert, slot in first_slot.items():
            if expert not in resident:
                reader.read_experts(decoder_layer, [expert], dtype, device,
                                    out={expert: (layer_w13[slot], layer_w2[slot])}, names=spec.expert_names)
                after_each()
        for slot, expert in enumerate(row):    # further replicas on this worker
            if expert >= 0 and first_slot[expert] != slot:
                layer_w13[slot].copy_(layer_w13[first_slot[expert]])
                layer_w2[slot].copy_(layer_w2[first_slot[expert]])
                after_each()
        w13.append(layer_w13)
        w2.append(layer_w2)
    return ExpertSlots(slot_experts.clone(), w13, w2)


def _resident_experts(held: Sequence[ExpertSlots], moe_layer: int,
                      dtype: torch.dtype) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Logical expert → its (w13 [2I, D], w2 [D, I]) in a held version's layer (first found)."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for slots in held:
        layer_w13, layer_w2 = slots.w13[moe_layer], slots.w2[moe_layer]
        if layer_w13.dtype != dtype:
            continue
        for slot, expert in enumerate(slots.slot_experts[moe_layer].tolist()):
            if expert >= 0 and expert not in found and slot < layer_w13.shape[0]:
                found[expert] = (layer_w13[slot], layer_w2[slot])
    return found
