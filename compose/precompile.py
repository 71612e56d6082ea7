"""Write bytecode for what epserve's processes import, and nothing else (image build step).

torch is installed with `pip install --no-compile`: compiling all of its ~4k modules costs
~30 s of a cold build, and a process imports a fraction of them. Importing every module of
the project packages here (as root, bytecode writes on) leaves a .pyc for each module they
pull in, so containers start as fast as from a fully compiled install. Modules whose optional
dependencies are absent (triton, deep_gemm, ...) are skipped: they are listed, not fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path


def module_names(package: str) -> list[str]:
    """Every module of an installed package by its file, namespace subpackages (folders without
    ``__init__.py``, like ``epserve.gateway``) included: ``pkgutil.walk_packages`` skips those."""
    root = Path(importlib.import_module(package).__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def main() -> int:
    # The project's packages, as installed (pyproject.toml's packages.find): just `epserve`.
    packages = importlib.metadata.distribution("epserve").read_text("top_level.txt").split()
    imported, skipped = 0, []
    for package in packages:
        try:
            names = module_names(package)
        except ImportError as exc:
            skipped.append(f"{package} ({exc})")
            continue
        for name in names:
            if name.rsplit(".", 1)[-1] == "__main__":
                continue  # runs the process
            try:
                importlib.import_module(name)
                imported += 1
            except ImportError as exc:
                skipped.append(f"{name} ({exc})")
    print(f"precompile: imported {imported} modules; skipped {len(skipped)}", file=sys.stderr)
    for line in skipped:
        print(f"  skipped {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
