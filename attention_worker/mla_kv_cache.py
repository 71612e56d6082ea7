"""Paged latent cache of multi-head latent attention (DeepSeek-V2/V3).

Legend: N blocks, Bs block size (tokens), C kv_lora_rank, Dr qk_rope_head_dim.

Where a GQA model caches a key and a value per KV head, MLA caches one vector per token and layer:
the normed latent (C values) followed by the rotated shared key (Dr values), ``kv[layer]:
[N, Bs, C + Dr]``. Keys and values of every head are derived from it at attention time
(``attention_mla.py`` on the host, ``attention_mla_triton.py`` on a GPU). Block tables, slots and the allocator are the same as ``PagedKVCache``'s.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.kv_cache import BlockAllocator


class MlaKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int,
                 qk_rope_head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        shape = (num_blocks, block_size, kv_lora_rank + qk_rope_head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for memory accounting)."""
        return list(self.kv)
