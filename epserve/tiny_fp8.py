"""FP8 block quantization of a tiny model's checkpoint (``make_tiny_model(..., quantization="fp8")``).

DeepSeek-V3's release format: ``config.json`` gains a ``quantization_config`` (quant_method "fp8", fmt
"e4m3", activation_scheme "dynamic", ``weight_block_size`` [n, k]); every Linear projection's weight
(attention, dense MLPs, shared and routed experts: ``weights.is_block_quantized``) is stored as
float8_e4m3fn followed by its float32 ``<name>_scale_inv`` [ceil(N / n), ceil(K / k)], quantized as
DeepSeek does (``weights.quantize_fp8_blocks``: scale_inv = amax / 448 per block). Embeddings, the
lm_head, routers, ``e_score_correction_bias`` and norms keep the model's float dtype.
"""

from __future__ import annotations

import torch

from epserve.weights import SCALE_SUFFIX, is_block_quantized, quantize_fp8_blocks

QUANTIZABLE_ARCHS = ("deepseek_v3",)


def quantization_config(block: tuple[int, int]) -> dict:
    """The ``quantization_config`` entry of config.json (DeepSeek-V3's keys)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def quantize_checkpoint(weights: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors → the same names in order, quantized ones as FP8, each followed by its scale_inv."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if is_block_quantized(name, tensor.shape):
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8_blocks(tensor.float(), block)
        else:
            out[name] = tensor
    return out
