"""``epserve up`` / ``DeploymentConfig`` of a hybrid deployment: a device per process kind, a device,
capacity and thread count per expert worker; bad values are refused before any process starts, with
the flag named."""

from __future__ import annotations

import contextlib
import re

import pytest

from epserve.cli import main as cli_main
from epserve.deployment_config import DeploymentConfig


def _pairs(args: list[str]) -> dict[str, str]:
    return dict(zip(args, args[1:]))


def test_each_process_kind_gets_its_own_device():
    config = DeploymentConfig("m", num_expert_workers=3, device="cpu", attention_device="cuda:0",
                              expert_devices=["cuda:0", "cuda:0", "cpu"], expert_capacities=[1, 1, 0.1],
                              expert_num_threads=[1, 1, 4])
    assert _pairs(config.attention_args())["--device"] == "cuda:0"
    experts = [_pairs(config.expert_args(i)) for i in range(3)]
    assert [e["--device"] for e in experts] == ["cuda:0", "cuda:0", "cpu"]
    assert [float(e["--capacity"]) for e in experts] == [1.0, 1.0, 0.1]
    assert [e["--num-threads"] for e in experts] == ["1", "1", "4"]


def test_device_is_the_default_and_auto_measures_capacities():
    config = DeploymentConfig("m", num_expert_workers=2, device="cuda", expert_capacities="auto")
    assert _pairs(config.attention_args())["--device"] == "cuda"
    for i in range(2):
        pairs = _pairs(config.expert_args(i))
        assert pairs["--device"] == "cuda" and pairs["--capacity"] == "auto" and "--num-threads" not in pairs
    assert "--capacity" not in DeploymentConfig("m", num_expert_workers=2).expert_args(0)    # the worker's default
    assert DeploymentConfig("m", moe_a2a_backend="local", expert_capacities="auto").num_expert_workers == 0


@pytest.mark.parametrize("fields,message", [
    (dict(num_expert_workers=3, expert_devices=["cuda:0", "cpu"]),
     r"--expert-devices has 2 entries, there are 3 expert workers \(--expert-workers\)"),
    (dict(num_expert_workers=2, expert_capacities=[1.0]), "--expert-capacities has 1 entries, there are 2"),
    (dict(num_expert_workers=2, expert_num_threads=[1, 2, 3]), "--expert-num-threads has 3 entries"),
    (dict(num_expert_workers=2, expert_capacities=[1.0, 0.0]), "--expert-capacities entries must be numbers > 0"),
    (dict(num_expert_workers=2, expert_capacities=[1.0, float("nan")]), "--expert-capacities entries"),
    (dict(num_expert_workers=2, expert_num_threads=[1, 0]), "--expert-num-threads entries must be >= 1"),
    (dict(num_expert_workers=2, expert_capacities="measure"), "--expert-capacities must be numbers, .* or auto"),
    (dict(num_expert_workers=1, expert_devices=["gpu0"]), "--expert-devices: 'gpu0' is not a device"),
    (dict(attention_device="cuda:x"), "--attention-device: 'cuda:x' is not a device"),
    (dict(device="cpu:1"), "--device: 'cpu:1' is not a device"),
    (dict(moe_a2a_backend="local", expert_devices=["cpu"]), "--expert-devices: with --moe-a2a-backend local"),
    (dict(num_expert_workers=2, moe_a2a_backend="cuda_ipc", attention_device="cuda:0",
          expert_devices=["cuda:0", "cpu"]),
     "--moe-a2a-backend cuda_ipc .* use --moe-a2a-backend torch"),
])
def test_bad_hybrid_deployments_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        DeploymentConfig("m", **fields)


@pytest.mark.parametrize("flags,message", [
    (["--expert-devices", "cuda:0,cuda:0,cpu"], r"--expert-devices has 3 entries, there are 2 expert workers"),
    (["--expert-workers", "3", "--expert-capacities", "1,1"], "--expert-capacities has 2 entries, there are 3"),
    (["--expert-capacities", "1,fast"], "argument --expert-capacities: expected a comma-separated list of float"),
    (["--attention-device", "tpu"], "--attention-device: 'tpu' is not a device"),
])
def test_epserve_up_refuses_bad_hybrid_flags_before_starting_anything(tiny_model, flags, message, capsys):
    with pytest.raises(SystemExit) if "argument" in message else contextlib.nullcontext():
        assert cli_main(["up", "--model-path", str(tiny_model), "--port", "0"] + flags) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err

