"""What the placement service needs to know about the model: its MoE layers and experts.

Read from the HuggingFace ``config.json`` in ``--model-path``; no weights are opened. The
fingerprint is the one workers compute too (``epserve.placement_client.model_fingerprint``),
so a worker started on another model is refused at registration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from epserve.model_config import EXPERT_WIDTH_IS_INTERMEDIATE_SIZE, NUM_EXPERTS_KEYS, moe_layer_indices
from epserve.placement_client import model_fingerprint

# model_type values whose MoE layers follow Qwen's rule (decoder_sparse_step, mlp_only_layers; Mixtral and
# GPT-OSS have neither: every layer).
QWEN_STYLE = ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")
# model_type values whose MoE layers follow DeepSeek's rule (first_k_dense_replace, moe_layer_freq).
DEEPSEEK_STYLE = ("deepseek_v2", "deepseek_v3", "glm4_moe")
SUPPORTED_MODEL_TYPES = (*QWEN_STYLE, *DEEPSEEK_STYLE)


@dataclass(frozen=True)
class ModelInfo:
    """moe_layers: indices of the decoder layers that hold routed experts (L = len(moe_layers))."""

    model_type: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int  # E, routed (logical) experts per MoE layer
    fingerprint: str
    hidden_size: int = 0  # D (0 when config.json does not say)
    moe_intermediate_size: int = 0  # I, per routed expert (0 when config.json does not say)
    num_groups: int = 0  # G, expert groups of group-limited routing (DeepSeek's n_group; 0 = none)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def snapshot_name(self) -> str:
        """The model identity written into exported snapshots and checked on import."""
        return f"{self.model_type}:{self.fingerprint}"

    def expert_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one routed expert's weights: gate, up and down projections, 3 * D * I elements."""
        return 3 * self.hidden_size * self.moe_intermediate_size * dtype_bytes

    @classmethod
    def read(cls, model_path: str | Path, load_format: str = "auto") -> ModelInfo:
        """``load_format``: the workers' ``--load-format`` (dummy weights have their own fingerprint)."""
        config_path = Path(model_path) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--model-path {model_path}: no config.json there; point it at a "
                             "HuggingFace model directory")
        config = json.loads(config_path.read_text())
        return cls.from_config(config, model_fingerprint(model_path, load_format))

    @classmethod
    def from_config(cls, config: dict, fingerprint: str) -> ModelInfo:
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        num_hidden_layers = _positive(config, "num_hidden_layers")
        num_experts = _positive(config, NUM_EXPERTS_KEYS.get(model_type, "num_experts"))
        moe_layers = moe_layer_indices(config, num_hidden_layers, num_experts)
        if not moe_layers:
            raise ValueError("config.json describes no MoE layers (check decoder_sparse_step, "
                             "mlp_only_layers / first_k_dense_replace); placement needs at least one")
        num_groups = 0
        if model_type == "deepseek_v3":     # transformers' DeepseekV3Config assumes 8 when the key is missing
            num_groups = config.get("n_group", 8) or 0
        elif model_type == "deepseek_v2" and config.get("topk_method") == "group_limited_greedy":
            num_groups = config.get("n_group") or 0
        elif model_type == "glm4_moe":      # GLM-4.5's n_group is 1: no groups to keep whole
            num_groups = config.get("n_group", 1) or 0
            num_groups = num_groups if isinstance(num_groups, int) and num_groups > 1 else 0
        expert_width = "moe_intermediate_size"
        if model_type in EXPERT_WIDTH_IS_INTERMEDIATE_SIZE:
            expert_width = "intermediate_size"
        return cls(model_type, num_hidden_layers, moe_layers, num_experts, fingerprint,
                   _optional_size(config, "hidden_size"), _optional_size(config, expert_width),
                   num_groups if isinstance(num_groups, int) and num_groups > 0 else 0)


def _optional_size(config: dict, key: str) -> int:
    value = config.get(key, 0)
    return value if isinstance(value, int) and value > 0 else 0


def _positive(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json field {key} must be a positive integer, got {value!r}")
    return value
