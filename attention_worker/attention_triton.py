"""The GPU attention backend: fused Triton kernels over the paged KV cache, whole batches at once.

Legend: T tokens in the step, B sequences, M block-table width, H query heads, Hkv KV heads,
Dh head dim.

Per layer, two or three launches and no host work:
1. ``qk_norm_rope_store`` (kernels/rope.py): per-head q/k RMSNorm, RoPE, and the new keys/values
   written into the cache at ``slot_mapping`` (-1: a padding row, nothing stored); at one token
   (``attend_from_residual``, which the Qwen3/Mixtral family calls) the layer's residual add, input norm
   and QKV projection run in the same launch (kernels/norm_qkv_rope.py);
2. a decode step (every sequence has one new token): ``paged_decode_attention``
   (kernels/paged_attention.py, split-KV with ``num_splits`` chosen once per batch size);
   any other step: ``paged_prefill_attention`` (kernels/paged_prefill.py, causal, variable
   query lengths, context read from the cache).
Both within the layer's sliding window when the model has one (``spec.attention_window``: windowed
Mixtral, GPT-OSS's sliding layers). GPT-OSS (attention sinks, YaRN) runs on the subclass in
``attention_sinks_triton.py``, which passes its sinks through ``attend``.

Everything the kernels read about the batch is in ``GpuAttentionMetadata`` (device tensors, built
once per step by the runner, or static buffers that a captured CUDA graph reads), so a decode step
can be replayed from a graph with other lengths and block tables. Models with multi-head latent
attention use ``attention_mla_triton.py`` instead (the family picks: ``model_family.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import ModelSpec
from epserve.models.layers import RotaryEmbedding
from epserve.models.decoder import ForwardBatch


@dataclass
class GpuAttentionMetadata:
    """One step's batch as the kernels read it (``ForwardBatch.device``)."""

    block_tables: torch.Tensor       # [B, M] int32 KV block ids per sequence
    context_lens: torch.Tensor       # [B] int32 tokens in the cache after this step (0: padding row)
    query_start_loc: torch.Tensor | None  # [B + 1] int32 first token of each sequence (prefill steps)
    max_query_len: int               # host int: the longest run of new tokens (sizes the prefill grid)
    decode: bool                     # every sequence has exactly one new token
    num_splits: int = 1              # decode: KV splits per (sequence, KV head)


class TritonPagedAttention:
    def __init__(self, kv_cache: PagedKVCache, spec: ModelSpec) -> None:
        from epserve.kernels.paged_attention import decode_num_splits, paged_decode_attention
        from epserve.kernels.paged_prefill import paged_prefill_attention
        from epserve.kernels.norm_qkv_rope import add_norm_qkv_rope_store, fits
        from epserve.kernels.rope import qk_norm_rope_store

        assert spec.mla is None, "multi-head latent attention runs on TritonMlaAttention (attention_mla_triton.py)"
        self._rope_store, self._decode, self._prefill = qk_norm_rope_store, paged_decode_attention, paged_prefill_attention
        self._num_splits = decode_num_splits
        self._norm_qkv_rope, self._fused_fits = add_norm_qkv_rope_store, fits
        # the one-launch attention input at one token (attend_from_residual); EPSERVE_FUSED_QKV=0: off
        self.fused_input = os.environ.get("EPSERVE_FUSED_QKV", "1") != "0"
        self.kv_cache = kv_cache
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.eps = spec.rms_norm_eps
        self.scale = spec.head_dim ** -0.5
        self.windows = [spec.attention_window(layer) for layer in range(spec.num_hidden_layers)]  # None: all keys
        device = kv_cache.k[0].device
        # [R/2] float32: RoPE on each head's leading rotary_dim dims (all of them but with partial rotary)
        self.inv_freq = RotaryEmbedding(spec.rotary_dim, spec.rope_theta).inv_freq.to(device)
        self.attention_factor = 1.0                     # YaRN's cos/sin scale (attention_sinks_triton.py)

    def decode_num_splits(self, batch: int, max_context: int, num_sms: int) -> int:
        """The split count S a decode step of ``batch`` sequences runs (and is captured) with."""
        return self._num_splits(batch, self.num_kv_heads, max_context, num_sms)

    def forward(self, layer: int, qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh], q_norm/k_norm [Dh] (None: no q/k norm) → [T, H Dh]."""
        return self.attend(layer, qkv, batch, q_norm=q_norm, k_norm=k_norm)

    def attend_from_residual(self, layer: int, delta: torch.Tensor | None, residual: torch.Tensor,
                             input_norm: torch.Tensor, qkv_weight: torch.Tensor, q_norm: torch.Tensor | None,
                             k_norm: torch.Tensor | None, batch: ForwardBatch
                             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A layer from the residual stream at one token: delta/residual [T, D] (delta None at the first
        layer), input_norm [D], qkv_weight [(H + 2 Hkv) Dh, D] → (attention [T, H Dh], the new residual
        [T, D]), the norm, projection, q/k norm, RoPE and cache store in one launch
        (``kernels/norm_qkv_rope.py``); None where that does not apply (more tokens, or turned off) and the
        caller composes the steps."""
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        if not self.fused_input or not self._fused_fits(residual, qkv_weight, k_cache, self.head_dim):
            return None
        q, summed = self._norm_qkv_rope(delta, residual, input_norm, qkv_weight, self.num_heads, self.num_kv_heads,
                                        self.head_dim, batch.positions, self.inv_freq, k_cache, v_cache,
                                        batch.slot_mapping, q_norm_weight=q_norm, k_norm_weight=k_norm,
                                        eps=self.eps, attention_factor=self.attention_factor)   # [T, H, Dh]
        return self._attend_stored(layer, q, batch), summed

    def attend(self, layer: int, qkv: torch.Tensor, batch: ForwardBatch, q_norm: torch.Tensor | None = None,
               k_norm: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh], sinks [H] (None: no attention sinks) → [T, H Dh]."""
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        q = self._rope_store(qkv, self.num_heads, self.num_kv_heads, self.head_dim, batch.positions, self.inv_freq,
                             k_cache, v_cache, batch.slot_mapping, q_norm_weight=q_norm, k_norm_weight=k_norm,
                             eps=self.eps, attention_factor=self.attention_factor)         # [T, H, Dh]
        return self._attend_stored(layer, q, batch, sinks)

    def _attend_stored(self, layer: int, q: torch.Tensor, batch: ForwardBatch,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, H, Dh] (normed, rotated; this step's keys and values already in the cache) → [T, H Dh]."""
        meta: GpuAttentionMetadata = batch.device
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        window = self.windows[layer]
        if meta.decode:
            out = self._decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale,
                               meta.num_splits, sinks=sinks, window=window)
        else:
            out = self._prefill(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens,
                                meta.max_query_len, self.scale, sinks=sinks, window=window)
        return out.view(q.shape[0], self.num_heads * self.head_dim)
