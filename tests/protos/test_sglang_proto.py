"""The vendored SGLang scheduler protocol must equal the smg-grpc-proto wheel's (the dev dependency
pinned in pyproject.toml): SMG speaks exactly that wire contract. Only the header comment and the
path of the common.proto import differ."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from epserve.protos import codegen

VENDORED = {"sglang_scheduler.proto": "sglang_scheduler.proto", "smg_common.proto": "common.proto"}
IMPORT_HERE = 'import "epserve/protos/smg_common.proto";'
IMPORT_THERE = 'import "common.proto";'


def wheel_proto_dir() -> Path:
    spec = importlib.util.find_spec("smg_grpc_proto")   # located, not imported: its modules would clash
    if spec is None or spec.origin is None:
        pytest.skip("smg-grpc-proto is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "proto"


@pytest.mark.parametrize("ours,theirs", sorted(VENDORED.items()))
def test_vendored_proto_equals_the_wheel(ours: str, theirs: str) -> None:
    text = (codegen.REPO_ROOT / "protos" / ours).read_text()
    body = text[text.index('syntax = "proto3";'):]
    assert all(line.startswith("//") or not line for line in text[:text.index('syntax = "proto3";')].splitlines())
    assert body.replace(IMPORT_HERE, IMPORT_THERE) == (wheel_proto_dir() / theirs).read_text()


def test_generated_service_has_the_wire_names() -> None:
    from epserve.protos import sglang_scheduler_pb2

    service = sglang_scheduler_pb2.DESCRIPTOR.services_by_name["SglangScheduler"]
    assert service.full_name == "sglang.grpc.scheduler.SglangScheduler"
    assert {"Generate", "HealthCheck", "GetModelInfo", "Abort", "GetLoads", "GetServerInfo",
            "GetTokenizer"} <= set(service.methods_by_name)
