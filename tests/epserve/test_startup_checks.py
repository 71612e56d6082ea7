"""``epserve up`` catches misconfigurations before it starts a process (startup_checks.py), and
reports what only a child can find out with the child's own error line (supervisor.ChildLog)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epserve.deployment_config import DeploymentConfig
from epserve.startup_checks import check_checkpoint, check_deployment
from epserve.supervisor import RestartPolicy, RestartState, error_line

REPO_ROOT = Path(__file__).resolve().parents[2]


def config(model, **overrides) -> DeploymentConfig:
    return DeploymentConfig(model_path=str(model), **{"num_attention_workers": 1, "num_expert_workers": 2,
                                                      **overrides})


def test_sizes_and_ports_are_checked_before_anything_starts(tiny_model):
    cases = [(dict(num_redundant_experts=1), "do not split evenly over 2 expert workers"),
             (dict(gateway_port=70000), "--port 70000 is not a port"),
             (dict(gateway_port=45678, placement_port=45678), "--port and --placement-port are both 45678")]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            check_deployment(config(tiny_model, **overrides))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="cannot listen"):
            check_deployment(config(tiny_model, placement_port=busy.getsockname()[1]))
    check_deployment(config(tiny_model))


def test_truncated_checkpoint_is_named(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 1000)
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        check_checkpoint(copy)
    check_deployment(config(copy, load_format="dummy"))        # dummy weights read no checkpoint


def up(args: list[str], timeout_s: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epserve", "up", "--port", "0", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def test_up_refuses_at_once_and_starts_nothing(tiny_model):
    started = time.monotonic()
    result = up(["--model-path", str(tiny_model), "--ep-num-redundant-experts", "1", "--no-auth-token"])
    assert result.returncode == 2 and "do not split evenly" in result.stderr
    assert "started" not in result.stderr and time.monotonic() - started < 30


@pytest.mark.slow
def test_a_child_failing_at_start_is_reported_with_its_own_error_line(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = dict(os.environ, EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL="5", EPSERVE_CACHE_DIR=str(tmp_path / "cache"))
    result = up(["--model-path", str(tiny_model), "--moe-a2a-backend", "local", "--attention-workers", "1",
                 "--expert-distribution-dir", str(blocker / "sub"), "--log-dir", str(tmp_path / "logs")], env=env)
    assert result.returncode == 1, result.stderr
    assert "attention-0 exited with code 2" in result.stderr, result.stderr
    assert "attention_worker: --expert-distribution-dir: cannot write" in result.stderr, result.stderr
    assert not list((tmp_path / "cache" / "state").glob("*.db"))           # its state db is cleaned up


def test_error_line_and_restart_policy():
    assert error_line(["INFO starting", "Traceback (most recent call last):", '  File "x.py", line 1',
                       "ValueError: bad flag"]) == "ValueError: bad flag"
    assert error_line(["x ERROR epserve.worker: cannot join", "x INFO shutting down"]) == \
        "x ERROR epserve.worker: cannot join"
    assert error_line(["just a line"]) == "just a line" and error_line(["just a line"], strict=True) == ""
    policy = RestartPolicy(max_restarts=2, window_s=100, backoff_initial_s=1, backoff_max_s=3)
    state = RestartState()
    assert state.died(policy, 0.0) and state.backoff_s == 1
    assert state.died(policy, 10.0) and state.backoff_s == 2
    assert not state.died(policy, 20.0) and state.gave_up                    # a third death within the window
    fresh = RestartState()
    assert all(fresh.died(policy, t) for t in (0.0, 150.0, 300.0))          # deaths far apart never give up
