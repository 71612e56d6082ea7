"""The GPU attention backend of multi-head latent attention (MLA): Triton kernels over the paged latent
cache, whole batches at once.

Legend: T tokens in the step, H heads, C kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim.

The same contract as the CPU backend (``attention_mla.py``: ``MlaAttentionBackend`` in
models/deepseek_v3.py), always in the absorbed form, so attention reads the C + Dr cached values per
context token and nothing is expanded per context token. Per layer:
1. RoPE on the query's and key's rotary parts (torch; YaRN and the rotary style as the config says,
   the tables once per forward, ``models/rope_scaling.py``);
2. ``mla_store_latent``: the latent and the rotated key into the cache at ``slot_mapping`` (-1: a
   padding row, nothing stored);
3. the key half of ``kv_b_proj`` folded into the query (one batched GEMM over heads), the query
   [T, H, C + Dr] handed to ``mla_decode_attention`` (every sequence has one new token; split-KV with
   ``num_splits`` chosen once per batch size by ``decode_num_splits``) or ``mla_prefill_attention``
   (any other step: causal, variable query lengths, context read from the cache);
4. the value half of ``kv_b_proj`` applied to the [T, H, C] output (one batched GEMM).

It reads the batch from ``GpuAttentionMetadata`` (attention_triton.py) like the GQA backend; no host
work and no host syncs, so a decode step is captured in a CUDA graph and replayed with other lengths
and block tables.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.attention_mla import rotate_query_and_key
from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.mla_kv_cache import MlaKVCache
from epserve.model_config import ModelSpec
from epserve.models.decoder import ForwardBatch
from epserve.models.rope_scaling import MlaRotaryEmbedding, mla_softmax_scale


class TritonMlaAttention:
    def __init__(self, kv_cache: MlaKVCache, spec: ModelSpec) -> None:
        from epserve.kernels.mla_attention import mla_decode_attention, mla_decode_num_splits, mla_prefill_attention
        from epserve.kernels.mla_store import mla_store_latent

        mla = spec.mla
        assert mla is not None, "TritonMlaAttention needs a model with multi-head latent attention"
        latent = mla.kv_lora_rank
        if latent < 16 or latent & (latent - 1):
            raise ValueError(f"{spec.architecture}: kv_lora_rank {latent} is not a power of 2 (>= 16), which the "
                             "batched GPU runner's MLA kernels need: pass --attention-backend torch_native")
        self._store, self._decode, self._prefill = mla_store_latent, mla_decode_attention, mla_prefill_attention
        self._num_splits = mla_decode_num_splits
        self.kv_cache = kv_cache
        self.num_heads = spec.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim, self.latent_dim = (mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                                                                     mla.v_head_dim, latent)
        device = kv_cache.kv[0].device
        self.rope = MlaRotaryEmbedding(mla.qk_rope_head_dim, spec.rope_theta, spec.rope_scaling,
                                       mla.rope_style).to(device)
        self.scale = mla_softmax_scale(mla.qk_head_dim, spec.rope_scaling)

    def decode_num_splits(self, batch: int, max_context: int, num_sms: int) -> int:
        """The split count S a decode step of ``batch`` sequences runs (and is captured) with."""
        return self._num_splits(batch, self.num_heads, max_context, num_sms)

    def forward(self, layer: int, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                kv_b_proj: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, Dn + Dr], latent [T, C], k_rope [T, Dr], kv_b_proj [H (Dn + Dv), C] → [T, H Dv]."""
        meta: GpuAttentionMetadata = batch.device
        num_tokens, heads, latent_dim = q.shape[0], self.num_heads, self.latent_dim
        q_nope, q_rope, k_rope = rotate_query_and_key(self.rope, self.nope_dim, self.rope_dim, q, k_rope, batch)
        cache = self.kv_cache.kv[layer]                                                  # [N, Bs, C + Dr]
        self._store(latent, k_rope, cache, batch.slot_mapping)
        w_uk, w_uv = kv_b_proj.view(heads, self.nope_dim + self.v_dim, latent_dim).split(
            [self.nope_dim, self.v_dim], dim=1)                                          # [H, Dn, C], [H, Dv, C]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)                              # [H, T, C]
        query = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1).transpose(0, 1)   # [T, H, C + Dr] (a view)
        out = q.new_empty(heads, num_tokens, latent_dim)                                # [H, T, C]
        if meta.decode:
            self._decode(query, cache, meta.block_tables, meta.context_lens, self.scale, meta.num_splits,
                         latent_dim, out=out.transpose(0, 1))
        else:
            self._prefill(query, cache, meta.block_tables, meta.query_start_loc, meta.context_lens,
                          meta.max_query_len, self.scale, latent_dim, out=out.transpose(0, 1))
        values = torch.bmm(out, w_uv.transpose(1, 2))                                   # [H, T, Dv]
        return values.transpose(0, 1).reshape(num_tokens, heads * self.v_dim)
