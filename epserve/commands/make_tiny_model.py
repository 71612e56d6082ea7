"""``epserve make-tiny-model DIR``: write a tiny random MoE model in Hugging Face format."""

from __future__ import annotations

import argparse
import re
import sys

# Same values as epserve.tiny_model.TinyModelOptions (a test keeps them equal); repeated here so
# `epserve --help` does not import torch.
DEFAULTS = {
    "arch": "qwen3_moe", "seed": 0, "num_layers": 2, "num_experts": 8, "top_k": 2, "hidden_size": 64,
    "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 1024, "router_skew": 0.0, "max_shard_size": None, "dtype": "float32",
    "quantization": None, "weight_block_size": (128, 128),
}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'150000', '150KB', '1.5MiB' → bytes (KB = 1000 bytes, KiB = 1024, as in huggingface_hub)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or a unit: KB, MB, GB, KiB, MiB, GiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return size


def parse_block_size(text: str) -> tuple[int, int]:
    """'128,128' → (128, 128)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"not a block size: {text!r} (use two positive integers: N,K)")
    return int(parts[0]), int(parts[1])


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random MoE model (Hugging Face format) for tests and local serving",
        description="Write a tiny random mixture-of-experts model in the exact Hugging Face layout "
                    "(config.json, generation_config.json, safetensors with the published tensor names, "
                    "a byte-level BPE tokenizer). Same options give byte-identical files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    p.add_argument("dir", metavar="DIR", help="output directory (created; model files in it are replaced)")
    p.add_argument("--arch", default=d["arch"], choices=["qwen3_moe", "deepseek_v3", "deepseek_v2", "mixtral",
                                                         "glm4_moe", "gpt_oss"],
                   help="model architecture; deepseek_v3 and deepseek_v2 derive their latent-attention sizes from "
                        "--head-dim (a multiple of 4) and make the first layer dense (epserve/tiny_deepseek.py); "
                        "glm4_moe also needs a --head-dim multiple of 4 and makes the first layer dense "
                        "(epserve/tiny_gqa_moe.py); gpt_oss: epserve/tiny_gpt_oss.py")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed for every random tensor")
    p.add_argument("--num-layers", type=int, default=d["num_layers"], help="decoder layers (all MoE)")
    p.add_argument("--num-experts", type=int, default=d["num_experts"], help="routed experts per layer (E)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="experts per token (num_experts_per_tok)")
    p.add_argument("--hidden-size", type=int, default=d["hidden_size"], help="model width (D)")
    p.add_argument("--moe-intermediate-size", type=int, default=d["moe_intermediate_size"],
                   help="width of each expert's SwiGLU MLP")
    p.add_argument("--num-attention-heads", type=int, default=d["num_attention_heads"], help="query heads")
    p.add_argument("--num-key-value-heads", type=int, default=d["num_key_value_heads"],
                   help="key/value heads (GQA); must divide --num-attention-heads")
    p.add_argument("--head-dim", type=int, default=d["head_dim"], help="per-head width (even)")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                   help="embedding rows; the tokenizer is trained to this size (it stops at ~2000 tokens "
                        "on the shipped corpus, leaving padding rows beyond that, as Qwen's models have)")
    p.add_argument("--router-skew", type=float, default=d["router_skew"],
                   help="Zipf exponent S of expert load: the r-th hottest expert of a layer gets a share of "
                        "top-k assignments ~ r^-S (capped at 1/top-k) on the shipped corpus; 0 = uniform; the "
                        "hot experts differ per layer")
    p.add_argument("--max-shard-size", type=parse_size, default=d["max_shard_size"],
                   help="split weights into model-0000i-of-0000N.safetensors files of at most this size plus "
                        "model.safetensors.index.json (bytes, or with a unit: 200KB, 5MiB); default: one file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d["dtype"], help="stored weight dtype")
    p.add_argument("--quantization", choices=["fp8"], default=d["quantization"],
                   help="fp8: store every Linear projection's weight FP8 block-quantized as DeepSeek-V3 ships them "
                        "(float8_e4m3fn + float32 <name>_scale_inv per --weight-block-size block, a "
                        "quantization_config in config.json); --arch deepseek_v3 only")
    p.add_argument("--weight-block-size", type=parse_block_size, default=d["weight_block_size"], metavar="N,K",
                   help="with --quantization: rows and columns of each quantization block")
    return p


def run(args: argparse.Namespace) -> int:
    from epserve.tiny_model import make_tiny_model

    try:
        out = make_tiny_model(
            args.dir, arch=args.arch, seed=args.seed, num_layers=args.num_layers, num_experts=args.num_experts,
            top_k=args.top_k, hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
            num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
            head_dim=args.head_dim, vocab_size=args.vocab_size, router_skew=args.router_skew,
            max_shard_size=args.max_shard_size, dtype=args.dtype, quantization=args.quantization,
            weight_block_size=args.weight_block_size)
    except ValueError as exc:
        print(f"epserve make-tiny-model: error: {exc}", file=sys.stderr)
        return 2
    assert out.is_dir()
    return 0
