"""Model specifications read from a Hugging Face ``config.json``, with validation.

``ModelSpec`` holds what every process needs to know about the model: shapes, which
decoder layers are MoE layers, routing settings. ``load_model_spec(dir)`` reads and validates;
errors name the field and say what to change. ``check_parallel_sizes`` enforces SGLang's
EP sizing rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe"}


class ModelConfigError(ValueError):
    """A model directory or config.json that epserve cannot serve; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    model_path: str
    architecture: str          # HF class name, e.g. Qwen3MoeForCausalLM
    model_type: str            # e.g. qwen3_moe
    vocab_size: int
    hidden_size: int
    intermediate_size: int     # dense MLP layers (mlp_only_layers)
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]  # decoder layer indices that have routed experts
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` among the MoE layers (the L index of expert maps)."""
        return self.moe_layers.index(layer)


DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def moe_layer_indices(config: dict, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Decoder layers with routed experts, by the model family's rule (the one definition used by
    every process). DeepSeek: ``first_k_dense_replace`` dense layers first, then every
    ``moe_layer_freq``-th. Qwen-MoE (and Mixtral, which has neither key): every
    ``decoder_sparse_step``-th layer not in ``mlp_only_layers``. ValueError names a bad field."""
    if num_experts <= 0:
        return ()
    if config.get("model_type") in DEEPSEEK_MODEL_TYPES or "first_k_dense_replace" in config:
        first_dense = int(config.get("first_k_dense_replace", 0))
        freq = int(config.get("moe_layer_freq", 1))
        if freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {freq}")
        return tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
    step = int(config.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    mlp_only = set(config.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)


def _require(config: dict, key: str, path: Path):
    if key not in config:
        raise ModelConfigError(f"{path}: config.json has no '{key}' field; it is required for "
                               f"{config.get('architectures', ['?'])[0]}")
    return config[key]


def _eos_ids(config: dict, model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (model_dir / "generation_config.json", None):
        data = json.loads(source.read_text()) if source is not None and source.exists() else config
        value = data.get("eos_token_id")
        if value is not None:
            ids.extend(value if isinstance(value, list) else [value])
        if ids:
            break
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_model_spec(model_path: str | Path) -> ModelSpec:
    model_dir = Path(model_path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json; pass --model-path a Hugging Face model "
                               "directory (make one with `epserve make-tiny-model DIR`)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{config_file} is not valid JSON: {exc}") from exc
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelConfigError(f"{config_file}: architecture {architectures or config.get('model_type')} is not "
                               f"supported; supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}")
    architecture = supported[0]
    get = lambda key: _require(config, key, config_file)  # noqa: E731
    num_layers = int(get("num_hidden_layers"))
    num_heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    num_experts = int(get("num_experts"))
    try:
        moe_layers = moe_layer_indices(config, num_layers, num_experts)
    except ValueError as exc:
        raise ModelConfigError(f"{config_file}: {exc}") from exc
    rope_params = config.get("rope_parameters") or {}
    rope_theta = float(rope_params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ModelConfigError(f"{config_file}: only default RoPE is supported, got "
                               f"{rope_params or config.get('rope_scaling')}")
    spec = ModelSpec(
        model_path=str(model_dir),
        architecture=architecture,
        model_type=SUPPORTED_ARCHITECTURES[architecture],
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size", 0)),
        moe_intermediate_size=int(get("moe_intermediate_size")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(config.get("num_key_value_heads", num_heads)),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        max_position_embeddings=int(get("max_position_embeddings")),
        rope_theta=rope_theta,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        num_experts=num_experts,
        num_experts_per_tok=int(get("num_experts_per_tok")),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        moe_layers=moe_layers,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(config, model_dir),
        bos_token_id=config.get("bos_token_id"),
    )
    _validate(spec, config_file)
    return spec


def _validate(spec: ModelSpec, where: Path) -> None:
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ModelConfigError(f"{where}: num_attention_heads ({spec.num_attention_heads}) must be a multiple "
                               f"of num_key_value_heads ({spec.num_key_value_heads})")
    if not 1 <= spec.num_experts_per_tok <= spec.num_experts:
        raise ModelConfigError(f"{where}: num_experts_per_tok ({spec.num_experts_per_tok}) must be in "
                               f"[1, num_experts={spec.num_experts}]")
    if spec.head_dim % 2:
        raise ModelConfigError(f"{where}: head_dim ({spec.head_dim}) must be even for RoPE")
    if spec.intermediate_size <= 0 and spec.num_moe_layers < spec.num_hidden_layers:
        raise ModelConfigError(f"{where}: dense layers exist (mlp_only_layers / decoder_sparse_step) but "
                               "intermediate_size is missing")


def check_parallel_sizes(spec: ModelSpec, tp_size: int, ep_size: int) -> None:
    """SGLang's expert-parallel sizing rules, as errors that say what to change."""
    if tp_size < 1 or ep_size < 1:
        raise ModelConfigError(f"--tp-size ({tp_size}) and --ep-size ({ep_size}) must be >= 1")
    if tp_size % ep_size:
        raise ModelConfigError(f"--tp-size ({tp_size}) must be a multiple of --ep-size ({ep_size}); "
                               f"use an --ep-size that divides {tp_size}")
    moe_tp = tp_size // ep_size
    if spec.moe_intermediate_size % moe_tp:
        raise ModelConfigError(
            f"moe_intermediate_size ({spec.moe_intermediate_size}) must be divisible by "
            f"--tp-size / --ep-size = {moe_tp}; choose --ep-size so that tp_size / ep_size divides it")
