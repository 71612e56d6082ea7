"""GPT-OSS (``GptOssForCausalLM``: gpt-oss-20b, gpt-oss-120b), attention side and expert layout.

Legend: T tokens in the step, D hidden, H query heads, Hkv key/value heads, Dh head dim, E experts,
K top-k, I expert intermediate size, V vocab.

Every layer is an MoE layer: (residual add +) RMSNorm → fused QKV projection with its bias → GQA
attention with attention sinks through a ``SinkAttentionBackend`` (YaRN RoPE on rotate-half
halves; even layers see a sliding window of ``sliding_window`` positions, odd layers the whole
context, as ``layer_types`` says; ``attention_worker/attention_sinks.py``) → o_proj with its bias →
residual add + RMSNorm → router (``F.linear`` with a bias, top-k of the logits, softmax over those
K: ``route_topk_softmax``) → routed experts, yielded as a ``MoECall`` as ``qwen3_moe.py`` does.

The experts carry biases and a clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``): the expert side
holds them per slot (``expert_side.ExpertSlots``: w13 [2I, D] gate rows over up rows as for every
family, plus b13 [2I] and b2 [D]) and only the torch MoE runner computes them
(``TorchMoERunner.run_clamped_swiglu``). The checkpoint stores each layer's experts fused and
transposed: ``gate_up_proj`` [E, D, 2I] with gate and up columns interleaved (gate 0, up 0, gate 1,
...), ``gate_up_proj_bias`` [E, 2I] likewise, ``down_proj`` [E, I, D], ``down_proj_bias`` [E, D];
``read_experts`` de-interleaves and transposes one expert at a time (``reader.read_rows``).
Published checkpoints are MXFP4-quantized (refused by ``load_model_spec``); bf16 ones load.

RMSNorm multiplies the weight in float32 before casting (transformers' ``GptOssRMSNorm``), unlike the
other families; the same in float32 and float64.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.decoder import ForwardBatch, MoECall
from epserve.weights import CheckpointReader


class SinkAttentionBackend(Protocol):
    def forward(self, layer: int, qkv: torch.Tensor, sinks: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh], sinks [H] → attention output [T, H Dh]: RoPE at ``batch.positions``,
        k/v stored at ``batch.slot_mapping``, causal attention (within the layer's window) whose softmax
        also counts each head's sink logit."""
        ...


@dataclass
class GptOssLayerWeights:
    input_norm: torch.Tensor            # [D]
    qkv_proj: torch.Tensor              # [(H + 2 Hkv) Dh, D]: q_proj, k_proj, v_proj rows
    qkv_bias: torch.Tensor              # [(H + 2 Hkv) Dh]
    o_proj: torch.Tensor                # [D, H Dh]
    o_bias: torch.Tensor                # [D]
    sinks: torch.Tensor                 # [H]
    post_norm: torch.Tensor             # [D]
    router: torch.Tensor                # [E, D]
    router_bias: torch.Tensor           # [E]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N]: GPT-OSS's RMSNorm (variance and weight product in float32, then cast)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def route_topk_softmax(top_k: int, hidden: torch.Tensor, router: torch.Tensor,
                       bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, D], router [E, D], bias [E] → (topk_ids [T, K] int64, topk_weights [T, K]): transformers'
    ``GptOssTopKRouter``, in the model dtype: the K largest logits, softmaxed among themselves."""
    values, ids = torch.topk(F.linear(hidden, router, bias), top_k, dim=-1)
    return ids, torch.softmax(values, dim=1, dtype=values.dtype)


class GptOssAttentionSide:
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[GptOssLayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        assert spec.attention_sinks and spec.expert_bias, "GptOssAttentionSide needs a GPT-OSS spec"
        self.spec = spec
        self.embed = embed               # [V, D]
        self.layers = layers
        self.final_norm = final_norm     # [D]
        self.lm_head = lm_head           # [V, D]
        self.dtype = embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward_steps(self, batch: ForwardBatch, attention: SinkAttentionBackend
                      ) -> Generator[MoECall, torch.Tensor, torch.Tensor]:
        """Yields a MoECall per layer (send back [T, D]); returns logits [rows, V] (float32)."""
        spec, eps = self.spec, self.spec.rms_norm_eps
        residual = F.embedding(batch.input_ids, self.embed)                      # [T, D]
        for index, w in enumerate(self.layers):
            x = rms_norm(residual, w.input_norm, eps)
            attn = attention.forward(index, F.linear(x, w.qkv_proj, w.qkv_bias), w.sinks, batch)   # [T, H Dh]
            residual = residual + F.linear(attn, w.o_proj, w.o_bias)
            x = rms_norm(residual, w.post_norm, eps)
            topk_ids, topk_weights = route_topk_softmax(spec.num_experts_per_tok, x, w.router, w.router_bias)
            residual = residual + (yield MoECall(spec.moe_index(index), x, topk_ids, topk_weights,
                                                 batch.padding_rows))
        if batch.logits_rows is not None:
            residual = residual[batch.logits_rows]
        return F.linear(rms_norm(residual, self.final_norm, eps), self.lm_head).float()


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor in a (bf16) GPT-OSS checkpoint of ``spec``, in checkpoint order."""
    D, Dh, V, E, I = spec.hidden_size, spec.head_dim, spec.vocab_size, spec.num_experts, spec.moe_intermediate_size
    H, q_dim, kv_dim = spec.num_attention_heads, spec.num_attention_heads * Dh, spec.num_key_value_heads * Dh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(spec.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)})
        for name, rows, cols in (("q_proj", q_dim, D), ("k_proj", kv_dim, D), ("v_proj", kv_dim, D),
                                 ("o_proj", D, q_dim)):
            shapes.update({f"{a}.{name}.weight": (rows, cols), f"{a}.{name}.bias": (rows,)})
        shapes[f"{a}.sinks"] = (H,)
        shapes.update({f"{p}.mlp.router.weight": (E, D), f"{p}.mlp.router.bias": (E,)})
        gate_up, down = expert_tensor_names(i)
        shapes.update({gate_up: (E, D, 2 * I), f"{gate_up}_bias": (E, 2 * I), down: (E, I, D), f"{down}_bias": (E, D)})
    shapes["model.norm.weight"] = (D,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def expert_tensor_names(layer: int) -> tuple[str, str]:
    """(gate_up_proj, down_proj) of decoder layer ``layer``; their biases add ``_bias``."""
    return f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"


def read_experts(reader, layer: int, experts: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                 out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Decoder layer ``layer``'s experts into ``out`` {expert: (w13 [2I, D], w2 [D, I], b13 [2I], b2 [D])}:
    w13 holds the gate rows over the up rows (de-interleaved, transposed), as every family's expert slots."""
    gate_up_name, down_name = expert_tensor_names(layer)
    gate_up = reader.read_rows(gate_up_name, experts, dtype, device)               # [n, D, 2I]
    gate_up_bias = reader.read_rows(f"{gate_up_name}_bias", experts, dtype, device)   # [n, 2I]
    down = reader.read_rows(down_name, experts, dtype, device)                     # [n, I, D]
    down_bias = reader.read_rows(f"{down_name}_bias", experts, dtype, device)     # [n, D]
    for j, e in enumerate(experts):
        w13, w2, b13, b2 = out[e]
        inter = w2.shape[1]
        w13[:inter].copy_(gate_up[j, :, 0::2].T)
        w13[inter:].copy_(gate_up[j, :, 1::2].T)
        b13[:inter].copy_(gate_up_bias[j, 0::2])
        b13[inter:].copy_(gate_up_bias[j, 1::2])
        w2.copy_(down[j].T)
        b2.copy_(down_bias[j])


def load_attention_side(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                        device: torch.device | str = "cpu", ops=None) -> GptOssAttentionSide:
    """Reads only the attention side's tensors (no experts); q/k/v and their biases become one GEMM. ``ops``
    is not used: GPT-OSS runs on torch operations only (its norm and router differ from the fused kernels')."""
    names = [name for name in checkpoint_shapes(spec) if ".mlp.experts." not in name]
    t = reader.read(names, dtype, device, desc="loading attention weights")
    layers = []
    for i in range(spec.num_hidden_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        layers.append(GptOssLayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            qkv_proj=torch.cat([t.pop(f"{a}.{n}_proj.weight") for n in "qkv"]),
            qkv_bias=torch.cat([t.pop(f"{a}.{n}_proj.bias") for n in "qkv"]),
            o_proj=t[f"{a}.o_proj.weight"], o_bias=t[f"{a}.o_proj.bias"], sinks=t[f"{a}.sinks"],
            router=t[f"{p}.mlp.router.weight"], router_bias=t[f"{p}.mlp.router.bias"]))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if spec.tie_word_embeddings else t["lm_head.weight"]
    return GptOssAttentionSide(spec, embed, layers, t["model.norm.weight"], lm_head)
