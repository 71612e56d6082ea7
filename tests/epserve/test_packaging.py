"""epserve installs one import name, ``epserve``, and nothing in the repository shadows anyone else's.

The process packages and ``kernels/`` keep their top-level folders; ``epserve/<name>`` links to
each. A regular package named ``kernels`` (or ``gateway``, ``protos``, ...) at the repository
root would shadow the PyPI distribution of that name whenever the root is on ``sys.path``, as
``python -m pytest`` puts it there (transformers 5.25 imports Hugging Face's ``kernels``).
"""

from __future__ import annotations

import csv
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FOLDERS = ["gateway", "attention_worker", "expert_worker", "placement_service", "kernels", "protos"]


def _import_names(record_paths: list[str]) -> set[str]:
    """Top-level import names a distribution's files create in site-packages."""
    names = set()
    for path in record_paths:
        first = path.split("/", 1)[0]
        if (first in ("..", "__pycache__") or first.endswith((".dist-info", ".data", ".pth"))
                or first.startswith("__editable__")):  # console scripts, caches, metadata, setuptools' finder
            continue
        names.add(first.removesuffix(".py"))
    return names


def test_wheel_installs_only_the_epserve_import_name(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes epserve.egg-info beside the sources it builds.
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO_ROOT / name, source / name)
    for folder in ["epserve", *PACKAGE_FOLDERS]:
        shutil.copytree(REPO_ROOT / folder, source / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("epserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        (record,) = [f for f in files if f.endswith(".dist-info/RECORD")]
        recorded = [row[0] for row in csv.reader(zf.read(record).decode().splitlines()) if row]
        (top_level,) = [f for f in files if f.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["epserve"]
    assert _import_names(recorded) == {"epserve"}, sorted(_import_names(recorded))
    for folder in PACKAGE_FOLDERS:
        assert any(f.startswith(f"epserve/{folder}/") and f.endswith(".py") for f in files), folder
    assert any(f.startswith("epserve/kernels/configs/") and f.endswith(".json") for f in files)
    assert "epserve/protos/generation.proto" in files


def test_installed_distribution_exposes_only_epserve() -> None:
    # The one in site-packages (the working directory may hold an epserve.egg-info of its own).
    (dist,) = importlib.metadata.distributions(name="epserve", path=[sysconfig.get_paths()["purelib"]])
    assert dist.read_text("top_level.txt").split() == ["epserve"]
    assert _import_names([str(f) for f in dist.files or []]) <= {"epserve"}


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_repository_folders_are_not_importable_packages(folder: str) -> None:
    """From the repository root, ``import <folder>`` never finds a regular package of ours: the
    folder is at most a namespace portion, which any installed package or module of that name beats."""
    assert not (REPO_ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow PyPI's {folder!r}"
    assert (REPO_ROOT / "epserve" / folder).resolve() == (REPO_ROOT / folder).resolve()
    probe = ("import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); "
             "print('none' if s is None else 'namespace' if s.origin is None else s.origin)")
    found = subprocess.run([sys.executable, "-c", probe, folder], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert found in ("namespace", "none") or not Path(found).resolve().is_relative_to(REPO_ROOT / folder), found


def test_hugging_face_kernels_is_not_shadowed_from_the_repository_root() -> None:
    pytest.importorskip("kernels")  # transformers >= 5.25 installs it
    code = "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not Path(out.stdout.strip()).resolve().is_relative_to(REPO_ROOT / "kernels")


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_process_entry_points_resolve_from_any_working_directory(cwd: str, tmp_path: Path) -> None:
    where = REPO_ROOT if cwd == "repo" else tmp_path
    for module in ["epserve.gateway", "epserve.placement_service", "epserve.attention_worker", "epserve.expert_worker"]:
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=where, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (module, out.stderr[-2000:])
        assert f"python -m {module}" in out.stdout
    epserve = Path(sys.executable).with_name("epserve")
    if epserve.exists():
        out = subprocess.run([str(epserve), "--help"], cwd=where, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "make-tiny-model" in out.stdout, out.stderr[-2000:]
