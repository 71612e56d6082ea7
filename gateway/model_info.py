"""What the gateway needs to know about the model, read once from a Hugging Face model directory:
config.json (architecture, vocab size, context length, MoE shape) and generation_config.json
(EOS ids; config.json's when that file is absent or has none)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from epserve.model_config import moe_layer_indices


@dataclass(frozen=True)
class ModelInfo:
    model_path: str
    architecture: str
    vocab_size: int               # rows of the embedding; valid token ids are [0, vocab_size)
    max_context_length: int       # max_position_embeddings
    eos_token_ids: tuple[int, ...]
    num_moe_layers: int
    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"{self.model_path}/config.json: vocab_size must be >= 1, got {self.vocab_size}")
        if self.max_context_length < 2:
            raise ValueError(f"{self.model_path}/config.json: max_position_embeddings must be >= 2, "
                             f"got {self.max_context_length}")


def _read_json(path: Path) -> dict:
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def load_model_info(model_path: str | Path) -> ModelInfo:
    path = Path(model_path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model-path {path}: no config.json there")
    config = _read_json(config_path)
    config = config.get("text_config", config) if "vocab_size" not in config else config
    if "max_position_embeddings" not in config:
        raise ValueError(f"{config_path}: max_position_embeddings is missing (the gateway's context limit)")
    generation_path = path / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    eos = _ids(generation.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    num_experts = int(config.get("num_experts") or config.get("n_routed_experts")
                      or config.get("num_local_experts") or 0)
    architectures = config.get("architectures") or [config.get("model_type", "")]
    return ModelInfo(
        model_path=str(path),
        architecture=str(architectures[0]),
        vocab_size=int(config["vocab_size"]),
        max_context_length=int(config["max_position_embeddings"]),
        eos_token_ids=eos,
        num_moe_layers=len(moe_layer_indices(config, int(config.get("num_hidden_layers", 0)), num_experts)),
        num_experts=num_experts,
        num_experts_per_tok=int(config.get("num_experts_per_tok", 0) or 0),
    )
