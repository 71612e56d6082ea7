"""The MoE runner backends by name, and ``make_moe_runner``, which builds the one
``--moe-runner-backend`` names (``auto``: ``triton`` on CUDA for 16-bit weights when Triton
imports, ``torch`` otherwise). Each backend module imports its heavy library only when its
runner is built, so listing them here costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from epserve.moe_runner.base import MoERunner, MoERunnerConfig
from epserve.moe_runner.deep_gemm_runner import make_deep_gemm_runner
from epserve.moe_runner.flashinfer_cutlass_runner import make_flashinfer_cutlass_runner
from epserve.moe_runner.torch_runner import make_torch_runner
from epserve.moe_runner.triton_runner import make_triton_runner

BACKENDS: dict[str, Callable[[MoERunnerConfig], MoERunner]] = {
    "torch": make_torch_runner,
    "triton": make_triton_runner,
    "deep_gemm": make_deep_gemm_runner,
    "flashinfer_cutlass": make_flashinfer_cutlass_runner,
}


def available_backends() -> list[str]:
    return sorted(BACKENDS)


def _auto_backend(device: torch.device, dtype: torch.dtype | None) -> str:
    if device.type != "cuda" or dtype in (torch.float32, torch.float64):
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def make_moe_runner(name: str, device: torch.device | str = "cpu", *, dtype: torch.dtype | None = None,
                    ep_size: int = 1, tp_size: int = 1, quantization: str | None = None) -> MoERunner:
    """Build the runner named by ``--moe-runner-backend``. Unknown names fail loudly."""
    config = MoERunnerConfig(torch.device(device), dtype, ep_size, tp_size, quantization)
    if name == "auto":
        name = _auto_backend(config.device, dtype)
    if name not in BACKENDS:
        raise ValueError(f"unknown --moe-runner-backend {name!r}; choose one of {['auto', *sorted(BACKENDS)]}")
    return BACKENDS[name](config)
