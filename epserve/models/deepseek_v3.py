"""DeepSeek-V3 and DeepSeek-V2/V2-Lite, attention side: everything but the routed experts.

Legend: T tokens in the step, D hidden, H heads, Q q_lora_rank, C kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, E routed experts, G expert groups, K top-k, I MoE intermediate
size, V vocab.

Per decoder layer: (residual add +) RMSNorm → multi-head latent attention → o_proj → residual add +
RMSNorm → then either a dense SwiGLU MLP (the first ``first_k_dense_replace`` layers) or an MoE
layer: routing (V3: sigmoid grouped top-k with ``e_score_correction_bias``, ``route_sigmoid_grouped``;
V2: softmax, greedy or group-limited greedy, ``route_softmax_limited``), the routed experts (yielded
as a ``MoECall``, as ``qwen3_moe.py`` does) plus the shared experts, computed here on the attention
side (docs/architecture.md says why).

Attention: one GEMM gives the query's low-rank input (or the query itself without
``q_lora_rank``) and the compressed KV (``kv_a_proj_with_mqa``: latent [C] + shared rotary key
[Dr]); the query goes through ``q_a_layernorm`` and ``q_b_proj``, the latent through
``kv_a_layernorm``. An ``MlaAttentionBackend`` rotates, caches the latent and the rotated key
(C + Dr values per token and layer) and attends, expanding keys/values with ``kv_b_proj`` or
absorbing it into the query and output (``attention_worker/attention_mla.py``).

Weights use the Hub checkpoint names (``checkpoint_shapes`` lists them: the one description of a
DeepSeek checkpoint that loaders, dummy weights and tests share; V2 has no correction bias and, in
V2-Lite, one ``q_proj`` instead of ``q_a_proj``/``q_b_proj``). The router weight and bias
stay float32 whatever the model dtype, as in transformers (logits in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.decoder import DecoderSide, ForwardBatch
from epserve.models.ops import TORCH_OPS, LayerOps
from epserve.weights import CheckpointReader


class MlaAttentionBackend(Protocol):
    def forward(self, layer: int, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                kv_b_proj: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, Dn + Dr], latent [T, C] (normed), k_rope [T, Dr] (not yet rotated),
        kv_b_proj [H (Dn + Dv), C] → attention output [T, H Dv]: RoPE at ``batch.positions``, the
        latent and rotated key stored at ``batch.slot_mapping``, causal attention per sequence."""
        ...


@dataclass
class MlaLayerWeights:
    input_norm: torch.Tensor            # [D]
    qkv_a_proj: torch.Tensor            # [Q + C + Dr, D] (q_a_proj; kv_a_proj_with_mqa) or [H(Dn+Dr) + C + Dr, D]
    q_a_norm: torch.Tensor | None       # [Q] (None without q_lora_rank)
    q_b_proj: torch.Tensor | None       # [H (Dn + Dr), Q]
    kv_a_norm: torch.Tensor             # [C]
    kv_b_proj: torch.Tensor             # [H (Dn + Dv), C]
    o_proj: torch.Tensor                # [D, H Dv]
    post_norm: torch.Tensor             # [D]
    router: torch.Tensor | None         # [E, D] float32 (MoE layers)
    router_bias: torch.Tensor | None    # [E] float32: e_score_correction_bias (V3)
    shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up [Is, D], down [D, Is]
    dense_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # gate, up [F, D], down [D, F]


Router = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def route_sigmoid_grouped(spec: ModelSpec, hidden: torch.Tensor, router: torch.Tensor,
                          bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, D], router [E, D], bias [E] → (topk_ids [T, K] int64, topk_weights [T, K] float32).

    transformers' ``DeepseekV3TopkRouter``: float32 logits, sigmoid scores; the choice uses
    scores + bias inside the ``topk_group`` groups whose two best biased scores sum highest; the
    weights are the unbiased scores, renormalised (``norm_topk_prob``) and scaled."""
    routing, num_experts = spec.routing, spec.num_experts
    scores = F.linear(hidden.float(), router.float()).sigmoid()                  # [T, E]
    biased = scores + bias
    group_scores = biased.view(-1, routing.n_group, num_experts // routing.n_group).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=routing.topk_group, dim=-1, sorted=False)[1]          # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)                        # [T, G]
    expert_mask = group_mask.repeat_interleave(num_experts // routing.n_group, dim=1).bool()     # [T, E]
    ids = torch.topk(biased.masked_fill(~expert_mask, float("-inf")), k=spec.num_experts_per_tok,
                     dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * routing.routed_scaling_factor


def route_softmax_limited(spec: ModelSpec, hidden: torch.Tensor, router: torch.Tensor,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, D], router [E, D] → (topk_ids [T, K] int64, topk_weights [T, K] float32).

    transformers' ``DeepseekV2TopkRouter``: float32 softmax scores; ``group_limited_greedy`` zeroes
    the experts outside the ``topk_group`` groups with the highest single score; the top-k scores are
    the weights, renormalised when ``norm_topk_prob`` (DeepSeek's own code and SGLang do; the
    published V2 configs say false) and scaled."""
    routing, num_experts = spec.routing, spec.num_experts
    scores = F.linear(hidden.float(), router.float()).softmax(dim=-1, dtype=torch.float32)   # [T, E]
    if routing.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, routing.n_group, num_experts // routing.n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=routing.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.repeat_interleave(num_experts // routing.n_group, dim=1).bool()
        scores = scores.masked_fill(~expert_mask, 0.0)
    weights, ids = torch.topk(scores, k=spec.num_experts_per_tok, dim=-1, sorted=False)
    if spec.norm_topk_prob and spec.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * routing.routed_scaling_factor


def make_router(spec: ModelSpec, device: torch.device | str) -> Router:
    """The routing function of the spec's ``topk_method``: torch, or for V3 on CUDA the Triton grouped
    top-k (``kernels/grouped_topk.py``, which always renormalises) when ``norm_topk_prob`` is set."""
    if spec.routing.topk_method != "noaux_tc":
        return lambda hidden, router, bias: route_softmax_limited(spec, hidden, router)
    if torch.device(device).type == "cuda" and spec.norm_topk_prob:
        from epserve.kernels.grouped_topk import grouped_topk
        routing = spec.routing

        def route_triton(hidden: torch.Tensor, router: torch.Tensor, bias: torch.Tensor):
            logits = F.linear(hidden.float(), router.float())
            weights, ids = grouped_topk(logits, bias, spec.num_experts_per_tok, routing.n_group,
                                        routing.topk_group, routing.routed_scaling_factor)
            return ids.long(), weights
        return route_triton
    return lambda hidden, router, bias: route_sigmoid_grouped(spec, hidden, router, bias)


class DeepseekV3AttentionSide(DecoderSide):
    """DeepSeek-V2/V3: multi-head latent attention (``_attention``), routing by ``self.route``
    (sigmoid grouped top-k with correction bias, or softmax group-limited), shared experts."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[MlaLayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor, ops: LayerOps = TORCH_OPS,
                 router: Router | None = None) -> None:
        assert spec.mla is not None, "DeepseekV3AttentionSide needs a spec with multi-head latent attention"
        super().__init__(spec, embed, layers, final_norm, lm_head, ops)
        self.route = router or make_router(spec, embed.device)

    def attention_out(self, index: int, x: torch.Tensor, w: MlaLayerWeights, batch: ForwardBatch,
                      attention: MlaAttentionBackend) -> torch.Tensor:
        return F.linear(self._attention(index, x, w, batch, attention), w.o_proj)

    def norm_and_route(self, attn: torch.Tensor, residual: torch.Tensor, w: MlaLayerWeights):
        x, residual = self.ops.add_rms_norm(attn, residual, w.post_norm, self.spec.rms_norm_eps)
        topk_ids, topk_weights = self.route(x, w.router, w.router_bias)
        return x, residual, topk_ids, topk_weights.to(x.dtype)

    def _attention(self, index: int, x: torch.Tensor, w: MlaLayerWeights, batch: ForwardBatch,
                   attention: MlaAttentionBackend) -> torch.Tensor:
        """x [T, D] → attention output [T, H Dv]."""
        mla, eps, heads = self.spec.mla, self.spec.rms_norm_eps, self.spec.num_attention_heads
        q_width = mla.q_lora_rank or heads * mla.qk_head_dim
        q, latent, k_rope = F.linear(x, w.qkv_a_proj).split([q_width, mla.kv_lora_rank, mla.qk_rope_head_dim], -1)
        if w.q_b_proj is not None:
            q = F.linear(self.ops.rms_norm(q, w.q_a_norm, eps), w.q_b_proj)
        latent = self.ops.rms_norm(latent, w.kv_a_norm, eps)
        return attention.forward(index, q.reshape(-1, heads, mla.qk_head_dim), latent, k_rope, w.kv_b_proj, batch)


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor in a Hub DeepSeek-V2/V3 checkpoint of ``spec``
    (per-expert layout), in checkpoint order."""
    mla, D, H, V = spec.mla, spec.hidden_size, spec.num_attention_heads, spec.vocab_size
    I, F_, E = spec.moe_intermediate_size, spec.intermediate_size, spec.num_experts
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)})
        a = f"{p}.self_attn"
        if mla.q_lora_rank is None:
            shapes[f"{a}.q_proj.weight"] = (H * mla.qk_head_dim, D)
        else:
            shapes.update({f"{a}.q_a_proj.weight": (mla.q_lora_rank, D),
                           f"{a}.q_a_layernorm.weight": (mla.q_lora_rank,),
                           f"{a}.q_b_proj.weight": (H * mla.qk_head_dim, mla.q_lora_rank)})
        shapes.update({f"{a}.kv_a_proj_with_mqa.weight": (mla.cache_width, D),
                       f"{a}.kv_a_layernorm.weight": (mla.kv_lora_rank,),
                       f"{a}.kv_b_proj.weight": (H * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
                       f"{a}.o_proj.weight": (D, H * mla.v_head_dim)})
        if i in spec.moe_layers:
            shapes[f"{p}.mlp.gate.weight"] = (E, D)
            if spec.routing.topk_method == "noaux_tc":
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                q = f"{p}.mlp.experts.{e}"
                shapes.update({f"{q}.gate_proj.weight": (I, D), f"{q}.up_proj.weight": (I, D),
                               f"{q}.down_proj.weight": (D, I)})
            if spec.n_shared_experts:
                Is = I * spec.n_shared_experts
                q = f"{p}.mlp.shared_experts"
                shapes.update({f"{q}.gate_proj.weight": (Is, D), f"{q}.up_proj.weight": (Is, D),
                               f"{q}.down_proj.weight": (D, Is)})
        else:
            shapes.update({f"{p}.mlp.gate_proj.weight": (F_, D), f"{p}.mlp.up_proj.weight": (F_, D),
                           f"{p}.mlp.down_proj.weight": (D, F_)})
    shapes["model.norm.weight"] = (D,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def is_float32_tensor(name: str) -> bool:
    """Tensors transformers keeps in float32 whatever the dtype (``_keep_in_fp32_modules_strict``)."""
    return name.endswith((".mlp.gate.weight", ".e_score_correction_bias"))


def attention_tensor_names(spec: ModelSpec) -> list[str]:
    return [name for name in checkpoint_shapes(spec) if not is_routed_expert(name)]


def load_attention_side(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                        device: torch.device | str = "cpu", ops: LayerOps = TORCH_OPS) -> DeepseekV3AttentionSide:
    """Reads only the attention side's tensors (no routed experts); q_a_proj and kv_a_proj_with_mqa
    become one GEMM."""
    names = attention_tensor_names(spec)
    t = reader.read([n for n in names if not is_float32_tensor(n)], dtype, device, desc="loading attention weights")
    t.update(reader.read([n for n in names if is_float32_tensor(n)], torch.float32, device, desc="loading routers"))
    mla = spec.mla
    layers = []
    for i in range(spec.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        moe = i in spec.moe_layers
        q_first = t.pop(f"{a}.q_proj.weight") if mla.q_lora_rank is None else t.pop(f"{a}.q_a_proj.weight")
        mlp = lambda prefix: tuple(t[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))  # noqa: E731
        layers.append(MlaLayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            qkv_a_proj=torch.cat([q_first, t.pop(f"{a}.kv_a_proj_with_mqa.weight")]),
            q_a_norm=t.get(f"{a}.q_a_layernorm.weight"), q_b_proj=t.get(f"{a}.q_b_proj.weight"),
            kv_a_norm=t[f"{a}.kv_a_layernorm.weight"], kv_b_proj=t[f"{a}.kv_b_proj.weight"],
            o_proj=t[f"{a}.o_proj.weight"],
            router=t[f"{p}.mlp.gate.weight"] if moe else None,
            router_bias=t.get(f"{p}.mlp.gate.e_score_correction_bias"),
            shared_mlp=mlp(f"{p}.mlp.shared_experts") if moe and spec.n_shared_experts else None,
            dense_mlp=None if moe else mlp(f"{p}.mlp"),
        ))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return DeepseekV3AttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head, ops)
