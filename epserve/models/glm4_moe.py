"""GLM-4-MoE (``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, GLM-4.6), attention side: everything but the
routed experts.

Legend: T tokens in the step, D hidden, H query heads, Hkv key/value heads, Dh head dim, E routed
experts, K top-k, I MoE intermediate size, F dense intermediate size, V vocab.

Per decoder layer: (residual add +) RMSNorm → fused QKV projection with its bias (``attention_bias``)
→ GQA attention through an ``AttentionBackend`` (per-head q/k RMSNorm when ``use_qk_norm``, RoPE on
the leading ``partial_rotary_factor`` of each head, the paged KV cache) → o_proj → residual add +
RMSNorm → either a dense SwiGLU MLP (the first ``first_k_dense_replace`` layers) or an MoE layer:
DeepSeek-V3's routing (sigmoid scores, ``e_score_correction_bias``, ``n_group``/``topk_group``,
``routed_scaling_factor``: ``deepseek_v3.make_router``), the routed experts (yielded as a ``MoECall``)
plus the shared experts, computed here on the attention side as DeepSeek's are.

Weights use the Hub checkpoint names (``checkpoint_shapes``: the one description of a GLM-4-MoE
checkpoint that loaders, dummy weights and tests share). The router weight and bias stay float32
whatever the model dtype, as in transformers. Published checkpoints also hold the multi-token
prediction layer(s) after the last decoder layer (``num_nextn_predict_layers``); they are not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.decoder import AttentionBackend, DecoderSide, ForwardBatch
from epserve.models.deepseek_v3 import Router, is_float32_tensor, make_router
from epserve.models.ops import TORCH_OPS, LayerOps
from epserve.weights import CheckpointReader


@dataclass
class Glm4MoeLayerWeights:
    input_norm: torch.Tensor            # [D]
    qkv_proj: torch.Tensor              # [(H + 2 Hkv) Dh, D]: q_proj, k_proj, v_proj rows
    qkv_bias: torch.Tensor | None       # [(H + 2 Hkv) Dh] (attention_bias)
    o_proj: torch.Tensor                # [D, H Dh]
    q_norm: torch.Tensor | None         # [Dh] (use_qk_norm)
    k_norm: torch.Tensor | None         # [Dh]
    post_norm: torch.Tensor             # [D]
    router: torch.Tensor | None         # [E, D] float32 (MoE layers)
    router_bias: torch.Tensor | None    # [E] float32: e_score_correction_bias
    shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up [Is, D], down [D, Is]
    dense_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # gate, up [F, D], down [D, F]


class Glm4MoeAttentionSide(DecoderSide):
    """GLM-4-MoE: GQA with q/k/v biases (one fused projection), optional q/k norms and partial
    rotary in the attention backend; DeepSeek-V3's routing and shared experts."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[Glm4MoeLayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, ops: LayerOps = TORCH_OPS,
                 router: Router | None = None) -> None:
        super().__init__(spec, embed, layers, final_norm, lm_head, ops)
        self.route = router or make_router(spec, embed.device)

    def attention_out(self, index: int, x: torch.Tensor, w: Glm4MoeLayerWeights, batch: ForwardBatch,
                      attention: AttentionBackend) -> torch.Tensor:
        qkv = F.linear(x, w.qkv_proj, w.qkv_bias)                                # [T, (H + 2 Hkv) Dh]
        return F.linear(attention.forward(index, qkv, w.q_norm, w.k_norm, batch), w.o_proj)

    def norm_and_route(self, attn: torch.Tensor, residual: torch.Tensor, w: Glm4MoeLayerWeights):
        x, residual = self.ops.add_rms_norm(attn, residual, w.post_norm, self.spec.rms_norm_eps)
        topk_ids, topk_weights = self.route(x, w.router, w.router_bias)
        return x, residual, topk_ids, topk_weights.to(x.dtype)


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor in a Hub GLM-4-MoE checkpoint of ``spec`` (per-expert
    layout, without the multi-token prediction layers), in checkpoint order."""
    D, Dh, V, E = spec.hidden_size, spec.head_dim, spec.vocab_size, spec.num_experts
    I, F_ = spec.moe_intermediate_size, spec.intermediate_size
    q_dim, kv_dim = spec.num_attention_heads * Dh, spec.num_key_value_heads * Dh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}

    def mlp(prefix: str, width: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (width, D), f"{prefix}.up_proj.weight": (width, D),
                       f"{prefix}.down_proj.weight": (D, width)})

    for i in range(spec.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)})
        for name, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            shapes[f"{a}.{name}.weight"] = (rows, D)
            if spec.attention_bias:
                shapes[f"{a}.{name}.bias"] = (rows,)
        shapes[f"{a}.o_proj.weight"] = (D, q_dim)
        if spec.qk_norm:
            shapes.update({f"{a}.q_norm.weight": (Dh,), f"{a}.k_norm.weight": (Dh,)})
        if i not in spec.moe_layers:
            mlp(f"{p}.mlp", F_)
            continue
        shapes.update({f"{p}.mlp.gate.weight": (E, D), f"{p}.mlp.gate.e_score_correction_bias": (E,)})
        for e in range(E):
            gate, up, down = spec.expert_names.per_expert(i, e)
            shapes.update({gate: (I, D), up: (I, D), down: (D, I)})
        if spec.n_shared_experts:
            mlp(f"{p}.mlp.shared_experts", I * spec.n_shared_experts)
    shapes["model.norm.weight"] = (D,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def attention_tensor_names(spec: ModelSpec) -> list[str]:
    return [name for name in checkpoint_shapes(spec) if ".mlp.experts." not in name]


def load_attention_side(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                        device: torch.device | str = "cpu", ops: LayerOps = TORCH_OPS) -> Glm4MoeAttentionSide:
    """Reads only the attention side's tensors (no routed experts); q/k/v (and their biases) become one GEMM."""
    names = attention_tensor_names(spec)
    t = reader.read([n for n in names if not is_float32_tensor(n)], dtype, device, desc="loading attention weights")
    t.update(reader.read([n for n in names if is_float32_tensor(n)], torch.float32, device, desc="loading routers"))
    layers = []
    for i in range(spec.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        moe = i in spec.moe_layers
        mlp = lambda prefix: tuple(t[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))  # noqa: E731
        layers.append(Glm4MoeLayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            qkv_proj=torch.cat([t.pop(f"{a}.{n}_proj.weight") for n in "qkv"]),
            qkv_bias=torch.cat([t.pop(f"{a}.{n}_proj.bias") for n in "qkv"]) if spec.attention_bias else None,
            o_proj=t[f"{a}.o_proj.weight"],
            q_norm=t.get(f"{a}.q_norm.weight"), k_norm=t.get(f"{a}.k_norm.weight"),
            router=t[f"{p}.mlp.gate.weight"] if moe else None,
            router_bias=t.get(f"{p}.mlp.gate.e_score_correction_bias"),
            shared_mlp=mlp(f"{p}.mlp.shared_experts") if moe and spec.n_shared_experts else None,
            dense_mlp=None if moe else mlp(f"{p}.mlp"),
        ))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return Glm4MoeAttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head, ops)
