"""Arrival counters of the kernels that reset their own: one zeroed buffer per (owner, device, stream).

Several kernels count arriving programs with atomics and let the last one finish the work and zero the
counter again (``moe_align``, ``moe_router``, ``norm_qkv_rope``, the split-KV merge), so graph replays
need no memset. Two such kernels running at once on one buffer would count each other's programs: the
expert side runs two micro-batches' steps on two streams, so buffers are per stream as well as per device
(a CUDA graph uses those of the stream it was captured on). Buffers live as long as the process: a graph
that captured one stays valid; a buffer too small is replaced by a larger one and the old one is kept.
A buffer first needed during a capture (``torch.cuda.graph`` captures on a stream of its own) comes from
the graph's memory pool, kept alive here, and its zeroing becomes the graph's first node: harmless, the
counters are zero at every launch anyway.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []       # replaced buffers, which captured graphs may still use


def zeroed_counters(owner: str, device: torch.device, numel: int) -> torch.Tensor:
    """[>= numel] int32, zero between launches of the ``owner`` kernel on this device and stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (owner, device.type, device.index, stream)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _RETIRED.append(buffer)
        buffer = _BUFFERS[key] = torch.zeros(numel, dtype=torch.int32, device=device)
    return buffer
