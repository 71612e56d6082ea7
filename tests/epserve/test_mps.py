"""When ``epserve up`` starts a CUDA MPS daemon (``--mps``), decided before any process starts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from epserve.mps import CONTROL, plan_mps, shared_gpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPLIT_ON_ONE_GPU = ["cuda", "cuda:0", "cuda:0"]          # attention + 2 expert workers


@pytest.fixture
def control_on_path(tmp_path, monkeypatch):
    """An executable named like MPS's control program on PATH (only its presence is read here)."""
    tool = tmp_path / CONTROL
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_shared_gpus_counts_processes_per_device():
    assert shared_gpus(["cuda", "cuda:0", "cpu"]) == ["cuda:0"]
    assert shared_gpus(["cuda:0", "cuda:1", "cpu", "cpu"]) == []
    assert shared_gpus(["cuda:1", "cuda:1", "cuda:0"]) == ["cuda:1"]


def test_auto_starts_one_only_for_cuda_ipc_sharing_a_gpu(control_on_path):
    env = {"PATH": os.environ["PATH"]}
    assert plan_mps("auto", "cuda_ipc", SPLIT_ON_ONE_GPU, env).start
    assert not plan_mps("auto", "torch", SPLIT_ON_ONE_GPU, env).start
    assert not plan_mps("auto", "cuda_ipc", ["cuda:0", "cuda:1"], env).start
    assert not plan_mps("auto", "cuda_ipc", ["cpu", "cpu"], env).start
    assert plan_mps("on", "torch", ["cpu"], env).start


def test_a_running_daemon_is_used_not_started(control_on_path):
    plan = plan_mps("on", "cuda_ipc", SPLIT_ON_ONE_GPU, {"CUDA_MPS_PIPE_DIRECTORY": "/somewhere"})
    assert not plan.start and not plan.warning


def test_off_and_a_missing_daemon_warn_about_time_slicing(monkeypatch, tmp_path):
    plan = plan_mps("off", "cuda_ipc", SPLIT_ON_ONE_GPU, {})
    assert not plan.start and "time-slice" in plan.warning and "cuda:0" in plan.warning
    monkeypatch.setenv("PATH", str(tmp_path))                     # no control program anywhere
    plan = plan_mps("auto", "cuda_ipc", SPLIT_ON_ONE_GPU, {})
    assert not plan.start and CONTROL in plan.warning
    with pytest.raises(ValueError, match="--mps on"):
        plan_mps("on", "cuda_ipc", SPLIT_ON_ONE_GPU, {})
    with pytest.raises(ValueError, match="--mps must be one of"):
        plan_mps("sometimes", "cuda_ipc", SPLIT_ON_ONE_GPU, {})


def test_epserve_up_refuses_mps_on_without_the_daemon_before_starting_anything(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))     # python, and no MPS control program
    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    done = subprocess.run([sys.executable, "-m", "epserve", "up", "--mps", "on", "--port", "0", "--no-auth-token",
                           "--state-db", "none", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    assert done.returncode == 2, done.stderr
    assert "--mps on" in done.stderr and CONTROL in done.stderr
    assert not list(tmp_path.glob("*.log"))                       # no process was started
