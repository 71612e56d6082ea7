"""Rotary embedding of multi-head latent attention: YaRN frequencies, interleaved pairs, softmax scale.

Legend: T tokens, H heads, R rotary width (``qk_rope_head_dim``).

Written to match transformers' DeepSeek-V3 reference bit for bit: inverse frequencies, cos and
sin are computed in float32 (YaRN's ramp included) and cast to the model dtype, cos/sin carry
YaRN's ``attention_factor``, and the softmax scale carries ``mscale(factor, mscale_all_dim)²``.
DeepSeek's checkpoints rotate interleaved pairs ``(x0, x1), (x2, x3), ...``: V3's reference lays
the rotated output out de-interleaved (even lanes' results, then odd lanes'), V2's computes it as
complex numbers in float32; queries and keys are laid out alike, so their dot products are unchanged.
"""

from __future__ import annotations

import math

import torch

from epserve.model_config import ROPE_STYLES, RopeScaling


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, ``0.1 * mscale * ln(scale) + 1`` (1 when not scaled)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] float32, attention factor for cos/sin)."""
    factor = scaling.factor
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))) \
            / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                    # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp                                      # share of the unscaled (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def mla_softmax_scale(qk_head_dim: int, scaling: RopeScaling | None) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim)²`` under YaRN."""
    scale = qk_head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        mscale = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


class MlaRotaryEmbedding:
    """The rotation of the rotary part of MLA queries and keys, in one of three styles (``ROPE_STYLES``):
    ``interleave`` (DeepSeek-V3: pairs (x0, x1), (x2, x3), ...; output de-interleaved), ``rotate_half``
    (halves) and ``complex`` (DeepSeek-V2: the same pairs as complex numbers, computed in float32 and
    cast back, output in place). ``tables(positions, dtype)`` once per forward, ``apply`` per layer."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None, style: str) -> None:
        if style not in ROPE_STYLES:
            raise ValueError(f"unknown rotary style {style!r}; one of {ROPE_STYLES}")
        if scaling is None:
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_factor = 1.0
        else:
            self.inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, scaling)
        self.style = style

    def to(self, device: torch.device | str) -> MlaRotaryEmbedding:
        """Keep the inverse frequencies on ``device`` (``tables`` then copies nothing from the host: a
        forward captured in a CUDA graph may not)."""
        self.inv_freq = self.inv_freq.to(device)
        return self

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions [T] → (cos, sin) [T, R/2] (interleave), [T, R] (rotate_half), or (freqs [T, R/2]
        complex64,) (complex)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)          # [T, R/2]
        if self.style == "complex":
            return (torch.polar(torch.ones_like(freqs), freqs) * self.attention_factor,)
        if self.style == "rotate_half":
            freqs = torch.cat((freqs, freqs), dim=-1)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def apply(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x [T, H, R] → rotated [T, H, R]."""
        if self.style == "complex":
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))             # [T, H, R/2]
            return torch.view_as_real(pairs * tables[0].unsqueeze(1)).flatten(-2).type_as(x)
        cos, sin = tables[0].unsqueeze(1), tables[1].unsqueeze(1)
        if self.style == "interleave":
            even, odd = x[..., 0::2], x[..., 1::2]
            return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
