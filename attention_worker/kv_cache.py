"""Paged KV cache: a block allocator and per-layer key/value block pools.

Legend: N blocks, Bs block size (tokens), Hkv KV heads, Dh head dim, T tokens in a step.

A sequence owns a list of block ids (its block table); token i of the sequence lives in block
``table[i // Bs]`` at offset ``i % Bs``, i.e. flat slot ``table[i // Bs] * Bs + i % Bs``.
``BlockAllocator`` hands out and takes back block ids (free list, no fragmentation).
``PagedKVCache`` holds ``k[layer], v[layer]: [N, Bs, Hkv, Dh]`` and is also the attention
backend: it writes the step's new keys/values, gathers each sequence's context and runs
causal scaled-dot-product attention sequence by sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.models.qwen3_moe import ForwardBatch


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "a KV block was freed twice"


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, Hkv, Dh] → [T, H, Dh]; stores k/v at batch.slot_mapping."""
        k_pool, v_pool = self.k[layer], self.v[layer]
        num_heads, head_dim = q.shape[1], q.shape[2]
        k_pool.view(-1, *k_pool.shape[2:])[batch.slot_mapping] = k
        v_pool.view(-1, *v_pool.shape[2:])[batch.slot_mapping] = v
        out = torch.empty_like(q)
        start = 0
        for new, context, table in zip(batch.seq_lens, batch.context_lens, batch.block_tables):
            blocks = torch.as_tensor(table[: -(-context // self.block_size)], device=q.device)
            keys = k_pool[blocks].reshape(-1, *k_pool.shape[2:])[:context]      # [C, Hkv, Dh]
            values = v_pool[blocks].reshape(-1, *v_pool.shape[2:])[:context]
            query = q[start:start + new]                                          # [n, H, Dh]
            # new token j sits at position context - new + j and sees positions <= its own
            causal = (torch.arange(context, device=q.device).unsqueeze(0)
                      <= torch.arange(context - new, context, device=q.device).unsqueeze(1))  # [n, C]
            attn = F.scaled_dot_product_attention(
                query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=causal, scale=head_dim ** -0.5, enable_gqa=num_heads != keys.shape[1])
            out[start:start + new] = attn.transpose(0, 1)
            start += new
        return out
