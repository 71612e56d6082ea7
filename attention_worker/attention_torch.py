"""The CPU attention backend: torch operations, sequence by sequence (the parity reference).

Legend: T tokens in the step, H query heads, Hkv KV heads, Dh head dim, C a sequence's context.

``forward`` splits the fused QKV projection, applies the per-head q/k RMSNorm (when the family has
it) and RoPE exactly as transformers does (float32 cos/sin, rotate-half, over the leading
``spec.rotary_dim`` dims of each head: GLM-4-MoE turns half), stores the new keys/values in the
paged cache, then for each sequence gathers its context from its blocks and runs causal
scaled-dot-product attention (within ``spec.sliding_window`` positions when set: Mixtral). Fine
for tiny models on a CPU; a GPU uses ``attention_triton.py`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import ModelSpec
from epserve.models.layers import RotaryEmbedding, rms_norm
from epserve.models.decoder import ForwardBatch


class TorchPagedAttention:
    def __init__(self, kv_cache: PagedKVCache, spec: ModelSpec) -> None:
        self.kv_cache = kv_cache
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.eps = spec.rms_norm_eps
        self.rotary_dim = spec.rotary_dim
        self.rope = RotaryEmbedding(spec.rotary_dim, spec.rope_theta)
        self.sliding_window = spec.sliding_window

    def forward(self, layer: int, qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh] → [T, H Dh]; stores k/v at batch.slot_mapping. q_norm/k_norm None: no norm."""
        num_tokens, heads, kv_heads, head_dim = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        if "rope" not in batch.backend_state:                 # once per forward, not per layer
            batch.backend_state["rope"] = self.rope.cos_sin(batch.positions, qkv.dtype)
        cos, sin = batch.backend_state["rope"]                                   # [T, Dh]
        q, k = q.reshape(num_tokens, heads, head_dim), k.reshape(num_tokens, kv_heads, head_dim)
        if q_norm is not None:
            q, k = rms_norm(q, q_norm, self.eps), rms_norm(k, k_norm, self.eps)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        v = v.reshape(num_tokens, kv_heads, head_dim)
        k_pool, v_pool = self.kv_cache.k[layer], self.kv_cache.v[layer]
        k_pool.view(-1, kv_heads, head_dim)[batch.slot_mapping] = k
        v_pool.view(-1, kv_heads, head_dim)[batch.slot_mapping] = v
        block_size = self.kv_cache.block_size
        out = torch.empty_like(q)
        start = 0
        for new, context, table in zip(batch.seq_lens, batch.context_lens, batch.block_tables):
            blocks = torch.as_tensor(table[: -(-context // block_size)], device=q.device)
            keys = k_pool[blocks].reshape(-1, kv_heads, head_dim)[:context]      # [C, Hkv, Dh]
            values = v_pool[blocks].reshape(-1, kv_heads, head_dim)[:context]
            query = q[start:start + new]                                          # [n, H, Dh]
            # new token j sits at position context - new + j and sees positions <= its own
            key_pos = torch.arange(context, device=q.device).unsqueeze(0)
            query_pos = torch.arange(context - new, context, device=q.device).unsqueeze(1)
            causal = key_pos <= query_pos                                         # [n, C]
            if self.sliding_window is not None:                                   # transformers' window rule
                causal &= key_pos > query_pos - self.sliding_window
            attn = F.scaled_dot_product_attention(
                query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=causal, scale=head_dim ** -0.5, enable_gqa=heads != kv_heads)
            out[start:start + new] = attn.transpose(0, 1)
            start += new
        return out.reshape(num_tokens, heads * head_dim)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, Dh]: RoPE on the leading rotary_dim dims, the rest passed through."""
        if self.rotary_dim == self.head_dim:
            return self.rope.apply(x, cos, sin)
        return torch.cat([self.rope.apply(x[..., :self.rotary_dim], cos, sin), x[..., self.rotary_dim:]], dim=-1)
