"""Tiny Mixtral and GLM-4-MoE models (``make_tiny_model(dir, arch="mixtral" | "glm4_moe")``): their ``TinyArch``.

Legend: B rows, S sequence length, T = B S tokens, D hidden, H query heads, Hkv key/value heads,
hd head dim, E routed experts, K top-k, I expert intermediate size.

- ``mixtral``: every layer MoE, GQA attention without q/k norms, softmax top-K renormalised, experts
  under the Hub's ``block_sparse_moe.experts.{e}.w1/w3/w2`` names (``intermediate_size`` is the
  expert width, as in Mixtral's config), no sliding window (tests set one in config.json).
- ``glm4_moe``: q/k/v biases, per-head q/k norms, RoPE on the first half of each head (hd must be a
  multiple of 4), the first layer dense (SwiGLU of width 3 D) when there are at least two layers,
  DeepSeek-V3's routing (sigmoid scores, a random ``e_score_correction_bias``, E / 4 groups of which
  half are kept, as the tiny DeepSeek, ``routed_scaling_factor`` 2.5) and one shared expert.

``router_inputs`` is an independent float64 forward used to fit the routers' load skew (the fit ranks
experts by plain logits; softmax and sigmoid are monotonic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from epserve import tokenizer_build
from epserve.tiny_deepseek import DeepseekV3Arch, _route


class MixtralArch:
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    rope_theta = 1_000_000.0
    rms_norm_eps = 1e-5
    max_position_embeddings = 2048
    attention_bias = False
    qk_norm = False
    partial_rotary_factor = 1.0
    embed_shared = 0.6  # norm of the direction all token embeddings share, relative to their random part
    lm_head_gain = 2.0  # logits std ~2: clear argmax gaps, so greedy parity is robust

    def dense_layers(self, opts) -> int:
        return 0

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def config(self, opts, special_ids: dict[str, int]) -> dict:
        return {**self._common_config(opts, special_ids), "intermediate_size": opts.moe_intermediate_size,
                "num_local_experts": opts.num_experts, "output_router_logits": False, "router_aux_loss_coef": 0.001,
                "router_jitter_noise": 0.0, "sliding_window": None}

    def _common_config(self, opts, special_ids: dict[str, int]) -> dict:
        return {
            "architectures": [self.architecture],
            "attention_dropout": 0.0,
            "bos_token_id": special_ids[tokenizer_build.ENDOFTEXT],
            "dtype": opts.dtype,
            "eos_token_id": special_ids[tokenizer_build.IM_END],
            "head_dim": opts.head_dim,
            "hidden_act": "silu",
            "hidden_size": opts.hidden_size,
            "initializer_range": 0.02,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": self.name,
            "num_attention_heads": opts.num_attention_heads,
            "num_experts_per_tok": opts.top_k,
            "num_hidden_layers": opts.num_layers,
            "num_key_value_heads": opts.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": opts.dtype,
            "use_cache": True,
            "vocab_size": opts.vocab_size,
        }

    def moe_extras(self, opts, layer: int, randn) -> dict[str, torch.Tensor]:
        """A MoE layer's tensors besides the router and routed experts (GLM: correction bias, shared expert)."""
        return {}

    def init_weights(self, opts, randn: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        D, I, V, hd = opts.hidden_size, opts.moe_intermediate_size, opts.vocab_size, opts.head_dim
        q_dim, kv_dim = opts.num_attention_heads * hd, opts.num_key_value_heads * hd

        def norm(name: str, size: int) -> torch.Tensor:
            return randn(name, (size,), std=0.1, mean=1.0)

        shared = randn("shared_direction", (D,), std=1.0)
        shared *= self.embed_shared * math.sqrt(D) / shared.norm()
        w = {"model.embed_tokens.weight": randn("model.embed_tokens.weight", (V, D), std=1.0) + shared}
        for layer in range(opts.num_layers):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            w[p + "input_layernorm.weight"] = norm(p + "input_layernorm.weight", D)
            for proj, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                w[a + f"{proj}.weight"] = randn(a + f"{proj}.weight", (rows, D), std=D**-0.5)
                if self.attention_bias:
                    w[a + f"{proj}.bias"] = randn(a + f"{proj}.bias", (rows,), std=0.3)
            w[a + "o_proj.weight"] = randn(a + "o_proj.weight", (D, q_dim), std=q_dim**-0.5)
            if self.qk_norm:
                w[a + "q_norm.weight"] = norm(a + "q_norm.weight", hd)
                w[a + "k_norm.weight"] = norm(a + "k_norm.weight", hd)
            w[p + "post_attention_layernorm.weight"] = norm(p + "post_attention_layernorm.weight", D)
            if layer < self.dense_layers(opts):
                w.update(_mlp(randn, p + "mlp.", D, 3 * D))
                continue
            w[self.gate_name(layer)] = randn(self.gate_name(layer), (opts.num_experts, D), std=D**-0.5)
            w.update(self.moe_extras(opts, layer, randn))
            for e in range(opts.num_experts):
                gate, up, down = self.expert_names(layer, e)
                w[gate] = randn(gate, (I, D), std=D**-0.5)
                w[up] = randn(up, (I, D), std=D**-0.5)
                w[down] = randn(down, (D, I), std=I**-0.5)
        w["model.norm.weight"] = norm("model.norm.weight", D)
        lm_head = randn("lm_head.weight", (V, D), std=self.lm_head_gain * D**-0.5)
        common = shared * w["model.norm.weight"]  # what the shared direction looks like after the final norm
        common /= common.norm()
        w["lm_head.weight"] = lm_head - (lm_head @ common)[:, None] * common  # no logit bias from it
        return w

    def route(self, opts, weights: dict[str, torch.Tensor], layer: int,
              logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] float64 → (ids [T, K], weights [T, K]): softmax top-K, renormalised."""
        top_w, top_i = logits.softmax(dim=-1).topk(opts.top_k, dim=-1)
        return top_i, top_w / top_w.sum(-1, keepdim=True)

    def router_inputs(self, weights: dict[str, torch.Tensor], opts,
                      input_ids: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
        W = {name: t.double() for name, t in weights.items()}
        B, S = input_ids.shape
        H, KV, hd = opts.num_attention_heads, opts.num_key_value_heads, opts.head_dim
        rot = int(hd * self.partial_rotary_factor)
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq  # [S, rot/2]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rms(x: torch.Tensor, name: str) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps) * W[name]

        def rope(x: torch.Tensor) -> torch.Tensor:  # [B, heads, S, hd]: the first rot dims turn
            x1, x2, rest = x[..., :rot // 2], x[..., rot // 2:rot], x[..., rot:]
            return torch.cat([x[..., :rot] * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)

        def project(x: torch.Tensor, name: str, heads: int) -> torch.Tensor:  # → [B, heads, S, hd]
            y = x @ W[name + ".weight"].T + (W[name + ".bias"] if self.attention_bias else 0)
            return y.view(B, S, heads, hd).transpose(1, 2)

        h = W["model.embed_tokens.weight"][input_ids]  # [B, S, D]
        for layer in range(opts.num_layers):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            x = rms(h, p + "input_layernorm.weight")
            q, k, v = project(x, a + "q_proj", H), project(x, a + "k_proj", KV), project(x, a + "v_proj", KV)
            if self.qk_norm:
                q, k = rms(q, a + "q_norm.weight"), rms(k, a + "k_norm.weight")
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
            h = h + attn.transpose(1, 2).reshape(B, S, H * hd) @ W[a + "o_proj.weight"].T
            x = rms(h, p + "post_attention_layernorm.weight").reshape(B * S, -1)  # [T, D]
            if layer < self.dense_layers(opts):
                h = h + _swiglu(W, x, p + "mlp.").view(B, S, -1)
                continue
            yield layer, self.gate_name(layer), x
            top_i, top_w = self.route(opts, weights, layer, x @ weights[self.gate_name(layer)].double().T)
            out = self.shared_output(W, x, layer)
            for e in top_i.unique().tolist():
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                gate, up, down = (W[name] for name in self.expert_names(layer, e))
                xe = x[tok]
                act = F.silu(xe @ gate.T) * (xe @ up.T)
                out.index_add_(0, tok, (act @ down.T) * top_w[tok, slot, None])
            h = h + out.view(B, S, -1)

    def shared_output(self, W: dict[str, torch.Tensor], x: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.zeros_like(x)


class Glm4MoeArch(MixtralArch):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    attention_bias = True
    qk_norm = True
    partial_rotary_factor = 0.5
    routed_scaling_factor = 2.5
    n_shared_experts = 1

    def dense_layers(self, opts) -> int:
        return 1 if opts.num_layers > 1 else 0

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def groups(self, opts) -> tuple[int, int]:
        """(n_group, topk_group): the tiny DeepSeek's choice."""
        if opts.head_dim % 4:
            raise ValueError(f"glm4_moe needs head_dim divisible by 4 (RoPE turns an even half of each head), got "
                             f"{opts.head_dim}")
        if opts.num_experts < 2:
            raise ValueError(f"glm4_moe needs at least 2 experts (a group scores its top two), got {opts.num_experts}")
        d = DeepseekV3Arch().dims(opts)
        return d["n_group"], d["topk_group"]

    def config(self, opts, special_ids: dict[str, int]) -> dict:
        n_group, topk_group = self.groups(opts)
        return {**self._common_config(opts, special_ids), "attention_bias": True,
                "first_k_dense_replace": self.dense_layers(opts), "intermediate_size": 3 * opts.hidden_size,
                "moe_intermediate_size": opts.moe_intermediate_size, "n_group": n_group,
                "n_routed_experts": opts.num_experts, "n_shared_experts": self.n_shared_experts,
                "norm_topk_prob": True, "num_nextn_predict_layers": 0,
                "partial_rotary_factor": self.partial_rotary_factor,
                "routed_scaling_factor": self.routed_scaling_factor,
                "topk_group": topk_group, "use_qk_norm": True}

    def moe_extras(self, opts, layer: int, randn) -> dict[str, torch.Tensor]:
        p = f"model.layers.{layer}.mlp."
        shared_width = opts.moe_intermediate_size * self.n_shared_experts
        return {p + "gate.e_score_correction_bias": randn(p + "gate.e_score_correction_bias", (opts.num_experts,),
                                                          std=0.05),
                **_mlp(randn, p + "shared_experts.", opts.hidden_size, shared_width)}

    def route(self, opts, weights: dict[str, torch.Tensor], layer: int,
              logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_group, topk_group = self.groups(opts)
        bias = weights[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].double()
        return _route(logits, bias, opts.top_k, n_group, topk_group, self.routed_scaling_factor)

    def shared_output(self, W: dict[str, torch.Tensor], x: torch.Tensor, layer: int) -> torch.Tensor:
        return _swiglu(W, x, f"model.layers.{layer}.mlp.shared_experts.")


def _mlp(randn, prefix: str, D: int, width: int) -> dict[str, torch.Tensor]:
    return {prefix + "gate_proj.weight": randn(prefix + "gate_proj.weight", (width, D), std=D**-0.5),
            prefix + "up_proj.weight": randn(prefix + "up_proj.weight", (width, D), std=D**-0.5),
            prefix + "down_proj.weight": randn(prefix + "down_proj.weight", (D, width), std=width**-0.5)}


def _swiglu(W: dict[str, torch.Tensor], x: torch.Tensor, prefix: str) -> torch.Tensor:
    return (F.silu(x @ W[prefix + "gate_proj.weight"].T) * (x @ W[prefix + "up_proj.weight"].T)) \
        @ W[prefix + "down_proj.weight"].T
