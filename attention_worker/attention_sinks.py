"""The CPU attention backend of GPT-OSS: attention sinks and per-layer sliding windows over the paged cache.

Legend: T tokens in the step, H query heads, Hkv KV heads, Dh head dim, n a sequence's new tokens,
C its context.

``forward(layer, qkv, sinks, batch)`` splits the fused QKV projection, turns q and k with YaRN RoPE
on rotate-half halves (``models/rope_scaling.py``: float32 cos/sin times the attention factor,
cast to the model dtype, as transformers' ``GptOssRotaryEmbedding``), stores the new keys/values in
the ``PagedKVCache`` (the GQA layout every GQA family uses), then per sequence computes the
attention as transformers' eager GPT-OSS attention does: logits q·k·Dh^-½ over the causal context
(within ``spec.attention_window(layer)`` positions), each head's sink logit appended as one more
column, the max subtracted, softmax, the sink column dropped, weights times values. The batched GPU
runner's backend is ``attention_sinks_triton.py``.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import ModelSpec
from epserve.models.decoder import ForwardBatch
from epserve.models.rope_scaling import MlaRotaryEmbedding


class TorchSinkAttention:
    def __init__(self, kv_cache: PagedKVCache, spec: ModelSpec) -> None:
        self.kv_cache, self.spec = kv_cache, spec
        self.num_heads, self.num_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.rope = MlaRotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, "rotate_half")

    def forward(self, layer: int, qkv: torch.Tensor, sinks: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh], sinks [H] → [T, H Dh]; stores k/v at batch.slot_mapping."""
        num_tokens, heads, kv_heads, head_dim = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        if "rope" not in batch.backend_state:                 # once per forward, not per layer
            batch.backend_state["rope"] = self.rope.tables(batch.positions, qkv.dtype)
        tables = batch.backend_state["rope"]
        q = self.rope.apply(q.reshape(num_tokens, heads, head_dim), tables)
        k = self.rope.apply(k.reshape(num_tokens, kv_heads, head_dim), tables)
        k_pool, v_pool = self.kv_cache.k[layer], self.kv_cache.v[layer]
        k_pool.view(-1, kv_heads, head_dim)[batch.slot_mapping] = k
        v_pool.view(-1, kv_heads, head_dim)[batch.slot_mapping] = v.reshape(num_tokens, kv_heads, head_dim)
        window, block_size, group = self.spec.attention_window(layer), self.kv_cache.block_size, heads // kv_heads
        out = torch.empty_like(q)
        start = 0
        for new, context, table in zip(batch.seq_lens, batch.context_lens, batch.block_tables):
            blocks = torch.as_tensor(table[: -(-context // block_size)], device=q.device)
            keys = k_pool[blocks].reshape(-1, kv_heads, head_dim)[:context].repeat_interleave(group, 1)  # [C, H, Dh]
            values = v_pool[blocks].reshape(-1, kv_heads, head_dim)[:context].repeat_interleave(group, 1)
            query = q[start:start + new].transpose(0, 1)                                         # [H, n, Dh]
            key_pos = torch.arange(context, device=q.device).unsqueeze(0)
            query_pos = torch.arange(context - new, context, device=q.device).unsqueeze(1)
            visible = key_pos <= query_pos                                                        # [n, C]
            if window is not None:
                visible &= key_pos > query_pos - window
            logits = torch.matmul(query, keys.permute(1, 2, 0)) * head_dim ** -0.5              # [H, n, C]
            logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
            combined = torch.cat([logits, sinks.reshape(heads, 1, 1).expand(heads, new, 1)], dim=-1)
            combined = combined - combined.max(dim=-1, keepdim=True).values
            probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
            out[start:start + new] = torch.matmul(probs.to(values.dtype), values.transpose(0, 1)).transpose(0, 1)
            start += new
        return out.reshape(num_tokens, heads * head_dim)
