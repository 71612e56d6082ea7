"""The MoE runner interface and what a backend is told when it is built.

Legend: T tokens, D hidden size, I MoE intermediate size, S local slots, K top-k.

Expert weights of one layer, for the S slots an expert side holds:
- ``w13 [S, 2I, D]``: gate_proj rows [0, I), up_proj rows [I, 2I) (HF ``gate_up_proj`` layout).
- ``w2  [S, D, I]``:  down_proj.

``run`` computes ``out[t] = Σ_k weights[t, k] · down(silu(gate(x_t)) · up(x_t))`` over the
slots ``slot_ids[t, k]``; an id of -1 marks a choice served elsewhere and contributes
nothing (no rows are computed for it).

Backends (``--moe-runner-backend``), listed in ``registry.py`` and chosen once by its
``make_moe_runner``:
- ``torch``: the reference, any device and dtype.
- ``triton``: the Triton kernels in ``kernels/`` (CUDA, or the interpreter with TRITON_INTERPRET=1).
- ``deep_gemm``: DeepGEMM's bf16 grouped GEMMs (contiguous layout for prefill, masked for decode).
- ``flashinfer_cutlass``: FlashInfer's CUTLASS MoE; needs modelopt_fp4 weights (guardrails only).
- ``auto``: ``triton`` on CUDA for bfloat16/float16 when Triton imports, ``torch`` otherwise (the
  Triton kernels are tuned for 16-bit weights and compute float32 dots in TF32: float32/float64
  runs are parity runs, which want the exact reference). An explicitly named backend never falls
  back: if it cannot run it raises, naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class MoERunner(Protocol):
    name: str
    capturable: bool            # run() launches device work only (no host sync): CUDA-graph capturable

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K] int (-1 = not here), weights [T, K] → out [T, D]."""
        ...


@dataclass(frozen=True)
class MoERunnerConfig:
    """What a backend may need to decide whether it can run (SGLang's flag names)."""
    device: torch.device
    dtype: torch.dtype | None = None     # weights/activations; None = not known (no dtype check)
    ep_size: int = 1
    tp_size: int = 1
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.tp_size < 1:
            raise ValueError(f"ep_size ({self.ep_size}) and tp_size ({self.tp_size}) must be >= 1")
