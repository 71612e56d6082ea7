"""The MoE runner interface and the backend registry.

Legend: T tokens, D hidden size, I MoE intermediate size, S local slots, K top-k.

Expert weights of one layer, for the S slots an expert side holds:
- ``w13 [S, 2I, D]``: gate_proj rows [0, I), up_proj rows [I, 2I) (HF ``gate_up_proj`` layout).
- ``w2  [S, D, I]``:  down_proj.

``run`` computes ``out[t] = Σ_k weights[t, k] · down(silu(gate(x_t)) · up(x_t))`` over the
slots ``slot_ids[t, k]``; an id of -1 marks a choice served elsewhere and contributes
nothing (no rows are computed for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class MoERunner(Protocol):
    name: str

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K] int (-1 = not here), weights [T, K] → out [T, D]."""
        ...


_BACKENDS: dict[str, Callable[[], MoERunner]] = {}


def register_backend(name: str, factory: Callable[[], MoERunner]) -> None:
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    _load_builtin_backends()
    return sorted(_BACKENDS)


def _load_builtin_backends() -> None:
    # Importing a backend module registers it; each module imports its heavy library lazily.
    from epserve.moe_runner import torch_runner  # noqa: F401


def make_moe_runner(name: str, device: torch.device | str = "cpu") -> MoERunner:
    """Build the runner named by ``--moe-runner-backend``. Unknown names fail loudly."""
    _load_builtin_backends()
    if name == "auto":
        name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown --moe-runner-backend {name!r}; choose one of {['auto', *sorted(_BACKENDS)]}")
    return _BACKENDS[name]()
