"""The GPU attention backend of GPT-OSS: attention sinks, per-layer sliding windows and YaRN RoPE on the
Triton kernels, whole batches at once.

Legend: T tokens in the step, H query heads, Hkv KV heads, Dh head dim.

The contract of the CPU backend (``attention_sinks.py``: ``SinkAttentionBackend`` in models/gpt_oss.py),
computed as ``TritonPagedAttention`` (attention_triton.py) computes the GQA families, with two differences:
RoPE uses YaRN's frequencies and scales cos/sin by its attention factor (``models/rope_scaling.py``, in the
fused ``qk_norm_rope_store``; GPT-OSS has no q/k norm), and each head's sink logit joins the softmax's
denominator in the decode and prefill kernels. The layer's window (``spec.attention_window``) is the base
class's. No host work and no host syncs: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.attention_triton import TritonPagedAttention
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import ModelSpec
from epserve.models.decoder import ForwardBatch
from epserve.models.rope_scaling import MlaRotaryEmbedding


class TritonSinkAttention(TritonPagedAttention):
    def __init__(self, kv_cache: PagedKVCache, spec: ModelSpec) -> None:
        assert spec.attention_sinks, "TritonSinkAttention computes models with attention sinks (GPT-OSS)"
        super().__init__(kv_cache, spec)
        rope = MlaRotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, "rotate_half")
        self.inv_freq = rope.inv_freq.to(kv_cache.k[0].device)           # [Dh/2] float32
        self.attention_factor = rope.attention_factor

    def forward(self, layer: int, qkv: torch.Tensor, sinks: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh], sinks [H] (the model dtype or float32) → [T, H Dh]; stores k/v at
        batch.slot_mapping."""
        return self.attend(layer, qkv, batch, sinks=sinks)
