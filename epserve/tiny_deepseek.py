"""Tiny DeepSeek models (``make_tiny_model(dir, arch="deepseek_v3" | "deepseek_v2")``): the family's ``TinyArch``.

Legend: T tokens, B rows, S sequence length, D hidden, H heads, Q q_lora_rank, C kv_lora_rank,
Dn/Dr/Dv nope/rope/value head dims, E routed experts, K top-k, I MoE intermediate size.

The family's extra shapes derive from the generic options (``head_dim`` hd): Dn = Dv = hd,
Dr = hd / 2 (so hd must be a multiple of 4), C = 2 hd; the first layer dense (SwiGLU of width 3 D)
when there are at least two layers; E / 4 groups (fewer when E is small) of which half are kept per
token; YaRN RoPE over 512 original positions, with mscale values that scale cos/sin and the softmax.
- ``deepseek_v3``: Q = D / 2 (q_a_proj → norm → q_b_proj), sigmoid grouped top-k (``noaux_tc``) with a
  random ``e_score_correction_bias``, renormalised, ``routed_scaling_factor`` 2.5, one shared expert,
  interleaved rotary pairs, YaRN factor 4 with mscale 1 / mscale_all_dim 0.8;
- ``deepseek_v2``: V2-Lite's attention (one q_proj, no q_lora_rank) with V2's routing (softmax,
  ``group_limited_greedy``, not renormalised, ``routed_scaling_factor`` 2.0), two shared experts,
  complex rotary, YaRN factor 4 with mscale 0.707 / mscale_all_dim 0.6.
Every DeepSeek-specific path of the serving code is therefore exercised by a tiny model.

``router_inputs`` is an independent float64 forward (expanded MLA attention, dense first layers,
the version's routing, shared experts) used to fit the routers' load skew; the fit itself ranks
experts by plain logits (sigmoid and softmax are monotonic; the bias and group limits move the
measured shares a little away from the target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from epserve import tokenizer_build
from epserve.model_config import RopeScaling
from epserve.models.rope_scaling import MlaRotaryEmbedding, mla_softmax_scale


class DeepseekV3Arch:
    name = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    v3 = True                    # sigmoid noaux_tc routing with a bias, q_lora_rank, interleaved rotary
    rope_theta = 10000.0
    rms_norm_eps = 1e-6
    max_position_embeddings = 2048
    rope_scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    routed_scaling_factor = 2.5
    n_shared_experts = 1
    embed_shared = 0.6  # norm of the direction all token embeddings share, relative to their random part
    lm_head_gain = 2.0  # logits std ~2: clear argmax gaps, so greedy parity is robust

    def dims(self, opts) -> dict[str, int]:
        if opts.head_dim % 4:
            raise ValueError(f"deepseek_v3 needs head_dim divisible by 4 (the rotary part is head_dim / 2 and "
                             f"even), got {opts.head_dim}")
        E, K = opts.num_experts, opts.top_k
        n_group, topk_group = 1, 1
        for groups in (4, 2):      # groups of >= 2 experts whose kept half still holds K experts
            if E % groups == 0 and E // groups >= 2 and K <= (groups // 2) * (E // groups):
                n_group, topk_group = groups, groups // 2
                break
        if E < 2:
            raise ValueError(f"deepseek_v3 needs at least 2 experts (a group scores its top two), got {E}")
        return {"q_lora_rank": max(opts.hidden_size // 2, 1) if self.v3 else None, "kv_lora_rank": 2 * opts.head_dim,
                "qk_nope_head_dim": opts.head_dim, "qk_rope_head_dim": opts.head_dim // 2,
                "v_head_dim": opts.head_dim, "n_group": n_group, "topk_group": topk_group,
                "first_k_dense_replace": 1 if opts.num_layers > 1 else 0, "intermediate_size": 3 * opts.hidden_size}

    def config(self, opts, special_ids: dict[str, int]) -> dict:
        d = self.dims(opts)
        routing = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
                   "rope_interleave": True} if self.v3 else \
            {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
             "mlp_bias": False}
        return {
            "architectures": [self.architecture],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": special_ids[tokenizer_build.ENDOFTEXT],
            "dtype": opts.dtype,
            "eos_token_id": special_ids[tokenizer_build.IM_END],
            "first_k_dense_replace": d["first_k_dense_replace"],
            "hidden_act": "silu",
            "hidden_size": opts.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": d["intermediate_size"],
            "kv_lora_rank": d["kv_lora_rank"],
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": self.name,
            "moe_intermediate_size": opts.moe_intermediate_size,
            "moe_layer_freq": 1,
            "n_group": d["n_group"],
            "n_routed_experts": opts.num_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_attention_heads": opts.num_attention_heads,
            "num_experts_per_tok": opts.top_k,
            "num_hidden_layers": opts.num_layers,
            "num_key_value_heads": opts.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "q_lora_rank": d["q_lora_rank"],
            "qk_nope_head_dim": d["qk_nope_head_dim"],
            "qk_rope_head_dim": d["qk_rope_head_dim"],
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": dict(self.rope_scaling),   # the published checkpoints' key and format
            "rope_theta": self.rope_theta,
            "routed_scaling_factor": self.routed_scaling_factor,
            "tie_word_embeddings": False,
            "topk_group": d["topk_group"],
            "torch_dtype": opts.dtype,
            "use_cache": True,
            "v_head_dim": d["v_head_dim"],
            "vocab_size": opts.vocab_size,
            **routing,
        }

    def init_weights(self, opts, randn: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        d = self.dims(opts)
        D, I, V, H, E = opts.hidden_size, opts.moe_intermediate_size, opts.vocab_size, opts.num_attention_heads, \
            opts.num_experts
        Q, C, Dr = d["q_lora_rank"], d["kv_lora_rank"], d["qk_rope_head_dim"]
        qk, Dv, F_ = d["qk_nope_head_dim"] + Dr, d["v_head_dim"], d["intermediate_size"]

        def norm(name: str, size: int) -> torch.Tensor:
            return randn(name, (size,), std=0.1, mean=1.0)

        def mlp(prefix: str, width: int) -> dict[str, torch.Tensor]:
            return {prefix + "gate_proj.weight": randn(prefix + "gate_proj.weight", (width, D), std=D**-0.5),
                    prefix + "up_proj.weight": randn(prefix + "up_proj.weight", (width, D), std=D**-0.5),
                    prefix + "down_proj.weight": randn(prefix + "down_proj.weight", (D, width), std=width**-0.5)}

        shared = randn("shared_direction", (D,), std=1.0)
        shared *= self.embed_shared * math.sqrt(D) / shared.norm()
        w = {"model.embed_tokens.weight": randn("model.embed_tokens.weight", (V, D), std=1.0) + shared}
        for layer in range(opts.num_layers):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            w[p + "input_layernorm.weight"] = norm(p + "input_layernorm.weight", D)
            if Q is None:
                w[a + "q_proj.weight"] = randn(a + "q_proj.weight", (H * qk, D), std=D**-0.5)
            else:
                w[a + "q_a_proj.weight"] = randn(a + "q_a_proj.weight", (Q, D), std=D**-0.5)
                w[a + "q_a_layernorm.weight"] = norm(a + "q_a_layernorm.weight", Q)
                w[a + "q_b_proj.weight"] = randn(a + "q_b_proj.weight", (H * qk, Q), std=Q**-0.5)
            w[a + "kv_a_proj_with_mqa.weight"] = randn(a + "kv_a_proj_with_mqa.weight", (C + Dr, D), std=D**-0.5)
            w[a + "kv_a_layernorm.weight"] = norm(a + "kv_a_layernorm.weight", C)
            w[a + "kv_b_proj.weight"] = randn(a + "kv_b_proj.weight", (H * (qk - Dr + Dv), C), std=C**-0.5)
            w[a + "o_proj.weight"] = randn(a + "o_proj.weight", (D, H * Dv), std=(H * Dv) ** -0.5)
            w[p + "post_attention_layernorm.weight"] = norm(p + "post_attention_layernorm.weight", D)
            if layer < d["first_k_dense_replace"]:
                w.update(mlp(p + "mlp.", F_))
                continue
            w[p + "mlp.gate.weight"] = randn(p + "mlp.gate.weight", (E, D), std=D**-0.5)
            if self.v3:
                w[p + "mlp.gate.e_score_correction_bias"] = randn(p + "mlp.gate.e_score_correction_bias", (E,),
                                                                  std=0.05)
            for e in range(E):
                w.update(mlp(p + f"mlp.experts.{e}.", I))
            w.update(mlp(p + "mlp.shared_experts.", I * self.n_shared_experts))
        w["model.norm.weight"] = norm("model.norm.weight", D)
        lm_head = randn("lm_head.weight", (V, D), std=self.lm_head_gain * D**-0.5)
        common = shared * w["model.norm.weight"]  # what the shared direction looks like after the final norm
        common /= common.norm()
        w["lm_head.weight"] = lm_head - (lm_head @ common)[:, None] * common  # no logit bias from it
        return w

    def router_inputs(self, weights: dict[str, torch.Tensor], opts,
                      input_ids: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
        d = self.dims(opts)
        W = {name: t.double() for name, t in weights.items() if ".mlp.gate." not in name}
        B, S = input_ids.shape
        H, C, Dn, Dr, Dv = opts.num_attention_heads, d["kv_lora_rank"], d["qk_nope_head_dim"], \
            d["qk_rope_head_dim"], d["v_head_dim"]
        scaling = RopeScaling(**{k: v for k, v in self.rope_scaling.items() if k != "type"})
        rope = MlaRotaryEmbedding(Dr, self.rope_theta, scaling, "interleave" if self.v3 else "complex")
        tables = tuple(t.repeat(B, 1) for t in rope.tables(torch.arange(S), torch.float64))   # [T, Dr/2] each
        scale = mla_softmax_scale(Dn + Dr, scaling)

        def rms(x: torch.Tensor, name: str) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps) * W[name]

        def swiglu(x: torch.Tensor, prefix: str) -> torch.Tensor:
            return (F.silu(x @ W[prefix + "gate_proj.weight"].T) * (x @ W[prefix + "up_proj.weight"].T)) \
                @ W[prefix + "down_proj.weight"].T

        h = W["model.embed_tokens.weight"][input_ids].reshape(B * S, -1)            # [T, D]
        for layer in range(opts.num_layers):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            x = rms(h, p + "input_layernorm.weight")
            if d["q_lora_rank"] is None:
                q = x @ W[a + "q_proj.weight"].T
            else:
                q = rms(x @ W[a + "q_a_proj.weight"].T, a + "q_a_layernorm.weight") @ W[a + "q_b_proj.weight"].T
            q_nope, q_rope = q.view(B * S, H, Dn + Dr).split([Dn, Dr], -1)
            latent, k_rope = (x @ W[a + "kv_a_proj_with_mqa.weight"].T).split([C, Dr], -1)
            kv = (rms(latent, a + "kv_a_layernorm.weight") @ W[a + "kv_b_proj.weight"].T).view(B * S, H, Dn + Dv)
            k_nope, v = kv.split([Dn, Dv], -1)
            q_rope = rope.apply(q_rope, tables)
            k_rope = rope.apply(k_rope.unsqueeze(1), tables).expand(-1, H, -1)
            query = torch.cat([q_nope, q_rope], -1).view(B, S, H, -1).transpose(1, 2)
            key = torch.cat([k_nope, k_rope], -1).view(B, S, H, -1).transpose(1, 2)
            attn = F.scaled_dot_product_attention(query, key, v.view(B, S, H, Dv).transpose(1, 2), is_causal=True,
                                                  scale=scale)                       # [B, H, S, Dv]
            h = h + attn.transpose(1, 2).reshape(B * S, H * Dv) @ W[a + "o_proj.weight"].T
            x = rms(h, p + "post_attention_layernorm.weight")
            if layer < d["first_k_dense_replace"]:
                h = h + swiglu(x, p + "mlp.")
                continue
            gate_name = p + "mlp.gate.weight"
            yield layer, gate_name, x
            logits = x @ weights[gate_name].double().T
            if self.v3:
                top_i, top_w = _route(logits, weights[p + "mlp.gate.e_score_correction_bias"].double(), opts.top_k,
                                      d["n_group"], d["topk_group"], self.routed_scaling_factor)
            else:
                top_i, top_w = _route_softmax(logits, opts.top_k, d["n_group"], d["topk_group"],
                                              self.routed_scaling_factor)
            out = swiglu(x, p + "mlp.shared_experts.")
            for e in top_i.unique().tolist():
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                out.index_add_(0, tok, swiglu(x[tok], p + f"mlp.experts.{e}.") * top_w[tok, slot, None])
            h = h + out


def _route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid grouped top-k with the correction bias: logits [T, E] → (ids [T, K], weights [T, K])."""
    scores = logits.sigmoid()
    biased = scores + bias
    group_scores = biased.view(logits.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)        # [T, G]
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1)
    keep = keep.repeat_interleave(logits.shape[1] // n_group, dim=1).bool()                    # [T, E]
    ids = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    return ids, weights / weights.sum(-1, keepdim=True) * scaling


def _route_softmax(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's group-limited greedy: logits [T, E] → (ids [T, K], weights [T, K]), not renormalised."""
    scores = logits.softmax(dim=-1)
    group_scores = scores.view(logits.shape[0], n_group, -1).max(dim=-1).values                  # [T, G]
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1)
    keep = keep.repeat_interleave(logits.shape[1] // n_group, dim=1).bool()
    weights, ids = scores.masked_fill(~keep, 0.0).topk(top_k, dim=-1)
    return ids, weights * scaling


class DeepseekV2Arch(DeepseekV3Arch):
    name = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    v3 = False
    rope_scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.6}
    routed_scaling_factor = 2.0
    n_shared_experts = 2
