"""The data plane: attention workers ↔ expert workers, per MoE layer and micro-batch.

Legend: T tokens, D hidden, K top-k, P physical slots, W expert workers, S = P // W.

A backend is picked once at start-up by ``--moe-a2a-backend`` through ``make_dispatcher``
(attention side) and ``make_expert_server`` (expert side); the interfaces are in ``base``,
the shared split/combine helpers in ``split``.

| backend    | file                     | what                                              |
|------------|--------------------------|---------------------------------------------------|
| `local`    | local.py                 | in-process experts; colocated mode, parity ref    |
| `torch`    | torch_p2p.py (+ _server, | point to point over torch.distributed: gloo on    |
|            | _group, _wire)           | CPU, NCCL on GPU                                  |
| `cuda_ipc` | cuda_ipc.py (+ _server,  | same host: fixed shared-memory channels; host     |
|            | _join, _layout, _step...)| shared memory on CPU, CUDA IPC buffers on GPU     |
| `mooncake` | not built                | needs mooncake-transfer-engine (+ a GPU for EP)   |
| `deepep`   | not built                | needs deep_ep and a CUDA GPU                      |
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch

from epserve.dataplane.base import (BackendUnavailable, BatchHeader, DataPlaneTimeout, ExpertCompute,
                                    ExpertDispatcher, ExpertServer, PeerLost, PendingCombine,
                                    RemoteExpertError, StaleMapVersion)
from epserve.dataplane.split import CombineSum, WorkerShare, split_by_worker

__all__ = [
    "BackendUnavailable", "BatchHeader", "CombineSum", "DataPlaneTimeout", "ExpertCompute", "ExpertDispatcher",
    "ExpertServer", "PeerLost", "PendingCombine", "RemoteExpertError", "StaleMapVersion", "WorkerShare",
    "BACKENDS", "make_dispatcher", "make_expert_server", "split_by_worker",
]

BACKENDS = ("local", "torch", "cuda_ipc", "mooncake", "deepep")


def make_dispatcher(backend: str, **options) -> ExpertDispatcher:
    """The attention side of ``--moe-a2a-backend backend``.

    local: ``experts`` (one ExpertCompute per expert worker index).
    torch: ``rank``, ``world_size``, ``dist_init_addr`` ("host:port" of the rendezvous store),
    ``expert_ranks`` (must be the last W ranks), ``timeout_s`` (joining, and each link
    operation), ``device`` ("cpu" → gloo, "cuda" → NCCL), ``eager`` (default True: links to every
    expert rank before returning; False: each formed on first use), ``connect_timeout_s`` (forming
    one link; default ``timeout_s``); or ``group`` from ``join_group``.
    cuda_ipc: ``rank``, ``world_size``, ``dist_init_addr``, ``expert_ranks``, ``timeout_s``, ``device``
    (where the channels live: "cuda[:i]" (default) → CUDA IPC buffers, "cpu" → host shared memory), the channel
    shape ``max_tokens`` (the most tokens of one micro-batch), ``hidden_size``, ``top_k``, ``dtype``,
    ``num_micro_batches`` (channel slots per expert, default 2), ``readiness`` (None: poll on CPU,
    flags on CUDA; or "events").
    """
    return _factory(backend, _DISPATCHERS)(**options)


def make_expert_server(backend: str, **options) -> ExpertServer:
    """The expert side of ``--moe-a2a-backend backend``.

    torch: ``rank``, ``world_size``, ``dist_init_addr``, ``attention_ranks`` (must be the first D
    ranks), ``timeout_s``, ``device``, ``batch_window_s`` (how long to wait for more requests
    to batch, default 0: batch only what already arrived), ``eager`` (default True: a link from
    every attention rank before returning; False: links are accepted as they are offered),
    ``connect_timeout_s`` (forming one offered link; default ``timeout_s``); or ``group`` from
    ``join_group``.
    cuda_ipc: ``rank``, ``world_size``, ``dist_init_addr``, ``attention_ranks``, ``timeout_s``,
    ``batch_window_s``, ``device`` (where ``compute`` wants its inputs; None: where the attention
    ranks put the channels). Channel shape and readiness come from the attention ranks.
    """
    return _factory(backend, _SERVERS)(**options)


def _local_dispatcher(*, experts: Sequence[ExpertCompute]) -> ExpertDispatcher:
    from epserve.dataplane.local import LocalDispatcher

    return LocalDispatcher(experts)


def _local_server(**_options) -> ExpertServer:
    raise ValueError("moe-a2a-backend 'local' has no expert server: its dispatcher calls the experts "
                     "in-process (make_dispatcher('local', experts=[...]))")


def _torch_dispatcher(*, rank: int | None = None, world_size: int | None = None, dist_init_addr: str = "",
                      expert_ranks: Sequence[int] | None = None, timeout_s: float = 30.0,
                      device: torch.device | str = "cpu", eager: bool = True, connect_timeout_s: float | None = None,
                      group=None) -> ExpertDispatcher:
    from epserve.dataplane.torch_group import join_group
    from epserve.dataplane.torch_p2p import TorchDispatcher

    if group is None:
        num_attention = world_size - len(expert_ranks)
        if list(expert_ranks) != list(range(num_attention, world_size)):
            raise ValueError(f"expert ranks must be the last ranks [{num_attention}, {world_size}); got "
                             f"{list(expert_ranks)}")
        group = join_group(rank, world_size, dist_init_addr, timeout_s, num_attention_ranks=num_attention,
                           device=device, eager=eager)
    return TorchDispatcher(group, link_timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)


def _torch_server(*, rank: int | None = None, world_size: int | None = None, dist_init_addr: str = "",
                  attention_ranks: Sequence[int] | None = None, timeout_s: float = 30.0,
                  device: torch.device | str = "cpu", batch_window_s: float = 0.0, eager: bool = True,
                  connect_timeout_s: float | None = None, group=None) -> ExpertServer:
    from epserve.dataplane.torch_group import join_group
    from epserve.dataplane.torch_server import TorchExpertServer

    if group is None:
        if list(attention_ranks) != list(range(len(attention_ranks))):
            raise ValueError(f"attention ranks must be the first ranks [0, {len(attention_ranks)}); got "
                             f"{list(attention_ranks)}")
        group = join_group(rank, world_size, dist_init_addr, timeout_s,
                           num_attention_ranks=len(attention_ranks), device=device, eager=eager)
    return TorchExpertServer(group, link_timeout_s=timeout_s, batch_window_s=batch_window_s,
                             connect_timeout_s=connect_timeout_s)


def _not_built(backend: str, module: str, package: str, needs: str) -> Callable[..., object]:
    def fail(**_options) -> object:
        missing = [] if importlib.util.find_spec(module) else [f"the {package} package"]
        missing += [] if torch.cuda.is_available() else ["a CUDA GPU"]
        if missing:
            raise BackendUnavailable(f"moe-a2a-backend {backend!r} needs {needs}; missing here: "
                                     f"{' and '.join(missing)}. Use 'torch' or 'local' instead.")
        raise BackendUnavailable(f"moe-a2a-backend {backend!r} is not built yet in epserve ({package} and a GPU "
                                 f"are present); use 'torch'")
    return fail


def _cuda_ipc_device(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"moe-a2a-backend 'cuda_ipc' on device {device} needs a CUDA GPU "
                                 "(torch.cuda.is_available() is False); on a CPU machine use --device cpu "
                                 "(host shared memory, same host only)")


def _cuda_ipc_dispatcher(*, device: torch.device | str = "cuda", **options) -> ExpertDispatcher:
    _cuda_ipc_device(device)     # first: without a GPU, a call for CUDA fails on that, whatever else is missing
    return _join_cuda_ipc_dispatcher(device=device, **options)


def _join_cuda_ipc_dispatcher(*, rank: int, world_size: int, dist_init_addr: str, expert_ranks: Sequence[int],
                              max_tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                              device: torch.device | str, timeout_s: float = 30.0, num_micro_batches: int = 2,
                              readiness: str | None = None) -> ExpertDispatcher:
    from epserve.dataplane.cuda_ipc import CudaIpcDispatcher
    from epserve.dataplane.cuda_ipc_join import join_attention
    from epserve.dataplane.cuda_ipc_layout import ChannelShape

    if rank in expert_ranks or not 0 <= rank < world_size or any(not 0 <= e < world_size for e in expert_ranks):
        raise ValueError(f"attention rank {rank} and expert ranks {list(expert_ranks)} must be distinct ranks "
                         f"of a world of {world_size}")
    side = join_attention(rank, expert_ranks, dist_init_addr, timeout_s,
                          ChannelShape(max_tokens, hidden_size, top_k, dtype), num_micro_batches, device, readiness)
    return CudaIpcDispatcher(side, link_timeout_s=timeout_s)


def _cuda_ipc_server(*, rank: int, world_size: int, dist_init_addr: str, attention_ranks: Sequence[int],
                     timeout_s: float = 30.0, batch_window_s: float = 0.0,
                     device: torch.device | str | None = None, step_graphs: bool = False) -> ExpertServer:
    from epserve.dataplane.cuda_ipc_join import join_expert
    from epserve.dataplane.cuda_ipc_server import CudaIpcExpertServer

    _cuda_ipc_device(device)
    if rank in attention_ranks or not 0 <= rank < world_size:
        raise ValueError(f"expert rank {rank} must be a rank of a world of {world_size}, not an attention rank "
                         f"{list(attention_ranks)}")
    links = join_expert(rank, attention_ranks, dist_init_addr, timeout_s)
    return CudaIpcExpertServer(links, link_timeout_s=timeout_s, batch_window_s=batch_window_s, compute_device=device,
                               step_graphs=step_graphs)


_UNBUILT = {
    "mooncake": _not_built("mooncake", "mooncake", "mooncake-transfer-engine",
                           "the mooncake-transfer-engine package (module mooncake) and a CUDA GPU for Mooncake EP"),
    "deepep": _not_built("deepep", "deep_ep", "deep_ep", "the deep_ep package and a CUDA GPU"),
}
_DISPATCHERS = {"local": _local_dispatcher, "torch": _torch_dispatcher, "cuda_ipc": _cuda_ipc_dispatcher,
                **_UNBUILT}
_SERVERS = {"local": _local_server, "torch": _torch_server, "cuda_ipc": _cuda_ipc_server, **_UNBUILT}


def _factory(backend: str, table: dict[str, Callable[..., object]]) -> Callable[..., object]:
    if backend not in table:
        raise ValueError(f"unknown --moe-a2a-backend {backend!r}; choose one of {list(BACKENDS)}")
    return table[backend]
