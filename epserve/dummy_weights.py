"""Dummy weights (``--load-format dummy``): random tensors drawn on the device, no checkpoint read.

Legend: V vocab, D hidden, H query heads, Hkv key/value heads, Dh head dim, E experts per MoE
layer, I MoE intermediate size, F dense intermediate size.

``DummyReader`` answers the calls the model loaders make on a ``CheckpointReader`` (``read``,
``read_experts`` with or without ``out=``, ``has``, ``progress``, ``tensors_read``) for the
tensors a Hub checkpoint of the model would hold (``checkpoint_shapes``: per-expert names,
``lm_head`` only when embeddings are untied, dense MLPs where ``mlp_only_layers`` /
``decoder_sparse_step`` say so). Only ``config.json`` is needed; no ``*.safetensors`` is opened.
``open_weights`` picks the reader for ``--load-format``; every loader goes through it.

Determinism: each tensor is drawn by its own generator on the destination's device, seeded
from (``DUMMY_SEED``, the tensor's checkpoint name), one ``normal_`` call per tensor. The same
name therefore gives the same values in every process, on every call, in any order, and an
expert's weights do not depend on the slot or worker holding it (replicas, live rebalancing).
Values are drawn in float32 into a contiguous buffer and then cast, so a bfloat16 (or float16,
float64) load is the cast of the float32 load. Values are equal across processes on the same
kind of device only: CPU and CUDA generators differ, and CUDA's depend on the GPU model (its
multiprocessor count sets the generator's launch grid), so keep a deployment's workers on one
kind of device (mixing CPU and GPU expert workers gives a replica different values on each).

FP8 block-quantized configs (``spec.quantization``): the tensors such a checkpoint stores in FP8
(``weights.is_block_quantized``) are drawn, quantized block-wise as DeepSeek does and dequantized again
(``quantize_fp8_blocks`` then ``dequantize_fp8_blocks``, in float32 before the cast), so they hold the
values a real FP8 checkpoint's loader produces.

Magnitudes (std 1/sqrt(fan_in), not the config's ``initializer_range``), chosen so a deep model
stays numerically sane in bfloat16; tests/epserve/test_dummy_weights.py checks them over 48
layers at a reduced width, which predicts the full width because fan-in scaling is width-free:
- matrices ``[out, in]`` that read the RMS-normed stream (q/k/v, router, expert and dense
  gate/up, lm_head) ~ N(0, 1/in): each output element has RMS ~1 whatever the width, so
  router logits are ~N(0, 1) per expert (a token's top-K weights are not uniform) and logits
  are ~N(0, 1). ``initializer_range`` (0.02) equals 1/sqrt(D) only near D = 2048; at reduced
  widths it would shrink every block, and the depth check would not predict the full model.
- matrices that write into the residual stream (``o_proj``, dense and expert ``down_proj``)
  ~ N(0, 1/(in * 2 * layers)) (GPT-2's scaled initialisation): 2 * layers blocks each add RMS
  ~1/sqrt(2 * layers), so the residual stays O(1) at any depth.
- token embeddings ~ N(0, 1): token identity is O(1) in the residual stream. With embeddings
  of RMS 1/sqrt(D) and unscaled block outputs (the plain 1/sqrt(fan_in) rule everywhere),
  random attention, which averages values over the context, adds a direction shared by all
  tokens at every layer; after ~10 layers every token's hidden state points the same way
  (cosine > 0.9) and all tokens route to the same K experts. With these rules the cosine
  between tokens stays ~0.01 after 48 layers and every expert gets a share of the routing.
  (With tied embeddings the lm_head is this N(0, 1) matrix too: logits of std sqrt(D).)
- RMSNorm weights (layer, final, q/k norms) ~ N(1, 0.1²): around 1, not all exactly 1.
- projection biases (GLM-4-MoE's q/k/v, GPT-OSS's) ~ N(0, 0.1²); DeepSeek's and GLM's router correction
  bias 0; GPT-OSS's attention sinks ~ N(0, 1); its fused experts [E, in, out] by fan-in ``in``, each
  expert (row) drawn by its own generator (``read_rows``).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from epserve.model_config import ExpertNames, ModelConfigError, ModelSpec
from epserve.weights import CheckpointReader, dequantize_fp8_blocks, is_block_quantized, quantize_fp8_blocks

LOAD_FORMATS = ("auto", "safetensors", "dummy")
LOAD_FORMAT_HELP = ("where weights come from: auto (default) and safetensors read the checkpoint's *.safetensors; "
                    "dummy draws random weights on --device from a fixed seed, deterministically per tensor name "
                    "(same values in every process), reading only config.json from --model-path (for benchmarks "
                    "and tests at real model sizes)")
DUMMY_SEED = 0
NORM_WEIGHT_STD = 0.1
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", ".w2.weight")   # matrices that write into the residual stream


def check_load_format(load_format: str) -> None:
    """ValueError naming ``--load-format`` for an unknown value."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format must be one of {LOAD_FORMATS}, got {load_format!r}")


def open_weights(model_path: str | Path, load_format: str, spec: ModelSpec,
                 show_progress: bool = True) -> CheckpointReader | DummyReader:
    """The weight reader for ``--load-format``: the checkpoint in ``model_path`` (auto, safetensors)
    or random tensors for ``spec`` (dummy; nothing in ``model_path`` is read)."""
    check_load_format(load_format)
    if load_format == "dummy":
        return DummyReader(spec, show_progress=show_progress)
    return CheckpointReader(model_path, show_progress=show_progress)


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every tensor in a Hub checkpoint of ``spec`` (Qwen3-MoE layout;
    the other families' from their model files)."""
    if spec.mla is not None:
        from epserve.models.deepseek_v3 import checkpoint_shapes as deepseek_shapes
        return deepseek_shapes(spec)
    if spec.model_type == "mixtral":
        from epserve.models.mixtral import checkpoint_shapes as mixtral_shapes
        return mixtral_shapes(spec)
    if spec.model_type == "glm4_moe":
        from epserve.models.glm4_moe import checkpoint_shapes as glm4_moe_shapes
        return glm4_moe_shapes(spec)
    if spec.model_type == "gpt_oss":
        from epserve.models.gpt_oss import checkpoint_shapes as gpt_oss_shapes
        return gpt_oss_shapes(spec)
    D, Dh, V = spec.hidden_size, spec.head_dim, spec.vocab_size
    q_dim, kv_dim = spec.num_attention_heads * Dh, spec.num_key_value_heads * Dh
    I, F = spec.moe_intermediate_size, spec.intermediate_size
    moe_layers = set(spec.moe_layers)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       f"{p}.self_attn.q_proj.weight": (q_dim, D), f"{p}.self_attn.k_proj.weight": (kv_dim, D),
                       f"{p}.self_attn.v_proj.weight": (kv_dim, D), f"{p}.self_attn.o_proj.weight": (D, q_dim),
                       f"{p}.self_attn.q_norm.weight": (Dh,), f"{p}.self_attn.k_norm.weight": (Dh,)})
        if i in moe_layers:
            shapes[f"{p}.mlp.gate.weight"] = (spec.num_experts, D)
            for e in range(spec.num_experts):
                q = f"{p}.mlp.experts.{e}"
                shapes.update({f"{q}.gate_proj.weight": (I, D), f"{q}.up_proj.weight": (I, D),
                               f"{q}.down_proj.weight": (D, I)})
        else:
            shapes.update({f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
                           f"{p}.mlp.down_proj.weight": (D, F)})
    return shapes


def tensor_seed(name: str, seed: int = DUMMY_SEED) -> int:
    """The generator seed of checkpoint tensor ``name``: stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def tensor_moments(name: str, shape: tuple[int, ...], num_layers: int) -> tuple[float, float]:
    """(mean, std) that checkpoint tensor ``name`` of ``shape`` is drawn with (module docstring)."""
    if name.endswith(".e_score_correction_bias"):        # DeepSeek's router bias: none
        return 0.0, 0.0
    if name.endswith((".bias", "_bias")):                # GLM's, GPT-OSS's biases: small
        return 0.0, NORM_WEIGHT_STD
    if name.endswith(".sinks"):                          # GPT-OSS's attention sinks: logits of order 1
        return 0.0, 1.0
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):   # GPT-OSS's fused [E, in, out] experts
        std = shape[-2] ** -0.5
        if name.endswith("down_proj"):
            std /= (2 * num_layers) ** 0.5
        return 0.0, std
    if len(shape) == 1:
        assert name.endswith("norm.weight"), f"no dummy rule for 1-D tensor {name}"
        return 1.0, NORM_WEIGHT_STD
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    std = shape[-1] ** -0.5
    if name.endswith(RESIDUAL_OUTPUTS):
        std /= (2 * num_layers) ** 0.5
    return 0.0, std


class DummyReader:
    """A ``CheckpointReader`` stand-in whose tensors are drawn, not read (see the module docstring)."""

    def __init__(self, spec: ModelSpec, seed: int = DUMMY_SEED, show_progress: bool = True) -> None:
        self.spec = spec
        self.model_dir = Path(spec.model_path)
        self.seed = seed
        self.show_progress = show_progress
        self.shapes = checkpoint_shapes(spec)
        self.tensors_read: list[str] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._lock = threading.Lock()          # one generator per device, reseeded per tensor

    def has(self, name: str) -> bool:
        return name in self.shapes

    def read(self, names: Iterable[str], dtype: torch.dtype, device: torch.device | str = "cpu",
             desc: str = "drawing dummy weights") -> dict[str, torch.Tensor]:
        """Draw whole tensors by name, in ``dtype`` on ``device``."""
        names = list(names)
        self._check_known(names)
        out: dict[str, torch.Tensor] = {}
        with self.progress(len(names), desc) as bar:
            for name in names:
                out[name] = self.draw_into(name, torch.empty(self.shapes[name], dtype=dtype, device=device))
                bar.update(1)
        return out

    def read_experts(self, layer: int, experts: Iterable[int], dtype: torch.dtype,
                     device: torch.device | str = "cpu", desc: str = "drawing dummy experts",
                     out: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     names: ExpertNames = ExpertNames()) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Decoder layer ``layer``'s experts → {expert: (w13 [2I, D], w2 [D, I])}; w13 is gate over up.

        With ``out`` ({expert: (w13, w2)} destinations of those shapes) the experts are drawn
        straight into them and ``out`` is returned. ``names``: the family's expert tensor names."""
        experts = list(dict.fromkeys(experts))
        self._check_known([name for e in experts for name in names.per_expert(layer, e)])
        if out is None:
            out = {}
        inter, hidden = self.spec.moe_intermediate_size, self.spec.hidden_size
        with self.progress(len(experts), desc) as bar:
            for e in experts:
                if e not in out:
                    out[e] = (torch.empty(2 * inter, hidden, dtype=dtype, device=device),
                              torch.empty(hidden, inter, dtype=dtype, device=device))
                w13, w2 = out[e]
                assert w13.shape == (2 * inter, hidden) and w2.shape == (hidden, inter), \
                    f"expert {e} destinations {tuple(w13.shape)}, {tuple(w2.shape)} are not [2I, D], [D, I]"
                gate, up, down = names.per_expert(layer, e)
                self.draw_into(gate, w13[:inter])
                self.draw_into(up, w13[inter:])
                self.draw_into(down, w2)
                bar.update(1)
        return out

    def draw_into(self, name: str, destination: torch.Tensor) -> torch.Tensor:
        """Fill ``destination`` (``name``'s shape, any float dtype and device) with ``name``'s values:
        drawn in float32 (in place when the destination is contiguous float32), then cast."""
        shape = self.shapes[name]
        assert tuple(destination.shape) == shape, f"{name} is {shape}, destination is {tuple(destination.shape)}"
        block = self.spec.quantization.weight_block_size if self.spec.quantization is not None \
            and is_block_quantized(name, shape) else None
        self._draw(name, tensor_moments(name, shape, self.spec.num_hidden_layers), destination, block)
        self.tensors_read.append(name)
        return destination

    def read_rows(self, name: str, rows: Sequence[int], dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` along its first dim: [len(rows), ...]. Each row is drawn by its own
        generator (seeded by ``name[row]``), so one expert of a fused [E, ...] tensor (GPT-OSS) is drawn
        without the others."""
        self._check_known([name])
        shape = self.shapes[name]
        moments = tensor_moments(name, shape, self.spec.num_hidden_layers)
        out = torch.empty(len(rows), *shape[1:], dtype=dtype, device=device)
        for j, row in enumerate(rows):
            self._draw(f"{name}[{row}]", moments, out[j])
            self.tensors_read.append(f"{name}[{row}]")
        return out

    def _draw(self, seed_name: str, moments: tuple[float, float], destination: torch.Tensor,
              block: tuple[int, int] | None = None) -> None:
        """Draw into ``destination``; with ``block``, through FP8 block quantization and back."""
        mean, std = moments
        in_place = destination.dtype == torch.float32 and destination.is_contiguous()
        buffer = destination if in_place else torch.empty(destination.shape, dtype=torch.float32,
                                                          device=destination.device)
        with self._lock:
            generator = self._generators.get(buffer.device)
            if generator is None:
                generator = self._generators[buffer.device] = torch.Generator(device=buffer.device)
            generator.manual_seed(tensor_seed(seed_name, self.seed))
            buffer.normal_(mean, std, generator=generator)
        if block is not None:
            destination.copy_(dequantize_fp8_blocks(*quantize_fp8_blocks(buffer, block), block))
        elif not in_place:
            destination.copy_(buffer)

    def progress(self, total: int, desc: str):
        """A progress bar on stderr (off for small totals or ``show_progress=False``)."""
        return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                    disable=not self.show_progress or total < 64, leave=False)

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise ModelConfigError(f"the dummy {self.spec.architecture} model of {self.model_dir}/config.json has no "
                                   f"tensors {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
