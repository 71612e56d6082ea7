"""Paged KV cache: a block allocator and per-layer key/value block pools.

Legend: N blocks, Bs block size (tokens), Hkv KV heads, Dh head dim, T tokens in a step.

A sequence owns a list of block ids (its block table); token i of the sequence lives in block
``table[i // Bs]`` at offset ``i % Bs``, i.e. flat slot ``table[i // Bs] * Bs + i % Bs``.
``BlockAllocator`` hands out and takes back block ids (free list, no fragmentation).
``PagedKVCache`` holds ``k[layer], v[layer]: [N, Bs, Hkv, Dh]``; the attention backends
(``attention_torch.py`` on the CPU, ``attention_triton.py`` on a GPU) read and write them.
"""

from __future__ import annotations

import torch


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
