"""Qwen3-MoE, attention side: everything but the routed experts.

Legend: T tokens in the step (all sequences flattened), B sequences, D hidden, H query heads,
Hkv key/value heads, Dh head dim, E logical experts, K top-k, V vocab.

Per decoder layer: (residual add +) RMSNorm → fused QKV projection → attention through an
``AttentionBackend`` (per-head q/k norm, RoPE, the paged KV cache) → o_proj → residual add +
RMSNorm → router (softmax top-k, optional renormalisation) → routed experts. The routed experts
are not computed here: ``forward_steps`` is a generator that yields a ``MoECall`` at every MoE
layer and resumes with the experts' output [T, D]. Whoever drives it decides where experts run
(in process, or on expert workers over the data plane), and can interleave two micro-batches so
expert compute overlaps attention. The residual adds are fused into the next norm
(``LayerOps.add_rms_norm``); the small operations come from ``LayerOps`` (torch, or fused Triton
kernels on a GPU), chosen once when the model is built.

Weights use the Hub checkpoint names; ``load_attention_side`` reads only this side's tensors and
concatenates q/k/v projections into one ``qkv_proj`` (one GEMM instead of three).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.ops import TORCH_OPS, LayerOps
from epserve.weights import CheckpointReader


@dataclass
class ForwardBatch:
    """One step's tokens. Sequences are contiguous runs of ``seq_lens`` new tokens each.

    The lists serve host-side backends (the CPU one walks sequences); ``device`` holds whatever
    a device backend prepared for this batch (block tables, lengths, ... as device tensors)."""

    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    seq_lens: list[int]              # new tokens per sequence, sum = T
    context_lens: list[int]          # tokens in the cache per sequence after this step
    block_tables: list[list[int]]    # KV blocks per sequence
    slot_mapping: torch.Tensor       # [T] flat KV-cache slot of each new token (-1: store nothing)
    logits_rows: torch.Tensor | None = None  # [B'] rows to compute logits for; None = all rows
    padding_rows: torch.Tensor | None = None  # [T, 1] bool, True = a padding row (CUDA graphs); None = none
    device: Any = None               # backend-specific device metadata (see attention_worker/)
    backend_state: dict = field(default_factory=dict)   # per-forward scratch of the backend

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class AttentionBackend(Protocol):
    def forward(self, layer: int, qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh] (q heads, then k, then v) → attention output [T, H Dh]:
        per-head RMSNorm of q and k (none when q_norm/k_norm are None), RoPE at ``batch.positions``,
        the new k/v stored in the paged cache at ``batch.slot_mapping``, causal attention over each
        sequence's cached context."""
        ...


@dataclass
class MoECall:
    """What the attention side needs from the experts for one MoE layer."""

    moe_layer: int                   # index among MoE layers (L index of the expert map)
    hidden: torch.Tensor             # [T, D] post-attention-normed hidden states
    topk_ids: torch.Tensor           # [T, K] logical expert ids
    topk_weights: torch.Tensor       # [T, K]
    padding_rows: torch.Tensor | None = None  # [T, 1] bool: True rows are padding, routed nowhere


@dataclass
class LayerWeights:
    input_norm: torch.Tensor         # [D]
    qkv_proj: torch.Tensor           # [(H + 2 Hkv) Dh, D]: q_proj, k_proj, v_proj rows
    o_proj: torch.Tensor             # [D, H*Dh]
    q_norm: torch.Tensor | None      # [Dh] (None: no q/k norm, Mixtral)
    k_norm: torch.Tensor | None      # [Dh]
    post_norm: torch.Tensor          # [D]
    router: torch.Tensor | None      # [E, D] (MoE layers)
    dense_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up, down (dense layers)


class Qwen3MoeAttentionSide:
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, ops: LayerOps = TORCH_OPS) -> None:
        self.spec = spec
        self.embed = embed               # [V, D]
        self.layers = layers
        self.final_norm = final_norm     # [D]
        self.lm_head = lm_head           # [V, D]
        self.ops = ops
        self.dtype = embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward_steps(self, batch: ForwardBatch, attention: AttentionBackend
                      ) -> Generator[MoECall, torch.Tensor, torch.Tensor]:
        """Yields a MoECall per MoE layer (send back [T, D]); returns logits [rows, V] (float32)."""
        spec, ops, eps = self.spec, self.ops, self.spec.rms_norm_eps
        residual = F.embedding(batch.input_ids, self.embed)                      # [T, D]
        delta = None                     # what the next norm adds to the residual stream
        for index, w in enumerate(self.layers):
            if delta is None:
                x = ops.rms_norm(residual, w.input_norm, eps)
            else:
                x, residual = ops.add_rms_norm(delta, residual, w.input_norm, eps)
            attn = attention.forward(index, F.linear(x, w.qkv_proj), w.q_norm, w.k_norm, batch)  # [T, H Dh]
            attn = F.linear(attn, w.o_proj)
            if w.router is not None:
                x, residual, topk_ids, topk_weights = ops.add_norm_route(
                    attn, residual, w.post_norm, eps, w.router, spec.num_experts_per_tok, spec.norm_topk_prob)
                delta = yield MoECall(spec.moe_index(index), x, topk_ids, topk_weights, batch.padding_rows)
            else:
                x, residual = ops.add_rms_norm(attn, residual, w.post_norm, eps)
                gate, up, down = w.dense_mlp
                delta = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        if batch.logits_rows is not None:
            delta, residual = delta[batch.logits_rows], residual[batch.logits_rows]
        hidden, _ = ops.add_rms_norm(delta, residual, self.final_norm, eps)
        return F.linear(hidden, self.lm_head).float()


def attention_tensor_names(spec: ModelSpec) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  *(f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"),
                  f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        if i in spec.moe_layers:
            names.append(f"{p}.mlp.gate.weight")
        else:
            names += [f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    return names


def load_attention_side(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                        device: torch.device | str = "cpu", ops: LayerOps = TORCH_OPS) -> Qwen3MoeAttentionSide:
    """Reads only the attention side's tensors (no routed experts). ``ops``: the small per-layer
    operations (``epserve.models.ops.layer_ops_for(device)`` picks the fused kernels on a GPU)."""
    t = reader.read(attention_tensor_names(spec), dtype, device, desc="loading attention weights")
    layers = []
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        moe = i in spec.moe_layers
        layers.append(LayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            qkv_proj=torch.cat([t.pop(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"]),
            o_proj=t[f"{p}.self_attn.o_proj.weight"],
            q_norm=t[f"{p}.self_attn.q_norm.weight"], k_norm=t[f"{p}.self_attn.k_norm.weight"],
            router=t[f"{p}.mlp.gate.weight"] if moe else None,
            dense_mlp=None if moe else tuple(t[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")),
        ))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return Qwen3MoeAttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head, ops)
