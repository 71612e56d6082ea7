"""``epserve up`` / ``DeploymentConfig``: colocated deployments (``--moe-a2a-backend local``: no expert
workers) and the attention workers' engine flags, checked before any process starts."""

from __future__ import annotations

import re

import pytest

from epserve.cli import main as cli_main
from epserve.deployment_config import DeploymentConfig


def test_local_has_no_expert_workers_and_the_others_keep_theirs():
    assert DeploymentConfig("m", moe_a2a_backend="local").num_expert_workers == 0
    assert DeploymentConfig("m", moe_a2a_backend="local", num_expert_workers=0).num_expert_workers == 0
    assert DeploymentConfig("m").num_expert_workers == 1
    assert DeploymentConfig("m", num_expert_workers=3, num_redundant_experts=1).num_expert_workers == 3


@pytest.mark.parametrize("fields,message", [
    (dict(moe_a2a_backend="local", num_expert_workers=2),
     r"--expert-workers \(--ep-size\) 2: with --moe-a2a-backend local every attention worker holds all experts"),
    (dict(moe_a2a_backend="local", num_redundant_experts=2), "--ep-num-redundant-experts 2: .*leave it at 0"),
    (dict(moe_a2a_backend="local", init_expert_location="s.json"), "--init-expert-location 's.json'"),
    (dict(moe_a2a_backend="local", extra_expert_args=["--capacity", "2"]), "expert worker flags"),
    (dict(num_expert_workers=0), r"--expert-workers \(--ep-size\) must be >= 1, got 0 .*--moe-a2a-backend local"),
    (dict(num_attention_workers=0), "--attention-workers must be >= 1"),
    (dict(attention_backend="flashinfer"), "--attention-backend must be one of"),
    (dict(cuda_graph_max_bs=-1), "--cuda-graph-max-bs must be >= 0"),
    (dict(max_running_requests=0), "--max-running-requests must be >= 1"),
    (dict(num_kv_blocks=0), "--num-kv-blocks must be >= 1"),
    (dict(max_num_batched_tokens=0), "--max-num-batched-tokens must be >= 1"),
    (dict(context_length=-1), "--context-length must be >= 0"),
])
def test_bad_deployments_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        DeploymentConfig("m", **fields)


def test_attention_workers_get_the_backend_and_engine_flags():
    colocated = DeploymentConfig("m", moe_a2a_backend="local", moe_runner_backend="triton",
                                 attention_backend="triton", cuda_graph_max_bs=64, disable_cuda_graph=True,
                                 disable_overlap_schedule=True, max_running_requests=8, num_kv_blocks=1024,
                                 max_num_batched_tokens=4096, context_length=0)
    args = colocated.attention_args()
    pairs = dict(zip(args, args[1:]))
    assert pairs["--moe-a2a-backend"] == "local" and pairs["--moe-runner-backend"] == "triton"
    assert pairs["--attention-backend"] == "triton" and pairs["--cuda-graph-max-bs"] == "64"
    assert (pairs["--max-running-requests"], pairs["--num-kv-blocks"], pairs["--max-num-batched-tokens"],
            pairs["--context-length"]) == ("8", "1024", "4096", "0")
    assert "--disable-cuda-graph" in args and "--disable-overlap-schedule" in args
    plain = DeploymentConfig("m").attention_args()          # defaults: the worker's own
    assert plain[plain.index("--moe-a2a-backend") + 1] == "torch" and "--moe-runner-backend" not in plain
    assert plain[plain.index("--attention-backend") + 1] == "auto"
    assert not {"--cuda-graph-max-bs", "--disable-cuda-graph", "--disable-overlap-schedule", "--num-kv-blocks",
                "--context-length"} & set(plain)


@pytest.mark.parametrize("flags,message", [
    (["--moe-a2a-backend", "local", "--expert-workers", "2"], r"--expert-workers \(--ep-size\) 2: .*leave it out"),
    (["--moe-a2a-backend", "local", "--ep-size", "1"], r"--expert-workers \(--ep-size\) 1"),
    (["--moe-a2a-backend", "local", "--enable-eplb"], "--enable-eplb: .*no expert placement to rebalance"),
    (["--moe-a2a-backend", "local", "--tp-size", "2"], "--tp-size 2: .*leave --tp-size out"),
    (["--moe-a2a-backend", "local", "--expert-load-duty-cycle", "0.5"], "--expert-load-duty-cycle: "),
    (["--moe-a2a-backend", "local", "--ep-num-redundant-experts", "2"], "--ep-num-redundant-experts 2"),
    (["--expert-workers", "0"], r"must be >= 1, got 0 \(for no expert workers: --moe-a2a-backend local"),
    (["--cuda-graph-max-bs", "-2"], "--cuda-graph-max-bs must be >= 0, got -2"),
    (["--num-kv-blocks", "0"], "--num-kv-blocks must be >= 1"),
])
def test_epserve_up_refuses_before_starting_anything(tiny_model, flags, message, capsys):
    assert cli_main(["up", "--model-path", str(tiny_model), "--port", "0"] + flags) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
