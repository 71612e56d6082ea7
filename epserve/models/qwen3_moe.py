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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.decoder import AttentionBackend, DecoderSide, ForwardBatch
from epserve.models.ops import TORCH_OPS, LayerOps
from epserve.weights import CheckpointReader


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


class Qwen3MoeAttentionSide(DecoderSide):
    """Qwen3-MoE (and Mixtral): one fused QKV projection, q/k norms in the attention backend, the
    post-attention norm and the softmax top-k routing fused (``LayerOps.add_norm_route``)."""

    def attention_block(self, index: int, delta: torch.Tensor | None, residual: torch.Tensor, w: LayerWeights,
                        batch: ForwardBatch, attention: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """The GPU backend takes the residual stream itself at one token (norm, QKV projection, q/k norm,
        RoPE and the cache store in one launch: ``attend_from_residual``); otherwise the composition."""
        fused = getattr(attention, "attend_from_residual", None)
        out = None if fused is None else fused(index, delta, residual, w.input_norm, w.qkv_proj, w.q_norm,
                                               w.k_norm, batch)
        if out is None:
            return super().attention_block(index, delta, residual, w, batch, attention)
        attn, residual = out                                                              # [T, H Dh], [T, D]
        return self.ops.linear(attn, w.o_proj), residual

    def attention_out(self, index: int, x: torch.Tensor, w: LayerWeights, batch: ForwardBatch,
                      attention: AttentionBackend) -> torch.Tensor:
        attn = attention.forward(index, F.linear(x, w.qkv_proj), w.q_norm, w.k_norm, batch)    # [T, H Dh]
        return self.ops.linear(attn, w.o_proj)

    def norm_and_route(self, attn: torch.Tensor, residual: torch.Tensor, w: LayerWeights):
        spec = self.spec
        return self.ops.add_norm_route(attn, residual, w.post_norm, spec.rms_norm_eps, w.router,
                                       spec.num_experts_per_tok, spec.norm_topk_prob)


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
