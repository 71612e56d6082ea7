"""Regenerate the checked-in gRPC Python code: ``python -m epserve.protos.codegen``.

Pinned generator: grpcio-tools (version pinned in pyproject's ``dev`` extra). The sources are
``protos/*.proto``, compiled as ``epserve/protos/*.proto`` (the package's link to that folder)
with imports rooted at the repository, so generated modules import each other as
``epserve.protos.<name>_pb2``. ``--out DIR`` writes ``DIR/epserve/protos/`` instead of the
repository (the staleness test uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = "epserve/protos"  # the import path of the generated modules, relative to REPO_ROOT
PROTO_FILES = sorted(f"{PACKAGE_DIR}/{p.name}" for p in (REPO_ROOT / "protos").glob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"     # google/protobuf/*.proto, shipped with grpcio-tools
    args = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    generate(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
