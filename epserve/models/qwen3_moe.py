"""Qwen3-MoE, attention side: everything but the routed experts.

Legend: T tokens in the step (all sequences flattened), B sequences, D hidden, H query heads,
Hkv key/value heads, Dh head dim, E logical experts, K top-k, V vocab.

Per decoder layer: RMSNorm → GQA attention (q/k norm, RoPE, paged KV cache through an
``AttentionBackend``) → residual → RMSNorm → router (softmax top-k, optional renormalisation)
→ routed experts → residual. The routed experts are not computed here: ``forward_steps`` is a
generator that yields a ``MoECall`` at every MoE layer and resumes with the experts' output
[T, D]. Whoever drives it decides where experts run (in process, or on expert workers over the
data plane), and can interleave two micro-batches so expert compute overlaps attention.

Weights use the Hub checkpoint names; ``load_attention_weights`` reads only this side's tensors.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.layers import RotaryEmbedding, rms_norm, softmax_topk
from epserve.weights import CheckpointReader


@dataclass
class ForwardBatch:
    """One step's tokens. Sequences are contiguous runs of ``seq_lens`` new tokens each."""

    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    seq_lens: list[int]              # new tokens per sequence, sum = T
    context_lens: list[int]          # tokens in the cache per sequence after this step
    block_tables: list[list[int]]    # KV blocks per sequence
    slot_mapping: torch.Tensor       # [T] flat KV-cache slot of each new token
    logits_rows: torch.Tensor | None = None  # [B'] rows to compute logits for; None = all rows

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class AttentionBackend(Protocol):
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, Hkv, Dh] (new tokens; the backend stores them) → [T, H, Dh]."""
        ...


@dataclass
class MoECall:
    """What the attention side needs from the experts for one MoE layer."""

    moe_layer: int                   # index among MoE layers (L index of the expert map)
    hidden: torch.Tensor             # [T, D] post-attention-normed hidden states
    topk_ids: torch.Tensor           # [T, K] logical expert ids
    topk_weights: torch.Tensor       # [T, K]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor         # [D]
    q_proj: torch.Tensor             # [H*Dh, D]
    k_proj: torch.Tensor             # [Hkv*Dh, D]
    v_proj: torch.Tensor             # [Hkv*Dh, D]
    o_proj: torch.Tensor             # [D, H*Dh]
    q_norm: torch.Tensor             # [Dh]
    k_norm: torch.Tensor             # [Dh]
    post_norm: torch.Tensor          # [D]
    router: torch.Tensor | None      # [E, D] (MoE layers)
    dense_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up, down (dense layers)


class Qwen3MoeAttentionSide:
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        self.spec = spec
        self.embed = embed               # [V, D]
        self.layers = layers
        self.final_norm = final_norm     # [D]
        self.lm_head = lm_head           # [V, D]
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        self.dtype = embed.dtype

    @torch.inference_mode()
    def forward_steps(self, batch: ForwardBatch, attention: AttentionBackend
                      ) -> Generator[MoECall, torch.Tensor, torch.Tensor]:
        """Yields a MoECall per MoE layer (send back [T, D]); returns logits [rows, V] (float32)."""
        spec = self.spec
        hidden = F.embedding(batch.input_ids, self.embed)                        # [T, D]
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype)                # [T, Dh]
        num_tokens = batch.num_tokens
        for index, w in enumerate(self.layers):
            residual = hidden
            x = rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
            q = F.linear(x, w.q_proj).view(num_tokens, spec.num_attention_heads, spec.head_dim)
            k = F.linear(x, w.k_proj).view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            v = F.linear(x, w.v_proj).view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            q = self.rope.apply(rms_norm(q, w.q_norm, spec.rms_norm_eps), cos, sin)
            k = self.rope.apply(rms_norm(k, w.k_norm, spec.rms_norm_eps), cos, sin)
            attn = attention.forward(index, q, k, v, batch)                      # [T, H, Dh]
            hidden = residual + F.linear(attn.reshape(num_tokens, -1), w.o_proj)
            residual = hidden
            x = rms_norm(hidden, w.post_norm, spec.rms_norm_eps)
            if w.router is not None:
                topk_ids, topk_weights = softmax_topk(F.linear(x, w.router), spec.num_experts_per_tok,
                                                      spec.norm_topk_prob)
                mlp_out = yield MoECall(spec.moe_index(index), x, topk_ids, topk_weights)
            else:
                gate, up, down = w.dense_mlp
                mlp_out = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
            hidden = residual + mlp_out
        hidden = rms_norm(hidden, self.final_norm, spec.rms_norm_eps)
        if batch.logits_rows is not None:
            hidden = hidden[batch.logits_rows]
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
                        device: torch.device | str = "cpu") -> Qwen3MoeAttentionSide:
    """Reads only the attention side's tensors (no routed experts)."""
    t = reader.read(attention_tensor_names(spec), dtype, device, desc="loading attention weights")
    layers = []
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        moe = i in spec.moe_layers
        layers.append(LayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            q_proj=t[f"{p}.self_attn.q_proj.weight"], k_proj=t[f"{p}.self_attn.k_proj.weight"],
            v_proj=t[f"{p}.self_attn.v_proj.weight"], o_proj=t[f"{p}.self_attn.o_proj.weight"],
            q_norm=t[f"{p}.self_attn.q_norm.weight"], k_norm=t[f"{p}.self_attn.k_norm.weight"],
            router=t[f"{p}.mlp.gate.weight"] if moe else None,
            dense_mlp=None if moe else tuple(t[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")),
        ))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return Qwen3MoeAttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head)
