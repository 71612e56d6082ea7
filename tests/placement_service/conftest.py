"""Fixtures for placement service tests: a minimal model dir, in-process servers, stubs.

Servers bind 127.0.0.1 on free ports; every fixture stops what it started. Helpers are
handed out as fixtures (``wait_until``, ``free_port``, ``write_model``, ``commit_map``) because test modules
must not import ``conftest`` (several exist under tests/).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from epserve.expert_map import ExpertMap
from epserve.grpc_server import wait_for_channel
from epserve.model_config import model_fingerprint
from epserve.placement_service.config import PlacementConfig
from epserve.placement_service.server import PlacementServer, start_placement_server
from epserve.protos import placement_pb2, placement_pb2_grpc

# 4 decoder layers, layer 1 dense → MoE layers (0, 2, 3); 8 experts.
MODEL_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_hidden_layers": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
    "hidden_size": 32,
    "moe_intermediate_size": 16,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 128,
}
ATTENTION = placement_pb2.WORKER_ROLE_ATTENTION
EXPERT = placement_pb2.WORKER_ROLE_EXPERT


def _write_model(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**MODEL_CONFIG, **overrides}, indent=2))
    return directory


@pytest.fixture
def write_model() -> Callable[..., Path]:
    """write_model(directory, **config.json overrides) → directory holding a small Qwen3-MoE config.json."""
    return _write_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """4 decoder layers with layer 1 dense → MoE layers (0, 2, 3); 8 experts."""
    return _write_model(tmp_path / "model")


@pytest.fixture
def fingerprint(model_dir: Path) -> str:
    return model_fingerprint(model_dir)


@pytest.fixture
def free_port() -> Callable[[], int]:
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    return pick


def _commit_map(controller, phy2log: torch.Tensor) -> ExpertMap:
    """phy2log [L, P] as the next version through the rebalancer's COMMIT path (reserve a number,
    ``commit``: persisted and pushed to every watcher), without a PREPARE round: the tests that use
    it have no expert worker that would ack one."""
    current = controller.current_map()
    expert_map = ExpertMap(phy2log, current.num_logical_experts, controller.reserve_version(), current.slot_owners)
    controller.commit(expert_map, "test", current.version)
    return expert_map


@pytest.fixture
def commit_map() -> Callable[..., ExpertMap]:
    """commit_map(controller, phy2log) → the next version, committed and pushed."""
    return _commit_map


def _wait_until(predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """wait_until(predicate, timeout_s=5.0) → the predicate's first truthy value, or AssertionError."""
    return _wait_until


@pytest.fixture
def start_server(model_dir: Path) -> Iterator[Callable[..., PlacementServer]]:
    """start_server(**PlacementConfig fields) → a running in-process PlacementServer."""
    servers: list[PlacementServer] = []

    def start(**overrides) -> PlacementServer:
        fields = dict(model_path=str(model_dir), host="127.0.0.1", port=0, dp_size=2, ep_size=2,
                      heartbeat_interval_ms=100, heartbeat_timeout_ms=1000, shutdown_grace_s=0.5)
        server = start_placement_server(PlacementConfig(**{**fields, **overrides}))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class Stubs:
    def __init__(self, address: str) -> None:
        self.channel = wait_for_channel(address, timeout_s=5.0)
        self.placement = placement_pb2_grpc.PlacementStub(self.channel)
        self.admin = placement_pb2_grpc.PlacementAdminStub(self.channel)

    def register(self, worker_id: str, role: int, fingerprint: str, previous_rank: int = -1,
                 address: str = "") -> placement_pb2.RegisterResponse:
        return self.placement.Register(placement_pb2.RegisterRequest(
            worker_id=worker_id, role=role, address=address or f"127.0.0.1:{hash(worker_id) % 1000 + 40000}",
            capacity=1.0, device="cpu", model_fingerprint=fingerprint, previous_rank=previous_rank), timeout=5)

    def register_all(self, fingerprint: str, dp_size: int = 2, ep_size: int = 2) -> dict[str, int]:
        ranks = {}
        for i in range(ep_size):
            ranks[f"expert-{i}"] = self.register(f"expert-{i}", EXPERT, fingerprint).rank
        for i in range(dp_size):
            ranks[f"attn-{i}"] = self.register(f"attn-{i}", ATTENTION, fingerprint).rank
        return ranks

    def workers(self) -> dict[str, placement_pb2.WorkerInfo]:
        response = self.admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5)
        return {w.worker_id: w for w in response.workers}

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def connect() -> Iterator[Callable[[str], Stubs]]:
    opened: list[Stubs] = []

    def open_stubs(address: str) -> Stubs:
        stubs = Stubs(address)
        opened.append(stubs)
        return stubs

    yield open_stubs
    for stubs in opened:
        stubs.close()

