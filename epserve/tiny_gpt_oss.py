"""Tiny GPT-OSS models (``make_tiny_model(dir, arch="gpt_oss")``): the family's ``TinyArch``.

Legend: B rows, S sequence length, T = B S tokens, D hidden, H query heads, Hkv key/value heads,
hd head dim, E experts, K top-k, I expert intermediate size.

Every layer MoE; q/k/v/o projections with biases; one attention-sink logit per head; layers
alternate a sliding window of ``sliding_window`` (8) positions (even layers) and full attention (odd),
as transformers' default ``layer_types``; YaRN RoPE (factor 4 over 512 original positions, no
truncation, as gpt-oss with its factor 32 over 4096); a biased router whose top-K logits are
softmaxed; experts stored fused and transposed (``gate_up_proj`` [E, D, 2I] with gate and up
columns interleaved, ``down_proj`` [E, I, D], and their biases); the clamped SwiGLU with
``swiglu_alpha`` 1.702 and a ``swiglu_limit`` of 1.5 (gpt-oss: 7) so that the clamps bite on tiny
activations. The window is short so that test prompts cross it.

``router_inputs`` is an independent float64 forward used to fit the routers' load skew (the fit ranks
experts by the router's matrix product; its bias shifts the measured shares a little).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from epserve import tokenizer_build
from epserve.model_config import RopeScaling
from epserve.models.rope_scaling import MlaRotaryEmbedding


class GptOssArch:
    name = "gpt_oss"
    architecture = "GptOssForCausalLM"
    rope_theta = 150000.0
    rms_norm_eps = 1e-5
    max_position_embeddings = 2048
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 512}
    sliding_window = 8
    swiglu_alpha = 1.702
    swiglu_limit = 1.5
    embed_shared = 0.6  # norm of the direction all token embeddings share, relative to their random part
    lm_head_gain = 2.0  # logits std ~2: clear argmax gaps, so greedy parity is robust

    def layer_types(self, opts) -> list[str]:
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(opts.num_layers)]

    def config(self, opts, special_ids: dict[str, int]) -> dict:
        return {
            "architectures": [self.architecture],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "bos_token_id": special_ids[tokenizer_build.ENDOFTEXT],
            "dtype": opts.dtype,
            "eos_token_id": special_ids[tokenizer_build.IM_END],
            "head_dim": opts.head_dim,
            "hidden_act": "silu",
            "hidden_size": opts.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": opts.moe_intermediate_size,
            "layer_types": self.layer_types(opts),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": self.name,
            "num_attention_heads": opts.num_attention_heads,
            "num_experts_per_tok": opts.top_k,
            "num_hidden_layers": opts.num_layers,
            "num_key_value_heads": opts.num_key_value_heads,
            "num_local_experts": opts.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": dict(self.rope_scaling),
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": opts.dtype,
            "use_cache": True,
            "vocab_size": opts.vocab_size,
        }

    def init_weights(self, opts, randn: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        D, I, V, hd, E = opts.hidden_size, opts.moe_intermediate_size, opts.vocab_size, opts.head_dim, opts.num_experts
        H, q_dim, kv_dim = opts.num_attention_heads, opts.num_attention_heads * hd, opts.num_key_value_heads * hd

        def norm(name: str, size: int) -> torch.Tensor:
            return randn(name, (size,), std=0.1, mean=1.0)

        shared = randn("shared_direction", (D,), std=1.0)
        shared *= self.embed_shared * math.sqrt(D) / shared.norm()
        w = {"model.embed_tokens.weight": randn("model.embed_tokens.weight", (V, D), std=1.0) + shared}
        for layer in range(opts.num_layers):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            w[p + "input_layernorm.weight"] = norm(p + "input_layernorm.weight", D)
            for proj, rows, cols in (("q_proj", q_dim, D), ("k_proj", kv_dim, D), ("v_proj", kv_dim, D),
                                     ("o_proj", D, q_dim)):
                w[a + f"{proj}.weight"] = randn(a + f"{proj}.weight", (rows, cols), std=cols**-0.5)
                w[a + f"{proj}.bias"] = randn(a + f"{proj}.bias", (rows,), std=0.1)
            w[a + "sinks"] = randn(a + "sinks", (H,), std=1.0)
            w[p + "post_attention_layernorm.weight"] = norm(p + "post_attention_layernorm.weight", D)
            w[p + "mlp.router.weight"] = randn(p + "mlp.router.weight", (E, D), std=D**-0.5)
            w[p + "mlp.router.bias"] = randn(p + "mlp.router.bias", (E,), std=0.1)
            x = p + "mlp.experts."
            w[x + "gate_up_proj"] = randn(x + "gate_up_proj", (E, D, 2 * I), std=D**-0.5)
            w[x + "gate_up_proj_bias"] = randn(x + "gate_up_proj_bias", (E, 2 * I), std=0.1)
            w[x + "down_proj"] = randn(x + "down_proj", (E, I, D), std=I**-0.5)
            w[x + "down_proj_bias"] = randn(x + "down_proj_bias", (E, D), std=0.1)
        w["model.norm.weight"] = norm("model.norm.weight", D)
        lm_head = randn("lm_head.weight", (V, D), std=self.lm_head_gain * D**-0.5)
        common = shared * w["model.norm.weight"]  # what the shared direction looks like after the final norm
        common /= common.norm()
        w["lm_head.weight"] = lm_head - (lm_head @ common)[:, None] * common  # no logit bias from it
        return w

    def router_inputs(self, weights: dict[str, torch.Tensor], opts,
                      input_ids: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
        W = {name: t.double() for name, t in weights.items()}
        B, S = input_ids.shape
        H, KV, hd = opts.num_attention_heads, opts.num_key_value_heads, opts.head_dim
        scaling = RopeScaling(**{k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
        rope = MlaRotaryEmbedding(hd, self.rope_theta, scaling, "rotate_half")
        tables = rope.tables(torch.arange(S), torch.float64)                              # [S, hd] each
        pos = torch.arange(S)
        visible_full = pos[None, :] <= pos[:, None]                                        # [S, S]
        visible_window = visible_full & (pos[None, :] > pos[:, None] - self.sliding_window)

        def rms(x: torch.Tensor, name: str) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps) * W[name]

        def project(x: torch.Tensor, name: str) -> torch.Tensor:
            return x @ W[name + ".weight"].T + W[name + ".bias"]

        h = W["model.embed_tokens.weight"][input_ids]  # [B, S, D]
        for layer, kind in enumerate(self.layer_types(opts)):
            p, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
            x = rms(h, p + "input_layernorm.weight")
            q = rope.apply(project(x, a + "q_proj").view(B * S, H, hd), tuple(t.repeat(B, 1) for t in tables))
            k = rope.apply(project(x, a + "k_proj").view(B * S, KV, hd), tuple(t.repeat(B, 1) for t in tables))
            q, k = q.view(B, S, H, hd).transpose(1, 2), k.view(B, S, KV, hd).transpose(1, 2)
            v = project(x, a + "v_proj").view(B, S, KV, hd).transpose(1, 2)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            logits = (q @ k.transpose(2, 3)) * hd**-0.5                                    # [B, H, S, S]
            visible = visible_window if kind == "sliding_attention" else visible_full
            logits = logits.masked_fill(~visible, float("-inf"))
            sinks = W[a + "sinks"].view(1, H, 1, 1).expand(B, H, S, 1)
            probs = torch.softmax(torch.cat([logits, sinks], -1), -1)[..., :-1]
            attn = (probs @ v).transpose(1, 2).reshape(B, S, H * hd)
            h = h + project(attn, a + "o_proj")
            x = rms(h, p + "post_attention_layernorm.weight").reshape(B * S, -1)            # [T, D]
            gate_name = p + "mlp.router.weight"
            yield layer, gate_name, x
            values, top_i = (x @ weights[gate_name].double().T + W[p + "mlp.router.bias"]).topk(opts.top_k, dim=-1)
            top_w = values.softmax(dim=-1)
            out = torch.zeros_like(x)
            e_ = p + "mlp.experts."
            for e in top_i.unique().tolist():
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                gate_up = x[tok] @ W[e_ + "gate_up_proj"][e] + W[e_ + "gate_up_proj_bias"][e]
                gate = gate_up[:, 0::2].clamp(max=self.swiglu_limit)
                up = gate_up[:, 1::2].clamp(-self.swiglu_limit, self.swiglu_limit)
                act = (up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha)
                expert_out = act @ W[e_ + "down_proj"][e] + W[e_ + "down_proj_bias"][e]
                out.index_add_(0, tok, expert_out * top_w[tok, slot, None])
            h = h + out.view(B, S, -1)
