"""The checked-in generated code must equal a fresh run of `python -m epserve.protos.codegen`."""

from pathlib import Path

import pytest

from epserve.protos import codegen

pytest.importorskip("grpc_tools")


def test_generated_code_is_current(tmp_path: Path) -> None:
    codegen.generate(tmp_path)
    generated = sorted((tmp_path / codegen.PACKAGE_DIR).glob("*_pb2*.py*"))
    assert generated, "codegen produced nothing"
    for fresh in generated:
        checked_in = codegen.REPO_ROOT / "protos" / fresh.name
        assert checked_in.exists(), f"{checked_in.name} is not checked in; run python -m epserve.protos.codegen"
        assert checked_in.read_text() == fresh.read_text(), (
            f"protos/{fresh.name} is stale; run python -m epserve.protos.codegen")
    stale = {p.name for p in (codegen.REPO_ROOT / "protos").glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"generated files without a .proto source: {sorted(stale)}"
