"""Tiny random MoE models in the exact Hugging Face layout, for parity tests and local serving.

``make_tiny_model(dir, arch="qwen3_moe", ...)`` writes config.json, generation_config.json,
safetensors weights (one file, or HF-style shards plus ``model.safetensors.index.json``) under
the tensor names of the published checkpoints, a byte-level BPE tokenizer
(``epserve.tokenizer_build``), and ``epserve_tiny_model.json`` (generator options, per-layer
expert ranks and the measured router load). ``default_model_dir()`` builds one fixed, slightly
larger model once per cache directory and returns its path.

Every tensor is drawn from its own generator seeded by (seed, tensor name), so outputs are
byte-identical for the same options. Legend: T tokens, D hidden, E experts, K top-k, V vocab.

Router skew: the r-th hottest expert of a layer (a seeded permutation per layer, hottest
expert different in each layer) gets a share of the top-K assignments proportional to r^-S
(S = ``router_skew``; capped at 0.95/K, as one expert takes a token at most once; S = 0 is
uniform). The token embeddings share a common direction, so the router inputs x_t
(post-attention RMSNorm) do too; with d = mean_t(x_t)/|mean_t(x_t)|, adding beta_e * d to gate
row e shifts expert e's logit by beta_e * (x_t . d) > 0, a near-constant bias. The betas are
fitted layer by layer on the shipped corpus run through the model itself (layer l's inputs
depend only on layers < l); the loads carry over to other text and to random token ids.
Architectures plug in through ``TinyArch``: config, initial weights and a forward pass that
yields each MoE layer's router inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from epserve import tokenizer_build
from epserve.tiny_deepseek import DeepseekV2Arch, DeepseekV3Arch
from epserve.tiny_fp8 import QUANTIZABLE_ARCHS, quantization_config, quantize_checkpoint
from epserve.tiny_gpt_oss import GptOssArch
from epserve.tiny_gqa_moe import Glm4MoeArch, MixtralArch

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the bytes written for given options change
INFO_FILE = "epserve_tiny_model.json"
CALIBRATION_SEQ_LEN = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TinyModelOptions:
    arch: str = "qwen3_moe"
    seed: int = 0
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 64
    moe_intermediate_size: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 1024
    router_skew: float = 0.0
    max_shard_size: int | None = None  # bytes; None = one model.safetensors
    dtype: str = "float32"
    quantization: str | None = None          # "fp8": block-quantized as DeepSeek-V3 ships (epserve/tiny_fp8.py)
    weight_block_size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported arch {self.arch!r}; supported: {', '.join(sorted(ARCHS))}")
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.vocab_size < tokenizer_build.MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {tokenizer_build.MIN_VOCAB_SIZE}, got {self.vocab_size}")
        if not (self.router_skew >= 0 and math.isfinite(self.router_skew)):
            raise ValueError(f"router_skew must be a finite number >= 0, got {self.router_skew}")
        if self.max_shard_size is not None and self.max_shard_size < 1:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {self.max_shard_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"--quantization must be fp8 (or left out), got {self.quantization!r}")
        if self.quantization is not None and self.arch not in QUANTIZABLE_ARCHS:
            raise ValueError(f"--quantization {self.quantization} is built for --arch {', '.join(QUANTIZABLE_ARCHS)} "
                             f"only (the format DeepSeek-V3 ships), not {self.arch}")
        if len(self.weight_block_size) != 2 or min(self.weight_block_size) < 1:
            raise ValueError(f"weight_block_size must be two positive integers, got {self.weight_block_size}")


class TinyArch(Protocol):
    """What one architecture provides; everything else (tokenizer, skew, saving) is shared."""

    name: str

    def config(self, opts: TinyModelOptions, special_ids: dict[str, int]) -> dict:
        """config.json contents."""

    def init_weights(self, opts: TinyModelOptions, randn: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors in checkpoint order; ``randn(name, shape, std=, mean=)`` draws one tensor."""

    def router_inputs(self, weights: dict[str, torch.Tensor], opts: TinyModelOptions,
                      input_ids: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
        """Float64 forward over input_ids [B, S]; yields (layer, gate tensor name, x [T, D]) per MoE
        layer and, when resumed, routes that layer with ``weights[gate name]`` as it is then."""


class Qwen3MoeArch:
    """Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA attention with per-head q/k RMSNorm and RoPE, every
    layer an MoE of E SwiGLU experts, softmax top-K routing with renormalised weights."""

    name = "qwen3_moe"
    rope_theta = 1_000_000.0
    rms_norm_eps = 1e-6
    max_position_embeddings = 2048
    embed_shared = 0.6  # norm of the direction all token embeddings share, relative to their random part
    lm_head_gain = 2.0  # logits std ~2: clear argmax gaps, so greedy parity is robust

    def config(self, opts: TinyModelOptions, special_ids: dict[str, int]) -> dict:
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": special_ids[tokenizer_build.ENDOFTEXT],
            "decoder_sparse_step": 1,
            "dtype": opts.dtype,
            "eos_token_id": special_ids[tokenizer_build.IM_END],
            "head_dim": opts.head_dim,
            "hidden_act": "silu",
            "hidden_size": opts.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": 3 * opts.hidden_size,  # dense layers only; there are none
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": opts.num_layers,
            "mlp_only_layers": [],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": opts.moe_intermediate_size,
            "norm_topk_prob": True,
            "num_attention_heads": opts.num_attention_heads,
            "num_experts": opts.num_experts,
            "num_experts_per_tok": opts.top_k,
            "num_hidden_layers": opts.num_layers,
            "num_key_value_heads": opts.num_key_value_heads,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,  # what transformers 5 reads
            "rope_theta": self.rope_theta,  # what published checkpoints and older readers have
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": opts.dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": opts.vocab_size,
        }

    def init_weights(self, opts: TinyModelOptions, randn: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        D, I, V, hd = opts.hidden_size, opts.moe_intermediate_size, opts.vocab_size, opts.head_dim
        q_dim, kv_dim = opts.num_attention_heads * hd, opts.num_key_value_heads * hd

        def norm(name: str, size: int) -> torch.Tensor:
            return randn(name, (size,), std=0.1, mean=1.0)

        shared = randn("shared_direction", (D,), std=1.0)
        shared *= self.embed_shared * math.sqrt(D) / shared.norm()
        w = {"model.embed_tokens.weight": randn("model.embed_tokens.weight", (V, D), std=1.0) + shared}
        for layer in range(opts.num_layers):
            p = f"model.layers.{layer}."
            w[p + "input_layernorm.weight"] = norm(p + "input_layernorm.weight", D)
            for proj, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                w[p + f"self_attn.{proj}.weight"] = randn(p + f"self_attn.{proj}.weight", (rows, D), std=D**-0.5)
            w[p + "self_attn.o_proj.weight"] = randn(p + "self_attn.o_proj.weight", (D, q_dim), std=q_dim**-0.5)
            w[p + "self_attn.q_norm.weight"] = norm(p + "self_attn.q_norm.weight", hd)
            w[p + "self_attn.k_norm.weight"] = norm(p + "self_attn.k_norm.weight", hd)
            w[p + "post_attention_layernorm.weight"] = norm(p + "post_attention_layernorm.weight", D)
            w[p + "mlp.gate.weight"] = randn(p + "mlp.gate.weight", (opts.num_experts, D), std=D**-0.5)
            for e in range(opts.num_experts):
                q = p + f"mlp.experts.{e}."
                w[q + "gate_proj.weight"] = randn(q + "gate_proj.weight", (I, D), std=D**-0.5)
                w[q + "up_proj.weight"] = randn(q + "up_proj.weight", (I, D), std=D**-0.5)
                w[q + "down_proj.weight"] = randn(q + "down_proj.weight", (D, I), std=I**-0.5)
        w["model.norm.weight"] = norm("model.norm.weight", D)
        lm_head = randn("lm_head.weight", (V, D), std=self.lm_head_gain * D**-0.5)
        common = shared * w["model.norm.weight"]  # what the shared direction looks like after the final norm
        common /= common.norm()
        w["lm_head.weight"] = lm_head - (lm_head @ common)[:, None] * common  # no logit bias from it
        return w

    def router_inputs(self, weights: dict[str, torch.Tensor], opts: TinyModelOptions,
                      input_ids: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
        W = {name: t.double() for name, t in weights.items() if ".mlp.gate." not in name}
        B, S = input_ids.shape
        H, KV, hd = opts.num_attention_heads, opts.num_key_value_heads, opts.head_dim
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq  # [S, hd/2]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rms(x: torch.Tensor, name: str) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps) * W[name]

        def rope(x: torch.Tensor) -> torch.Tensor:  # [B, heads, S, hd]
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat([-x2, x1], -1) * sin

        h = W["model.embed_tokens.weight"][input_ids]  # [B, S, D]
        for layer in range(opts.num_layers):
            p = f"model.layers.{layer}."
            x = rms(h, p + "input_layernorm.weight")
            q = rms((x @ W[p + "self_attn.q_proj.weight"].T).view(B, S, H, hd), p + "self_attn.q_norm.weight")
            k = rms((x @ W[p + "self_attn.k_proj.weight"].T).view(B, S, KV, hd), p + "self_attn.k_norm.weight")
            v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, S, KV, hd)
            q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
            h = h + attn.transpose(1, 2).reshape(B, S, H * hd) @ W[p + "self_attn.o_proj.weight"].T
            x = rms(h, p + "post_attention_layernorm.weight").reshape(B * S, -1)  # [T, D]
            gate_name = p + "mlp.gate.weight"
            yield layer, gate_name, x
            probs = torch.softmax(x @ weights[gate_name].double().T, dim=-1)  # [T, E]
            top_w, top_i = probs.topk(opts.top_k, dim=-1)  # [T, K]
            top_w = top_w / top_w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in top_i.unique().tolist():
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                q_ = p + f"mlp.experts.{e}."
                xe = x[tok]
                act = torch.nn.functional.silu(xe @ W[q_ + "gate_proj.weight"].T) * (xe @ W[q_ + "up_proj.weight"].T)
                out.index_add_(0, tok, (act @ W[q_ + "down_proj.weight"].T) * top_w[tok, slot, None])
            h = h + out.view(B, S, -1)


ARCHS: dict[str, TinyArch] = {"qwen3_moe": Qwen3MoeArch(), "deepseek_v3": DeepseekV3Arch(),
                             "deepseek_v2": DeepseekV2Arch(), "mixtral": MixtralArch(), "glm4_moe": Glm4MoeArch(),
                             "gpt_oss": GptOssArch()}

# The model `epserve up` serves when no --model-path is given.
DEFAULT_SERVING_OPTIONS = TinyModelOptions(
    num_layers=4, num_experts=16, top_k=4, hidden_size=128, moe_intermediate_size=64,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, vocab_size=2048, router_skew=0.6)


def make_tiny_model(out_dir: str | os.PathLike, **options) -> Path:
    """Write a tiny random model to ``out_dir``; keyword options are ``TinyModelOptions`` fields."""
    opts = TinyModelOptions(**options)
    arch = ARCHS[opts.arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    tokenizer = tokenizer_build.train_tokenizer(opts.vocab_size)
    special_ids = tokenizer_build.special_token_ids(tokenizer)
    config = arch.config(opts, special_ids)
    weights = arch.init_weights(opts, _tensor_drawer(opts.seed))
    # Rows past the tokenizer (when the corpus cannot fill vocab_size) get logit 0, far below the
    # best real token's, so greedy decoding never emits an id the tokenizer cannot decode.
    weights["lm_head.weight"][tokenizer.get_vocab_size():] = 0.0
    weights = {name: t.to(DTYPES[opts.dtype]) for name, t in weights.items()}
    calibration_ids = corpus_token_chunks(tokenizer, CALIBRATION_SEQ_LEN)
    ranks, target, measured = skew_routers(arch, weights, opts, calibration_ids)
    if opts.quantization == "fp8":          # the float model's router skew carries over (routers stay float)
        config["quantization_config"] = quantization_config(opts.weight_block_size)
        weights = quantize_checkpoint(weights, opts.weight_block_size)

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": special_ids[tokenizer_build.ENDOFTEXT],
        "do_sample": False,
        "eos_token_id": [special_ids[tokenizer_build.IM_END], special_ids[tokenizer_build.ENDOFTEXT]],
        "pad_token_id": special_ids[tokenizer_build.ENDOFTEXT],
    })
    save_weights(weights, out, opts.max_shard_size)
    tokenizer_build.save_tokenizer(tokenizer, out, model_max_length=config["max_position_embeddings"])
    _write_json(out / INFO_FILE, {
        "generator_version": GENERATOR_VERSION,
        "options": dataclasses.asdict(opts),
        "expert_rank": ranks.tolist(),  # [L][E]: rank of each expert, 0 = hottest
        "target_load_share": target.tolist(),  # [L][E]: share of top-K assignments aimed at
        "calibration_load_share": [[round(x, 6) for x in row] for row in measured.tolist()],
        "calibration_tokens": int(calibration_ids.numel()),
    })
    for written in out.iterdir():          # readable by every user (safetensors writes 0600)
        if written.is_file():
            written.chmod(0o644)
    logger.info("wrote tiny %s model to %s", opts.arch, out.resolve())
    return out


def default_model_dir(cache_dir: str | os.PathLike) -> Path:
    """The embedded default model, generated on first use into ``cache_dir`` (``epserve up`` passes
    ``$EPSERVE_CACHE_DIR`` or ``~/.cache/epserve``). Safe against processes racing: each
    builds in a temporary directory and renames it into place; a loser discards its copy."""
    cache = Path(cache_dir)
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(DEFAULT_SERVING_OPTIONS),
                                     tokenizer_build.read_corpus()]).encode()).hexdigest()[:12]
    final = cache / f"tiny-{DEFAULT_SERVING_OPTIONS.arch}-{key}"
    if (final / "config.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        make_tiny_model(tmp, **dataclasses.asdict(DEFAULT_SERVING_OPTIONS))
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def corpus_token_chunks(tokenizer, seq_len: int) -> torch.Tensor:
    """The shipped corpus tokenized and cut into full rows: [B, seq_len] int64."""
    ids = torch.tensor(tokenizer.encode(tokenizer_build.read_corpus()).ids, dtype=torch.int64)
    num_rows = ids.numel() // seq_len
    return ids[: num_rows * seq_len].view(num_rows, seq_len)


def zipf_load_share(num_experts: int, top_k: int, skew: float) -> torch.Tensor:
    """Share of top-K assignments per rank, proportional to (rank+1)^-skew and capped at 0.95/K
    (an expert can take each token once; the margin keeps the cap reachable): [E] float64, sums
    to 1, non-increasing."""
    share = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -skew
    share /= share.sum()
    if top_k == num_experts:
        return share.fill_(1.0 / num_experts)  # every expert takes every token
    cap = 0.95 / top_k
    capped = torch.zeros(num_experts, dtype=torch.bool)
    while (share > cap * (1 + 1e-12)).any():  # water-fill: clip, give the excess to the rest pro rata
        capped |= share > cap
        free = ~capped
        share[capped] = cap
        share[free] *= (1 - cap * capped.sum()) / share[free].sum()
    return share


def expert_ranks(seed: int, num_layers: int, num_experts: int) -> torch.Tensor:
    """Rank of each expert per layer [L, E] (0 = hottest); the hottest expert differs between
    layers as long as there are enough experts."""
    ranks = torch.empty(num_layers, num_experts, dtype=torch.int64)
    used_hot: set[int] = set()
    for layer in range(num_layers):
        order = torch.randperm(num_experts, generator=_generator(seed, f"router_rank.{layer}"))  # rank -> expert
        if len(used_hot) < num_experts:
            swap = next(i for i, e in enumerate(order.tolist()) if e not in used_hot)
            order[[0, swap]] = order[[swap, 0]]
        used_hot.add(int(order[0]))
        ranks[layer, order] = torch.arange(num_experts)
    return ranks


def fit_router_bias(gate: torch.Tensor, x: torch.Tensor, top_k: int, target: torch.Tensor,
                    max_steps: int = 200, tolerance: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Add beta_e * d to gate rows so top-K loads over inputs x [T, D] match ``target`` [E] shares.

    d is the unit mean of x. Returns (new gate [E, D], achieved shares [E]). The fit is a damped
    fixed-point iteration on log shares with per-expert steps (typically 20-60 steps to 1%); it
    stops once every share is within ``tolerance`` (relative), else keeps the best iterate.
    """
    x = x.double()
    d = x.mean(0)
    d /= d.norm()
    z = x @ d  # [T]
    assert (z > 0).float().mean() > 0.9, "router inputs share too little of a common direction to bias"
    base = x @ gate.double().T  # [T, E]
    floor = 0.5 / (x.shape[0] * top_k)
    beta = torch.zeros(gate.shape[0], dtype=torch.float64)
    best = (math.inf, beta, None)
    step = torch.full_like(beta, 0.5 / float(z.mean()))  # per expert, in logit units per unit log error
    prev_err = torch.zeros_like(beta)
    for _ in range(max_steps):
        share = _top_k_share(base + z[:, None] * beta, top_k)
        err = torch.log(target + floor) - torch.log(share + floor)
        worst = float(err.abs().max())
        if worst < best[0]:
            best = (worst, beta.clone(), share)
        if worst < tolerance:
            break
        # Rprop-style: halve an expert's step when its error changes sign (crowded logits oscillate)
        step = torch.where(err * prev_err < 0, step * 0.5, step * 1.1)
        prev_err = err
        beta = beta + step * err
        beta -= beta.mean()
    _, beta, share = best
    return gate + (beta[:, None] * d).to(gate.dtype), share


def skew_routers(arch: TinyArch, weights: dict[str, torch.Tensor], opts: TinyModelOptions,
                 input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit every router (in place in ``weights``) to its layer's Zipf target.
    Returns (ranks [L, E], target shares [L, E], shares measured on input_ids [L, E])."""
    ranks = expert_ranks(opts.seed, opts.num_layers, opts.num_experts)
    target_by_rank = zipf_load_share(opts.num_experts, opts.top_k, opts.router_skew)
    targets = target_by_rank[ranks]  # [L, E]
    measured = torch.zeros_like(targets)     # dense layers (no router) stay 0
    for layer, gate_name, x in arch.router_inputs(weights, opts, input_ids):
        gate = weights[gate_name]
        new_gate, _ = fit_router_bias(gate, x, opts.top_k, targets[layer])
        weights[gate_name] = new_gate
        measured[layer] = _top_k_share(x.double() @ new_gate.double().T, opts.top_k)  # after dtype rounding
    return ranks, targets, measured


def save_weights(weights: dict[str, torch.Tensor], out: Path, max_shard_size: int | None) -> None:
    """One model.safetensors, or shards cut like huggingface_hub's split_torch_state_dict_into_shards
    (in order; a tensor larger than the limit gets a shard of its own) plus the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    metadata = {"total_parameters": sum(t.numel() for t in weights.values()),
                "total_size": sum(t.numel() * t.element_size() for t in weights.values())}
    _write_json(out / "model.safetensors.index.json", {"metadata": metadata, "weight_map": weight_map})


def _top_k_share(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [T, E] → share of the T*K top-K assignments that each expert receives [E]."""
    idx = logits.topk(top_k, dim=-1).indices  # [T, K]
    counts = torch.bincount(idx.flatten(), minlength=logits.shape[1]).double()
    return counts / idx.numel()


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _tensor_drawer(seed: int) -> Callable[..., torch.Tensor]:
    def randn(name: str, shape: tuple[int, ...], *, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32) * std + mean
    return randn


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
