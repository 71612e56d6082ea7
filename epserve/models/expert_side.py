"""Expert side: SwiGLU routed experts held per physical slot, for every MoE layer.

Legend: L MoE layers, S slots held here, D hidden, I MoE intermediate size, n tokens, K top-k.

``ExpertSlots`` holds ``w13 [S, 2I, D]`` and ``w2 [S, D, I]`` per MoE layer for the slots this
process owns, as listed by ``slot_experts [L, S]`` (logical expert per local slot, -1 empty), and
for GPT-OSS (``spec.expert_bias``) the biases ``b13 [S, 2I]``, ``b2 [S, D]`` and its clamped
SwiGLU's (alpha, limit), which only a runner with ``run_clamped_swiglu`` computes (the torch
runner; ``check_moe_runner`` names the flag otherwise). ``load_expert_slots`` reads only those
experts' tensors from the checkpoint, and copies experts it already holds (in another version's
slots) instead of reading them again. Slots holding the same expert share nothing special: each
is a copy, as on a real redundant replica.
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
    b13: list[torch.Tensor] | None = None   # L × [S, 2I] (GPT-OSS)
    b2: list[torch.Tensor] | None = None    # L × [S, D]
    swiglu: tuple[float, float] | None = None   # GPT-OSS's (alpha, limit); None: silu(gate) * up

    @property
    def num_slots(self) -> int:
        return int(self.slot_experts.shape[1])

    def compute(self, runner: MoERunner, moe_layer: int, hidden: torch.Tensor,
                local_slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [n, D], local_slot_ids [n, K] in [-1, S), weights [n, K] → [n, D]."""
        if self.b13 is None:
            return runner.run(hidden, local_slot_ids, weights, self.w13[moe_layer], self.w2[moe_layer])
        _check_clamped_swiglu(runner)
        alpha, limit = self.swiglu
        return runner.run_clamped_swiglu(hidden, local_slot_ids, weights, self.w13[moe_layer], self.w2[moe_layer],
                                         self.b13[moe_layer], self.b2[moe_layer], alpha, limit)

    def layer_tensors(self, moe_layer: int) -> tuple[torch.Tensor, ...]:
        """(w13, w2) of one MoE layer, plus (b13, b2) when the experts have biases."""
        if self.b13 is None:
            return self.w13[moe_layer], self.w2[moe_layer]
        return self.w13[moe_layer], self.w2[moe_layer], self.b13[moe_layer], self.b2[moe_layer]

    @classmethod
    def from_layers(cls, slot_experts: torch.Tensor, layers: Sequence[tuple[torch.Tensor, ...]],
                    spec: ModelSpec) -> ExpertSlots:
        """Slots assembled from per-layer ``layer_tensors`` (an expert worker shares layers across versions)."""
        biased = spec.expert_bias
        return cls(slot_experts, [t[0] for t in layers], [t[1] for t in layers],
                   [t[2] for t in layers] if biased else None, [t[3] for t in layers] if biased else None,
                   (spec.swiglu_alpha, spec.swiglu_limit) if biased else None)


def check_moe_runner(spec: ModelSpec, runner: MoERunner) -> None:
    """ValueError naming the flag when ``runner`` cannot compute ``spec``'s experts."""
    if spec.expert_bias:
        _check_clamped_swiglu(runner, spec.architecture)


def _check_clamped_swiglu(runner: MoERunner, architecture: str = "GptOssForCausalLM") -> None:
    if not hasattr(runner, "run_clamped_swiglu"):
        raise ValueError(f"{architecture}'s experts (biases, clamped SwiGLU) run on --moe-runner-backend torch only; "
                         f"the {runner.name} runner does not compute them")


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


def _slot_shapes(spec: ModelSpec) -> list[tuple[int, ...]]:
    """Per-slot shapes of one layer's tensors: w13 [2I, D], w2 [D, I] (and b13 [2I], b2 [D] with biases)."""
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    shapes = [(2 * inter, hidden), (hidden, inter)]
    return shapes + [(2 * inter,), (hidden,)] if spec.expert_bias else shapes


def _load_slots(spec: ModelSpec, reader: CheckpointReader, slot_experts: torch.Tensor, dtype: torch.dtype,
                device: torch.device | str, held: Sequence[ExpertSlots],
                after_each: Callable[[], None]) -> ExpertSlots:
    num_slots = slot_experts.shape[1]
    layers = []
    for moe_layer, decoder_layer in enumerate(spec.moe_layers):
        row = slot_experts[moe_layer].tolist()
        if all(e < 0 for e in row):
            layers.append(tuple(torch.empty(0, *shape, dtype=dtype, device=device) for shape in _slot_shapes(spec)))
            continue
        parts = tuple(torch.empty(num_slots, *shape, dtype=dtype, device=device) for shape in _slot_shapes(spec))
        resident = _resident_experts(held, moe_layer, dtype)
        first_slot: dict[int, int] = {}
        for slot, expert in enumerate(row):
            if expert < 0:                     # an empty slot is never routed to; keep it zero
                for part in parts:
                    part[slot].zero_()
            elif expert not in first_slot:
                first_slot[expert] = slot
                if expert in resident:
                    for part, source in zip(parts, resident[expert]):
                        part[slot].copy_(source)
                    after_each()
        for expert, slot in first_slot.items():
            if expert not in resident:
                _read_expert(spec, reader, decoder_layer, expert, dtype, device, tuple(part[slot] for part in parts))
                after_each()
        for slot, expert in enumerate(row):    # further replicas on this worker
            if expert >= 0 and first_slot[expert] != slot:
                for part in parts:
                    part[slot].copy_(part[first_slot[expert]])
                after_each()
        layers.append(parts)
    return ExpertSlots.from_layers(slot_experts.clone(), layers, spec)


def _read_expert(spec: ModelSpec, reader: CheckpointReader, decoder_layer: int, expert: int, dtype: torch.dtype,
                 device: torch.device | str, out: tuple[torch.Tensor, ...]) -> None:
    """One expert's tensors from the checkpoint straight into ``out`` (its slot's ``_slot_shapes`` views)."""
    if spec.expert_bias:
        from epserve.models.gpt_oss import read_experts as read_gpt_oss_experts
        read_gpt_oss_experts(reader, decoder_layer, [expert], dtype, device, {expert: out})
        return
    reader.read_experts(decoder_layer, [expert], dtype, device, out={expert: out}, names=spec.expert_names)


def _resident_experts(held: Sequence[ExpertSlots], moe_layer: int,
                      dtype: torch.dtype) -> dict[int, tuple[torch.Tensor, ...]]:
    """Logical expert → its tensors (w13 [2I, D], w2 [D, I], and biases if any) in a held version's layer
    (first found)."""
    found: dict[int, tuple[torch.Tensor, ...]] = {}
    for slots in held:
        parts = slots.layer_tensors(moe_layer)
        if parts[0].dtype != dtype:
            continue
        for slot, expert in enumerate(slots.slot_experts[moe_layer].tolist()):
            if expert >= 0 and expert not in found and slot < parts[0].shape[0]:
                found[expert] = tuple(part[slot] for part in parts)
    return found
