"""The CPU attention backend of multi-head latent attention (MLA): torch operations, sequence by sequence.

Legend: T tokens in the step, n a sequence's new tokens, L its context (cached + new), H heads,
C kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.

``forward`` rotates the query's and key's rotary parts (YaRN and the rotary style as the config
says, ``epserve.models.rope_scaling``), stores each new token's latent and rotated key in the
latent cache (``MlaKVCache``: C + Dr values per token and layer), then attends per sequence over
its gathered context in one of two equivalent forms:
- expanded (prefill): ``kv_b_proj`` turns every context latent into per-head keys [L, H, Dn] and
  values [L, H, Dv]; scaled-dot-product attention over [Dn + Dr]-wide queries and keys, as
  transformers computes it;
- absorbed (decode, at most ``absorbed_max_new_tokens`` new tokens): the key half of ``kv_b_proj``
  is folded into the query (q_nope [n, H, Dn] → [n, H, C]) and the value half applied after the
  softmax, so attention reads the C + Dr cached values per context token directly and nothing is
  expanded per context token.
The softmax scale carries YaRN's mscale when the config scales RoPE. A GPU uses
``attention_mla_triton.py`` instead (the absorbed form throughout, Triton kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.attention_worker.mla_kv_cache import MlaKVCache
from epserve.model_config import ModelSpec
from epserve.models.decoder import ForwardBatch
from epserve.models.rope_scaling import MlaRotaryEmbedding, mla_softmax_scale


def rotate_query_and_key(rope: MlaRotaryEmbedding, nope_dim: int, rope_dim: int, q: torch.Tensor,
                         k_rope: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, Dn + Dr], k_rope [T, Dr] → (q_nope [T, H, Dn], q_rope [T, H, Dr], k_rope [T, Dr]), the rotary
    parts turned at ``batch.positions`` (cos/sin tables built once per forward, in ``batch.backend_state``)."""
    if "mla_rope" not in batch.backend_state:
        batch.backend_state["mla_rope"] = rope.tables(batch.positions, q.dtype)
    tables = batch.backend_state["mla_rope"]
    q_nope, q_rope = q.split([nope_dim, rope_dim], dim=-1)
    return q_nope, rope.apply(q_rope, tables), rope.apply(k_rope.unsqueeze(1), tables).squeeze(1)


class TorchMlaAttention:
    def __init__(self, kv_cache: MlaKVCache, spec: ModelSpec, absorbed_max_new_tokens: int = 1) -> None:
        """``absorbed_max_new_tokens``: sequences with at most this many new tokens use the absorbed
        form (0: never, a large value: always)."""
        mla = spec.mla
        assert mla is not None, "TorchMlaAttention needs a model with multi-head latent attention"
        self.kv_cache = kv_cache
        self.num_heads = spec.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim, self.latent_dim = (mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                                                                     mla.v_head_dim, mla.kv_lora_rank)
        self.rope = MlaRotaryEmbedding(mla.qk_rope_head_dim, spec.rope_theta, spec.rope_scaling, mla.rope_style)
        self.scale = mla_softmax_scale(mla.qk_head_dim, spec.rope_scaling)
        self.absorbed_max_new_tokens = absorbed_max_new_tokens

    def forward(self, layer: int, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                kv_b_proj: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, Dn + Dr], latent [T, C], k_rope [T, Dr], kv_b_proj [H (Dn + Dv), C] → [T, H Dv]."""
        num_tokens, heads = q.shape[0], self.num_heads
        q_nope, q_rope, k_rope = rotate_query_and_key(self.rope, self.nope_dim, self.rope_dim, q, k_rope, batch)
        pool = self.kv_cache.kv[layer]                                                   # [N, Bs, C + Dr]
        pool.view(-1, pool.shape[-1])[batch.slot_mapping] = torch.cat([latent, k_rope], dim=-1)
        w_kv = kv_b_proj.view(heads, self.nope_dim + self.v_dim, self.latent_dim)       # [H, Dn + Dv, C]
        block_size = self.kv_cache.block_size
        out = q.new_empty(num_tokens, heads, self.v_dim)
        start = 0
        for new, context, table in zip(batch.seq_lens, batch.context_lens, batch.block_tables):
            blocks = torch.as_tensor(table[: -(-context // block_size)], device=q.device)
            cached = pool[blocks].reshape(-1, pool.shape[-1])[:context]                  # [L, C + Dr]
            ctx_latent, ctx_rope = cached.split([self.latent_dim, self.rope_dim], dim=-1)
            rows = slice(start, start + new)
            attend = self._absorbed if new <= self.absorbed_max_new_tokens else self._expanded
            out[rows] = attend(q_nope[rows], q_rope[rows], ctx_latent, ctx_rope, w_kv, context)
            start += new
        return out.reshape(num_tokens, heads * self.v_dim)

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx_latent: torch.Tensor,
                  ctx_rope: torch.Tensor, w_kv: torch.Tensor, context: int) -> torch.Tensor:
        """q_nope [n, H, Dn], q_rope [n, H, Dr], ctx_latent [L, C], ctx_rope [L, Dr] → [n, H, Dv]."""
        new, heads = q_nope.shape[0], self.num_heads
        kv = F.linear(ctx_latent, w_kv.reshape(-1, self.latent_dim)).view(context, heads, -1)  # [L, H, Dn + Dv]
        k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)
        keys = torch.cat([k_nope, ctx_rope.unsqueeze(1).expand(-1, heads, -1)], dim=-1)         # [L, H, Dn + Dr]
        query = torch.cat([q_nope, q_rope], dim=-1)                                              # [n, H, Dn + Dr]
        attn = F.scaled_dot_product_attention(query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                              attn_mask=self._causal(new, context, q_nope.device), scale=self.scale)
        return attn.transpose(0, 1)

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx_latent: torch.Tensor,
                  ctx_rope: torch.Tensor, w_kv: torch.Tensor, context: int) -> torch.Tensor:
        """Same contract as ``_expanded``; kv_b_proj folded into the query and the output."""
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)                    # [H, Dn, C], [H, Dv, C]
        q_latent = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)                           # [n, H, C]
        scores = (torch.einsum("nhc,lc->nhl", q_latent, ctx_latent)
                  + torch.einsum("nhr,lr->nhl", q_rope, ctx_rope)) * self.scale         # [n, H, L]
        new = q_nope.shape[0]
        scores = scores.masked_fill(~self._causal(new, context, q_nope.device).unsqueeze(1), float("-inf"))
        out_latent = torch.einsum("nhl,lc->nhc", scores.softmax(dim=-1), ctx_latent)   # [n, H, C]
        return torch.einsum("nhc,hvc->nhv", out_latent, w_uv)

    @staticmethod
    def _causal(new: int, context: int, device: torch.device) -> torch.Tensor:
        """[n, L] bool: new token j sits at position context - new + j and sees positions <= its own."""
        return (torch.arange(context, device=device).unsqueeze(0)
                <= torch.arange(context - new, context, device=device).unsqueeze(1))
