"""The import graph has three layers, and arrows only point down:

    top        the CLI and the launcher (``epserve/cli.py``, ``__main__.py``, ``commands/``,
               ``deployment*.py``, ``supervisor.py``, ``startup_checks.py``, ``mps.py``)
    processes  ``gateway``, ``placement_service``, ``attention_worker``, ``expert_worker``
    library    everything else under ``epserve/`` (kernels, protos, models, data plane, ...)

The library imports neither a process nor the top layer, a process imports no other process and
not the top layer, and no imports close a cycle. Read from the source (``ast``), every ``import``
statement counted, also those inside functions: a lazy import is still an arrow, and a cycle
through one is still two modules that cannot be understood apart. Only imports under
``if TYPE_CHECKING`` (never run) are left out.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("gateway", "placement_service", "attention_worker", "expert_worker")
TOP = ("__main__", "cli", "commands", "deployment", "deployment_config", "supervisor", "startup_checks", "mps")


def module_files(package_dir: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``package_dir`` (links to the process folders followed)."""
    files = {}
    for folder, dirs, names in os.walk(package_dir, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
                files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere, inside functions too (``from a import b``
    counts ``a.b`` when it is a module); imports under ``if TYPE_CHECKING`` are skipped."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module if not node.level else ".".join(filter(None, (base, node.module)))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {module for module in found if module in known and module != name}


def layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part if part in PROCESSES else "top" if part in TOP else "library"


def wrong_arrows(files: dict[str, Path]) -> list[str]:
    """Every import that points up or across: library -> process/top, process -> other process/top."""
    wrong = []
    for name, path in files.items():
        for target in imported_modules(name, path, set(files)):
            source_layer, target_layer = layer(name), layer(target)
            if target_layer != source_layer and source_layer != "top" and target_layer != "library":
                wrong.append(f"{name} -> {target}")
    return sorted(wrong)


def import_cycles(files: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph (Tarjan)."""
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def test_arrows_point_down_from_the_top_to_the_library() -> None:
    files = module_files(REPO_ROOT / "epserve")
    assert {layer(name) for name in files} == {"top", "library", *PROCESSES}      # the walk found every layer
    assert wrong_arrows(files) == []


def test_no_import_cycle() -> None:
    assert import_cycles(module_files(REPO_ROOT / "epserve")) == []


def test_the_checks_catch_an_upward_arrow_and_a_cycle(tmp_path: Path) -> None:
    package = tmp_path / "epserve"
    (package / "gateway").mkdir(parents=True)
    (package / "dataplane").mkdir()
    (package / "__init__.py").write_text("")
    (package / "sampling.py").write_text("def f():\n    from epserve.gateway import server\n")
    (package / "gateway" / "server.py").write_text("from epserve.gateway import router\n")
    (package / "gateway" / "router.py").write_text("from . import server\nfrom epserve import sampling\n")
    (package / "dataplane" / "__init__.py").write_text("def make():\n    from epserve.dataplane.torch import Backend\n")
    (package / "dataplane" / "torch.py").write_text(
        "from epserve.dataplane.base import Header\nclass Backend:\n    def f(self):\n        import epserve.dataplane\n")
    (package / "dataplane" / "base.py").write_text(      # a type-only import back: no arrow
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from epserve.dataplane.torch import Backend\nHeader = int\n")
    files = module_files(package)
    assert wrong_arrows(files) == ["epserve.sampling -> epserve.gateway.server"]
    assert sorted(import_cycles(files)) == [
        ["epserve.dataplane", "epserve.dataplane.torch"],                                 # through two functions
        ["epserve.gateway.router", "epserve.gateway.server", "epserve.sampling"],        # the upward arrow closes it
    ]
