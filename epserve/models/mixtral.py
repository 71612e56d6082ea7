"""Mixtral (``MixtralForCausalLM``), attention side: Qwen3-MoE's decoder layer without the q/k norms.

Legend: D hidden, H query heads, Hkv key/value heads, Dh head dim, E experts, I expert intermediate
size, V vocab.

Every layer is an MoE layer: (residual add +) RMSNorm → fused QKV projection → GQA attention with
RoPE (no per-head norms; a ``sliding_window`` shorter than the positions limits what a token sees,
``attention_torch.py``) → o_proj → residual add + RMSNorm → router (softmax, top-k, the top-k weights
always renormalised, as transformers' ``MixtralTopKRouter``) → routed SwiGLU experts. That is
``Qwen3MoeAttentionSide`` with ``q_norm``/``k_norm`` None and ``norm_topk_prob`` true (the spec sets
it), so the fused Triton router and the batched GPU runner serve Mixtral as they serve Qwen3.

Checkpoint names are the Hub's (``checkpoint_shapes``, the one description loaders, dummy weights and
tests share): the MoE block is ``block_sparse_moe`` with router ``gate`` and experts ``w1`` (gate),
``w3`` (up), ``w2`` (down) (``model_config.MIXTRAL_EXPERT_NAMES``); transformers renames them on load.
"""

from __future__ import annotations

import torch

from epserve.model_config import ModelSpec
from epserve.models.ops import TORCH_OPS, LayerOps
from epserve.models.qwen3_moe import LayerWeights, Qwen3MoeAttentionSide
from epserve.weights import CheckpointReader


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor in a Hub Mixtral checkpoint of ``spec``, in checkpoint order."""
    D, Dh, V, E, I = spec.hidden_size, spec.head_dim, spec.vocab_size, spec.num_experts, spec.moe_intermediate_size
    q_dim, kv_dim = spec.num_attention_heads * Dh, spec.num_key_value_heads * Dh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       f"{p}.self_attn.q_proj.weight": (q_dim, D), f"{p}.self_attn.k_proj.weight": (kv_dim, D),
                       f"{p}.self_attn.v_proj.weight": (kv_dim, D), f"{p}.self_attn.o_proj.weight": (D, q_dim),
                       f"{p}.block_sparse_moe.gate.weight": (E, D)})
        for e in range(E):
            gate, up, down = spec.expert_names.per_expert(i, e)
            shapes.update({gate: (I, D), up: (I, D), down: (D, I)})
    shapes["model.norm.weight"] = (D,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def attention_tensor_names(spec: ModelSpec) -> list[str]:
    return [name for name in checkpoint_shapes(spec) if ".block_sparse_moe.experts." not in name]


def load_attention_side(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                        device: torch.device | str = "cpu", ops: LayerOps = TORCH_OPS) -> Qwen3MoeAttentionSide:
    """Reads only the attention side's tensors (no routed experts); q/k/v become one GEMM."""
    assert spec.moe_layers == tuple(range(spec.num_hidden_layers)), "every Mixtral layer is an MoE layer"
    assert not spec.qk_norm and spec.norm_topk_prob, "Mixtral has no q/k norms and renormalises its top-k"
    t = reader.read(attention_tensor_names(spec), dtype, device, desc="loading attention weights")
    layers = []
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        layers.append(LayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            qkv_proj=torch.cat([t.pop(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"]),
            o_proj=t[f"{p}.self_attn.o_proj.weight"], q_norm=None, k_norm=None,
            router=t[f"{p}.block_sparse_moe.gate.weight"], dense_mlp=None))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return Qwen3MoeAttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head, ops)
