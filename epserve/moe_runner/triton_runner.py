"""MoE runner on the Triton kernels of ``kernels/``: fused gate_up + SiLU·mul, down + combine.

Legend: T tokens, D hidden size, I intermediate size, S local slots, K top-k.

The kernel variant and its block sizes come from the tuned table for (S, D, I, device),
chosen by T (``kernels/moe_configs.py``): the GEMV variant for a few tokens, the
slot-aligned grouped GEMMs otherwise. Nothing in ``run`` syncs with the host, so a decode
step that calls it can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from epserve.moe_runner.base import MoERunnerConfig


class TritonMoERunner:
    name = "triton"
    capturable = True           # no host sync: replays from CUDA graphs

    def __init__(self, device: torch.device) -> None:
        from epserve.kernels.fused_moe import fused_moe
        from epserve.kernels.moe_configs import get_config
        self._fused_moe = fused_moe
        self._get_config = get_config
        self._device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K], weights [T, K], w13 [S, 2I, D], w2 [S, D, I] → [T, D]."""
        num_tokens, top_k = slot_ids.shape
        num_slots, dim, inter = w2.shape
        config = self._get_config(num_tokens, top_k, num_slots, dim, inter, self._device_name)
        return self._fused_moe(hidden, slot_ids, weights, w13, w2, config)


def make_triton_runner(config: MoERunnerConfig) -> TritonMoERunner:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError("--moe-runner-backend triton needs the `triton` package "
                          "(pip install 'epserve[triton]')") from e
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if config.dtype in (torch.float32, torch.float64) and not interpreted:
        raise ValueError(f"--moe-runner-backend triton runs bfloat16/float16 weights (its configs are tuned for "
                         f"16-bit tiles and float32 dots run in TF32), not {config.dtype}; use --moe-runner-backend "
                         "torch (what auto picks) for float32/float64")
    if not interpreted:
        if config.device.type != "cuda":
            raise ValueError(f"--moe-runner-backend triton needs a CUDA device (got {config.device}); "
                             "use --moe-runner-backend torch, or TRITON_INTERPRET=1 for the interpreter")
        if not torch.cuda.is_available():
            raise ValueError("--moe-runner-backend triton needs CUDA, but torch.cuda.is_available() is False")
    return TritonMoERunner(config.device)

