"""Model specifications read from a Hugging Face ``config.json``, with validation.

``ModelSpec`` holds what every process needs to know about the model: shapes, which
decoder layers are MoE layers, routing settings, and the model's fingerprint. Workers, the
gateway and placement all read it with ``load_model_spec(dir, load_format)``, so they accept and
refuse the same models; errors name the field and say what to change. ``model_fingerprint`` is
the one definition of "the same model" (placement refuses a worker whose fingerprint differs).
``check_parallel_sizes`` enforces SGLang's EP sizing rules.

Quantized checkpoints: FP8 block-quantized ones as DeepSeek-V3 ships them (``quantization_config``
with ``quant_method`` "fp8", ``fmt`` "e4m3", ``weight_block_size`` [n, k]; ``BlockQuantization``) are
read and dequantized to the model dtype by ``epserve/weights.py``; every other ``quant_method`` is
refused with a message naming what is supported.

Families: Qwen3-MoE (GQA attention, softmax top-k), DeepSeek-V3 (multi-head latent attention,
``MlaSpec``; YaRN RoPE, ``RopeScaling``; sigmoid grouped top-k with a correction bias and shared
experts, ``RoutingSpec``), DeepSeek-V2/V2-Lite (MLA with or without ``q_lora_rank``, softmax
scores, greedy or group-limited greedy top-k), Mixtral (GQA without q/k norms, renormalised softmax
top-k, optional sliding window, ``block_sparse_moe`` expert names: ``ExpertNames``), GLM-4-MoE
(GQA with q/k/v biases, optional q/k norms and partial rotary; DeepSeek-V3's routing, shared
experts and dense first layers) and GPT-OSS (GQA with biases and attention sinks, sliding-window
and full layers alternating, YaRN; a biased router whose top-k logits are softmaxed; experts with
biases and a clamped SwiGLU). The family's fields stay at their neutral defaults for other
families. Keys missing from a DeepSeek, Mixtral, GLM-4-MoE or GPT-OSS config.json take
transformers' defaults.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
                           "DeepseekV2ForCausalLM": "deepseek_v2", "MixtralForCausalLM": "mixtral",
                           "Glm4MoeForCausalLM": "glm4_moe", "GptOssForCausalLM": "gpt_oss"}
ROPE_STYLES = ("interleave", "rotate_half", "complex")


class ModelConfigError(ValueError):
    """A model directory or config.json that epserve cannot serve; the message says why."""


@dataclass(frozen=True)
class MlaSpec:
    """Multi-head latent attention (DeepSeek-V2/V3). Per token the cache holds the normed latent
    (``kv_lora_rank``) and the shared rotary key (``qk_rope_head_dim``)."""

    q_lora_rank: int | None      # None: one q_proj (V2-Lite); else q_a_proj → norm → q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # how the rotary part turns (ROPE_STYLES): DeepSeek-V3 "interleave" (pairs (x0, x1), (x2, x3), ...,
    # config rope_interleave, the default) or "rotate_half"; DeepSeek-V2 "complex" (the same pairs as
    # complex numbers, in float32 whatever the dtype, as transformers' DeepseekV2 computes them)
    rope_style: str

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RopeScaling:
    """YaRN (the only scaling supported), with transformers' defaults for missing keys."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class RoutingSpec:
    """How router logits become top-k choices. Qwen: softmax, greedy. DeepSeek-V3: sigmoid
    scores, ``noaux_tc`` (selection on scores + ``e_score_correction_bias``, inside the
    ``topk_group`` best of ``n_group`` groups). Weights are scaled by ``routed_scaling_factor``."""

    scoring_func: str = "softmax"            # softmax | sigmoid
    # greedy | group_limited_greedy | noaux_tc | topk_softmax (GPT-OSS: top-k of the logits, softmax over those)
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class ExpertNames:
    """Where a routed expert's tensors sit in a checkpoint: per expert
    ``model.layers.{layer}.{prefix}.{e}.{gate|up|down}.weight``, or fused ``{prefix}.gate_up_proj``
    [E, 2I, D] and ``{prefix}.down_proj`` [E, D, I]."""

    prefix: str = "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def per_expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) tensor names of one expert."""
        p = f"model.layers.{layer}.{self.prefix}.{expert}"
        return f"{p}.{self.gate}.weight", f"{p}.{self.up}.weight", f"{p}.{self.down}.weight"

    def fused(self, layer: int) -> tuple[str, str]:
        """(gate_up, down) names of a layer's experts stored as one tensor each."""
        p = f"model.layers.{layer}.{self.prefix}"
        return f"{p}.gate_up_proj", f"{p}.down_proj"


@dataclass(frozen=True)
class BlockQuantization:
    """FP8 block quantization (DeepSeek-V3's release): each quantized Linear weight [N, K] is stored as
    float8_e4m3fn with a float32 ``<name>_scale_inv`` [ceil(N / n), ceil(K / k)]; value = weight * scale_inv
    of its (n, k) block. epserve dequantizes at load time (no FP8 kernels yet)."""

    weight_block_size: tuple[int, int]     # (n, k): rows (output features) and columns (input features) per block
    fmt: str = "e4m3"


SUPPORTED_QUANTIZATION = ('FP8 block-quantized checkpoints (quant_method "fp8", fmt "e4m3", weight_block_size '
                          '[n, k], as DeepSeek-V3 ships them; dequantized to --dtype at load time)')


MIXTRAL_EXPERT_NAMES = ExpertNames("block_sparse_moe.experts", "w1", "w3", "w2")


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
    mla: MlaSpec | None = None               # multi-head latent attention (DeepSeek); None = GQA
    rope_scaling: RopeScaling | None = None  # None = default RoPE
    routing: RoutingSpec = RoutingSpec()
    n_shared_experts: int = 0                # always-on experts of every MoE layer (DeepSeek, GLM)
    qk_norm: bool = True                     # per-head RMSNorm of q and k before RoPE (Qwen3; GLM's use_qk_norm)
    attention_bias: bool = False             # q/k/v projections carry biases (GLM)
    partial_rotary_factor: float = 1.0       # share of each head's leading dims RoPE turns (GLM: 0.5)
    sliding_window: int | None = None        # a token sees the last this many positions (Mixtral); None = all
    full_attention_layers: tuple[int, ...] = ()  # layers that ignore sliding_window (GPT-OSS's full_attention)
    attention_sinks: bool = False            # a learnt per-head logit joins each softmax (GPT-OSS)
    expert_bias: bool = False                # routed experts' projections carry biases (GPT-OSS)
    swiglu_alpha: float | None = None        # GPT-OSS's clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha g),
    swiglu_limit: float | None = None        # g = min(gate, limit); None: silu(gate) * up
    expert_names: ExpertNames = ExpertNames()
    quantization: BlockQuantization | None = None   # FP8 block-quantized checkpoint; None = float weights
    pad_token_id: int | None = None
    fingerprint: str = ""                    # model_fingerprint of config.json and the load format

    @property
    def num_expert_groups(self) -> int:
        """G, the expert groups of group-limited routing (DeepSeek's and GLM's ``n_group``; 0 = none):
        hierarchical EPLB keeps each group's experts on one node."""
        grouped = self.routing.topk_method in ("group_limited_greedy", "noaux_tc")
        return self.routing.n_group if grouped and self.routing.n_group > 1 else 0

    @property
    def snapshot_name(self) -> str:
        """The model identity written into exported expert-map snapshots and checked on import."""
        return f"{self.model_type}:{self.fingerprint}"

    def expert_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one routed expert's weights: gate, up and down projections, 3 * D * I elements."""
        return 3 * self.hidden_size * self.moe_intermediate_size * dtype_bytes

    def attention_window(self, layer: int) -> int | None:
        """Positions decoder layer ``layer`` attends to (None = the whole context)."""
        return None if layer in self.full_attention_layers else self.sliding_window

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each q/k head that RoPE turns (transformers: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` among the MoE layers (the L index of expert maps)."""
        return self.moe_layers.index(layer)


DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# first_k_dense_replace when config.json lacks it (transformers' defaults); other families: no dense layers
FIRST_DENSE_DEFAULTS = {"deepseek_v3": 3, "deepseek_v2": 0, "glm4_moe": 1}
# the config.json key counting routed experts per MoE layer
NUM_EXPERTS_KEYS = {"deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
                    "glm4_moe": "n_routed_experts", "mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}
# families whose config.json calls the expert width intermediate_size
EXPERT_WIDTH_IS_INTERMEDIATE_SIZE = ("mixtral", "gpt_oss")


def moe_layer_indices(config: dict, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Decoder layers with routed experts, by the model family's rule (the one definition used by
    every process). DeepSeek and GLM-4-MoE: ``first_k_dense_replace`` dense layers first, then every
    ``moe_layer_freq``-th. Qwen-MoE (and Mixtral, which has neither key): every
    ``decoder_sparse_step``-th layer not in ``mlp_only_layers``. ValueError names a bad field."""
    if num_experts <= 0:
        return ()
    if config.get("model_type") in FIRST_DENSE_DEFAULTS or "first_k_dense_replace" in config:
        first_dense = int(config.get("first_k_dense_replace", FIRST_DENSE_DEFAULTS.get(config.get("model_type"), 0)))
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


def config_fingerprint(config: dict, load_format: str = "auto") -> str:
    """sha256 of a config.json's contents, canonicalized (key order and whitespace do not count),
    marked ``+dummy-weights`` for ``--load-format dummy``: random weights are another model than
    the checkpoint's, so placement refuses to mix them (its message shows both fingerprints)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f"{digest}+dummy-weights" if load_format == "dummy" else digest


def model_fingerprint(model_path: str | Path, load_format: str = "auto") -> str:
    """``config_fingerprint`` of ``model_path/config.json``."""
    return config_fingerprint(json.loads((Path(model_path) / "config.json").read_text()), load_format)


def load_model_spec(model_path: str | Path, load_format: str = "auto") -> ModelSpec:
    """``load_format``: the workers' ``--load-format`` (dummy weights have a fingerprint of their own)."""
    model_dir = Path(model_path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json; pass --model-path a Hugging Face model "
                               "directory (make one with `epserve make-tiny-model DIR`)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelConfigError(f"{config_file} must hold a JSON object")
    fingerprint = config_fingerprint(config, load_format)
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelConfigError(f"{config_file}: architecture {architectures or config.get('model_type')} is not "
                               f"supported; supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}")
    architecture = supported[0]
    model_type = SUPPORTED_ARCHITECTURES[architecture]
    deepseek = model_type in DEEPSEEK_MODEL_TYPES
    quantization = block_quantization(config, config_file)
    if quantization is not None and model_type == "gpt_oss":
        raise ModelConfigError(f"{config_file}: FP8 block-quantized GPT-OSS checkpoints are not supported (its fused "
                               "experts would need per-expert scales); use a bf16 checkpoint")
    # what transformers' DeepseekV2/V3Config, MixtralConfig, Glm4MoeConfig assume for missing keys
    # (model_type from the architecture when config.json lacks it)
    config = {**FAMILY_DEFAULTS.get(model_type, {}), "model_type": model_type, **config}
    if config.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{config_file}: hidden_act {config['hidden_act']!r} is not supported; the experts "
                               "and MLPs compute SwiGLU with silu")
    get = lambda key: _require(config, key, config_file)  # noqa: E731
    num_layers = int(get("num_hidden_layers"))
    num_heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    num_experts = int(get(NUM_EXPERTS_KEYS.get(model_type, "num_experts")))
    try:
        moe_layers = moe_layer_indices(config, num_layers, num_experts)
    except ValueError as exc:
        raise ModelConfigError(f"{config_file}: {exc}") from exc
    if deepseek:
        rope_theta, family = _deepseek_fields(config, config_file, get)
    elif model_type == "gpt_oss":
        rope_theta, family = _gpt_oss_fields(config, config_file)
    else:
        rope_params = config.get("rope_parameters") or {}
        rope_theta = float(rope_params.get("rope_theta", config.get("rope_theta", 10000.0)))
        if rope_params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
            raise ModelConfigError(f"{config_file}: only default RoPE is supported, got "
                                   f"{rope_params or config.get('rope_scaling')}")
        family = {"mixtral": _mixtral_fields, "glm4_moe": _glm4_moe_fields}.get(model_type, lambda _: {})(config)
    fields = dict(
        model_path=str(model_dir),
        architecture=architecture,
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size", 0)),
        moe_intermediate_size=int(get("intermediate_size" if model_type in EXPERT_WIDTH_IS_INTERMEDIATE_SIZE
                                      else "moe_intermediate_size")),
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
        pad_token_id=config.get("pad_token_id"),
        quantization=quantization,
        fingerprint=fingerprint,
    )
    spec = ModelSpec(**{**fields, **family})
    _validate(spec, config_file)
    return spec


def block_quantization(config: dict, where: Path | str) -> BlockQuantization | None:
    """config.json's ``quantization_config`` → ``BlockQuantization`` (None when absent); ModelConfigError
    for any other quantization, naming what is supported."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if method != "fp8":
        raise ModelConfigError(f"{where}: quantized checkpoints ({method}) are not supported; "
                               f"epserve reads {SUPPORTED_QUANTIZATION}. Use a bf16 checkpoint of this model")
    fmt = quant.get("fmt", "e4m3")
    block = quant.get("weight_block_size")
    problem = None
    if fmt != "e4m3":
        problem = f"fmt {fmt!r} (only e4m3 is read)"
    elif block is None:
        problem = "no weight_block_size (per-tensor FP8 scales are not read)"
    elif not (isinstance(block, list | tuple) and len(block) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        problem = f"weight_block_size {block!r} (two positive integers expected)"
    elif quant.get("activation_scheme", "dynamic") != "dynamic":
        problem = f"activation_scheme {quant.get('activation_scheme')!r} (only dynamic: no activation scales)"
    if problem:
        raise ModelConfigError(f"{where}: FP8 checkpoint with {problem} is not supported; epserve reads "
                               f"{SUPPORTED_QUANTIZATION}")
    return BlockQuantization(weight_block_size=(int(block[0]), int(block[1])), fmt=fmt)


# transformers' DeepseekV2Config / DeepseekV3Config defaults: a config.json without these keys means these
DEEPSEEK_V2_DEFAULTS = {
    "n_shared_experts": 2, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": None, "topk_group": None,
    "topk_method": "greedy", "first_k_dense_replace": 0, "norm_topk_prob": False, "intermediate_size": 11008,
    "moe_intermediate_size": 1407, "max_position_embeddings": 2048, "n_routed_experts": 64,
}
DEEPSEEK_V3_DEFAULTS = {
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "rope_interleave": True,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "max_position_embeddings": 4096,
}


MIXTRAL_DEFAULTS = {
    "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
}
GLM4_MOE_DEFAULTS = {
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "use_qk_norm": False, "attention_bias": False,
}
GPT_OSS_DEFAULTS = {
    "num_local_experts": 128, "num_experts_per_tok": 4, "intermediate_size": 2880, "head_dim": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
    "max_position_embeddings": 131072, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": True,
}
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
FAMILY_DEFAULTS = {"deepseek_v2": DEEPSEEK_V2_DEFAULTS, "deepseek_v3": DEEPSEEK_V3_DEFAULTS,
                   "mixtral": MIXTRAL_DEFAULTS, "glm4_moe": GLM4_MOE_DEFAULTS, "gpt_oss": GPT_OSS_DEFAULTS}


def _mixtral_fields(config: dict) -> dict:
    """Mixtral: no q/k norms, the top-k softmax weights always renormalised (transformers' MixtralTopKRouter),
    ``block_sparse_moe`` names; a sliding window no shorter than the positions has no effect."""
    window = config.get("sliding_window")
    window = int(window) if window and int(window) < int(config["max_position_embeddings"]) else None
    return dict(norm_topk_prob=True, qk_norm=False, sliding_window=window, expert_names=MIXTRAL_EXPERT_NAMES)


def _glm4_moe_fields(config: dict) -> dict:
    """GLM-4-MoE: DeepSeek-V3's routing (sigmoid scores, correction bias, groups), shared experts, dense first
    layers; q/k/v biases (``attention_bias``), q/k norms (``use_qk_norm``), RoPE on the leading
    ``partial_rotary_factor`` of each head (transformers' default 0.5; also read from ``rope_parameters``)."""
    rope_params = config.get("rope_parameters") or {}
    routing = RoutingSpec(scoring_func="sigmoid", topk_method="noaux_tc", n_group=int(config["n_group"] or 1),
                          topk_group=int(config["topk_group"] or 1),
                          routed_scaling_factor=float(config["routed_scaling_factor"] or 1.0))
    return dict(routing=routing, n_shared_experts=int(config["n_shared_experts"] or 0),
                qk_norm=bool(config["use_qk_norm"]), attention_bias=bool(config["attention_bias"]),
                partial_rotary_factor=float(rope_params.get("partial_rotary_factor",
                                                            config.get("partial_rotary_factor", 0.5))))


def _gpt_oss_fields(config: dict, where: Path) -> tuple[float, dict]:
    """(rope_theta, the GPT-OSS fields): attention sinks, ``layer_types`` (transformers' default: sliding
    windows on even layers, full attention on odd ones), YaRN (transformers' default when the config has
    no rope parameters), the biased router (top-k logits, then softmax), biased clamped-SwiGLU experts."""
    if not config["attention_bias"]:
        raise ModelConfigError(f"{where}: attention_bias false is not supported for GPT-OSS (its checkpoints have "
                               "q/k/v/o biases)")
    num_layers = int(config["num_hidden_layers"])
    layer_types = config.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                                for i in range(num_layers)]
    if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ModelConfigError(f"{where}: layer_types must list sliding_attention or full_attention for each of the "
                               f"{num_layers} layers, got {layer_types}")
    if not (config.get("rope_scaling") or config.get("rope_parameters")):
        config = {**config, "rope_scaling": GPT_OSS_YARN}
    rope_theta, rope_scaling = _rope_scaling(config, where)
    window = config.get("sliding_window")
    return rope_theta, dict(
        routing=RoutingSpec(scoring_func="softmax", topk_method="topk_softmax"), rope_scaling=rope_scaling,
        qk_norm=False, attention_bias=True, attention_sinks=True, sliding_window=int(window) if window else None,
        full_attention_layers=tuple(i for i, kind in enumerate(layer_types) if kind == "full_attention"),
        expert_bias=True, swiglu_alpha=float(config["swiglu_alpha"]), swiglu_limit=float(config["swiglu_limit"]))


def _deepseek_fields(config: dict, where: Path, get) -> tuple[float, dict]:
    """(rope_theta, the ModelSpec fields of the DeepSeek family) from a DeepSeek-V2/V3 config.json. The
    routing is what transformers computes for the version (it ignores ``scoring_func``)."""
    v3 = config["model_type"] == "deepseek_v3"
    scoring = "sigmoid" if v3 else "softmax"
    method = config.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    allowed = ("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")
    if config.get("scoring_func", scoring) != scoring or method not in allowed:
        raise ModelConfigError(f"{where}: {config['architectures'][0]} routes with scoring_func {scoring!r} and "
                               f"topk_method {' or '.join(map(repr, allowed))} (as transformers does); got "
                               f"{config.get('scoring_func')!r}, {method!r}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ModelConfigError(f"{where}: {key} true is not supported (DeepSeek checkpoints have no biases)")
    q_lora_rank = config.get("q_lora_rank")
    rope_style = ("interleave" if config.get("rope_interleave", True) else "rotate_half") if v3 else "complex"
    mla = MlaSpec(q_lora_rank=int(q_lora_rank) if q_lora_rank else None, kv_lora_rank=int(get("kv_lora_rank")),
                  qk_nope_head_dim=int(get("qk_nope_head_dim")), qk_rope_head_dim=int(get("qk_rope_head_dim")),
                  v_head_dim=int(get("v_head_dim")), rope_style=rope_style)
    grouped = method != "greedy"
    routing = RoutingSpec(scoring_func=scoring, topk_method=method,
                          n_group=int(config.get("n_group") or 1) if grouped else 1,
                          topk_group=int(config.get("topk_group") or 1) if grouped else 1,
                          routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0))
    rope_theta, rope_scaling = _rope_scaling(config, where)
    return rope_theta, dict(mla=mla, routing=routing, rope_scaling=rope_scaling,
                            n_shared_experts=int(config.get("n_shared_experts") or 0),
                            num_key_value_heads=int(get("num_attention_heads")),   # K/V expand to every head
                            head_dim=mla.qk_rope_head_dim)                        # the rotary width, as transformers


def _rope_scaling(config: dict, where: Path) -> tuple[float, RopeScaling | None]:
    """(rope_theta, YaRN parameters or None) as transformers reads them (``rope_scaling`` wins over
    ``rope_parameters``; a top-level ``original_max_position_embeddings`` wins over the dict's)."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ModelConfigError(f"{where}: rope scaling {kind!r} is not supported; supported: default, yarn")
    original = int(config.get("original_max_position_embeddings")
                   or params.get("original_max_position_embeddings") or config["max_position_embeddings"])
    factor = params.get("factor")
    optional = lambda key: None if params.get(key) is None else float(params[key])  # noqa: E731
    return theta, RopeScaling(
        factor=float(factor) if factor is not None else config["max_position_embeddings"] / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"),
        attention_factor=optional("attention_factor"), truncate=bool(params.get("truncate", True)))


def _validate_deepseek(spec: ModelSpec, where: Path) -> None:
    mla = spec.mla
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if getattr(mla, name) < 1:
            raise ModelConfigError(f"{where}: {name} must be >= 1, got {getattr(mla, name)}")
    if mla.qk_rope_head_dim % 2:
        raise ModelConfigError(f"{where}: qk_rope_head_dim ({mla.qk_rope_head_dim}) must be even for RoPE")


def _validate_routing(spec: ModelSpec, where: Path) -> None:
    """Expert groups and shared experts (DeepSeek, GLM-4-MoE)."""
    routing, num_experts = spec.routing, spec.num_experts
    if routing.n_group < 1 or num_experts % routing.n_group:
        raise ModelConfigError(f"{where}: n_group ({routing.n_group}) must divide n_routed_experts ({num_experts})")
    per_group = num_experts // routing.n_group
    if per_group < 2 and routing.topk_method == "noaux_tc":
        raise ModelConfigError(f"{where}: each of the n_group={routing.n_group} groups needs at least 2 experts "
                               "(a group scores the sum of its top two)")
    if not 1 <= routing.topk_group <= routing.n_group:
        raise ModelConfigError(f"{where}: topk_group ({routing.topk_group}) must be in [1, n_group={routing.n_group}]")
    if spec.num_experts_per_tok > routing.topk_group * per_group:
        raise ModelConfigError(f"{where}: num_experts_per_tok ({spec.num_experts_per_tok}) exceeds the "
                               f"{routing.topk_group * per_group} experts of the topk_group={routing.topk_group} "
                               "kept groups")
    if spec.n_shared_experts < 0:
        raise ModelConfigError(f"{where}: n_shared_experts must be >= 0, got {spec.n_shared_experts}")


def _validate(spec: ModelSpec, where: Path) -> None:
    if spec.vocab_size < 1:
        raise ModelConfigError(f"{where}: vocab_size must be >= 1, got {spec.vocab_size}")
    if spec.max_position_embeddings < 2:
        raise ModelConfigError(f"{where}: max_position_embeddings (the context length) must be >= 2, got "
                               f"{spec.max_position_embeddings}")
    if spec.mla is not None:
        _validate_deepseek(spec, where)
    if spec.mla is not None or spec.routing.topk_method in ("group_limited_greedy", "noaux_tc"):
        _validate_routing(spec, where)
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
    if spec.rotary_dim < 2 or spec.rotary_dim % 2 or spec.rotary_dim > spec.head_dim:
        raise ModelConfigError(f"{where}: partial_rotary_factor ({spec.partial_rotary_factor}) must turn an even "
                               f"number of dims in [2, head_dim={spec.head_dim}], got {spec.rotary_dim}")
    if spec.sliding_window is not None and spec.sliding_window < 1:
        raise ModelConfigError(f"{where}: sliding_window must be >= 1 or null, got {spec.sliding_window}")


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
    if spec.quantization is not None:
        _check_block_divisibility(spec, tp_size, ep_size)


def _check_block_divisibility(spec: ModelSpec, tp_size: int, ep_size: int) -> None:
    """SGLang's rule for block-quantized MoE checkpoints: each MoE tensor-parallel rank's share of
    ``moe_intermediate_size`` is whole blocks. SGLang checks the block's rows (weight_block_size[0]: gate/up
    are cut along their rows); the down projection is cut along its columns, so weight_block_size[1] too."""
    moe_tp = tp_size // ep_size
    share = spec.moe_intermediate_size // moe_tp
    block = spec.quantization.weight_block_size
    for size, what in zip(block, ("rows", "columns")):
        if share % size:
            raise ModelConfigError(
                f"FP8 block-quantized checkpoint (weight_block_size {list(block)}): moe_intermediate_size "
                f"({spec.moe_intermediate_size}) / moe_tp_size ({moe_tp}) = {share} must be divisible by the "
                f"block's {what} ({size}), where moe_tp_size = --tp-size ({tp_size}) / --ep-size ({ep_size}); "
                "choose --tp-size and --ep-size so that it is, or use a bf16 checkpoint")
