"""Expert distribution end to end: a deployment recording per_pass with the heatmap on and
/metrics served but --enable-expert-distribution-metrics off; requests through the gateway, then
``epserve admin dump-expert-distribution`` as a subprocess and the .pt files it made."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.model_config import load_model_spec
from epserve.gateway.client import generate

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("Once upon a time", "The weather today", "Expert parallelism is")
MAX_NEW_TOKENS = 4
HEATMAP_INTERVAL = 2


@pytest.fixture(scope="module")
def recording(tiny_model, tmp_path_factory):
    """2 attention workers (per_pass, heatmap every 2 passes), 2 expert workers, metrics on, after
    PROMPTS were served; yields (deployment, routed tokens, heatmap directory)."""
    heatmap_dir = tmp_path_factory.mktemp("heatmap")
    config = DeploymentConfig(model_path=str(tiny_model), num_attention_workers=2, num_expert_workers=2,
                              dtype="float32", metrics=True, expert_distribution_recorder_mode="per_pass",
                              expert_distribution_dir=str(heatmap_dir),
                              log_dir=str(tmp_path_factory.mktemp("logs")))
    with pytest.MonkeyPatch.context() as env:      # children inherit the launcher's environment
        env.setenv("EPSERVE_EPLB_HEATMAP_COLLECTION_INTERVAL", str(HEATMAP_INTERVAL))
        deployment = LocalDeployment(config)
        deployment.start()
    try:
        routed = 0
        for i, prompt in enumerate(PROMPTS):
            result = generate(f"127.0.0.1:{deployment.gateway_port}", prompt, request_id=f"dist-{i}",
                              max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, temperature=0.0, timeout_s=120)
            assert result.final.usage.completion_tokens == MAX_NEW_TOKENS
            routed += result.final.usage.prompt_tokens + MAX_NEW_TOKENS - 1   # the last token is never fed back
        yield deployment, routed, heatmap_dir
    finally:
        deployment.stop()


def admin(deployment: LocalDeployment, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epserve", "admin", "--placement",
                           f"127.0.0.1:{deployment.placement_port}", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_dump_counts_every_routed_choice(recording, tiny_model, tmp_path):
    deployment, routed, _ = recording
    spec = load_model_spec(tiny_model)
    done = admin(deployment, "dump-expert-distribution", str(tmp_path / "dumps"), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["workers"]
    assert sorted(r["worker_id"] for r in rows) == ["attention-0", "attention-1"]
    total = 0
    for row in rows:
        assert row["status_code"] == "OK" and row["mode"] == "per_pass"
        assert Path(row["path"]).name.startswith(f"expert_distribution_{row['worker_id']}_")
        dumped = torch.load(row["path"])
        assert dumped["worker_id"] == row["worker_id"] and len(dumped["per_pass"]) == row["num_passes"]
        assert dumped["slot_owners"] == ["expert-0", "expert-1"] or dumped["slot_owners"] == ["expert-1", "expert-0"]
        for counts in dumped["per_pass"]:
            assert counts.shape == (spec.num_moe_layers, spec.num_experts)
            assert len(set(counts.sum(1).tolist())) == 1          # every MoE layer routes the same tokens
        total += sum(int(counts.sum()) for counts in dumped["per_pass"])
    assert total == routed * spec.num_experts_per_tok * spec.num_moe_layers


def test_heatmap_lines_and_no_expert_series_without_the_flag(recording, tiny_model):
    deployment, routed, heatmap_dir = recording
    spec = load_model_spec(tiny_model)
    records = []
    for worker in ("attention-0", "attention-1"):
        path = heatmap_dir / f"expert_heatmap_{worker}.jsonl"
        deadline = time.monotonic() + 10                   # written by the worker's heatmap thread
        while not path.is_file() or not path.read_text().strip():
            assert time.monotonic() < deadline, f"no heatmap from {worker}"
            time.sleep(0.1)
        records += [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert record["num_passes"] == HEATMAP_INTERVAL and len(record["tokens"]) == spec.num_moe_layers
        assert sorted(record["expert_workers"]) == ["expert-0", "expert-1"] and record["map_version"] >= 1
    heat = sum(sum(map(sum, record["tokens"])) for record in records)
    assert 0 < heat <= routed * spec.num_experts_per_tok * spec.num_moe_layers

    with urllib.request.urlopen(f"http://{deployment.metrics_endpoints['attention-0']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "epserve_attention_map_version" in text
    assert "epserve_attention_expert_tokens_total" not in text and "epserve_attention_expert_balancedness" not in text


def test_dump_errors_reach_the_cli(recording, tmp_path):
    deployment, _, _ = recording
    relative = admin(deployment, "dump-expert-distribution", "dumps")
    assert relative.returncode == 1 and "INVALID_ARGUMENT" in relative.stderr and "directory" in relative.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    blocked = admin(deployment, "dump-expert-distribution", str(blocker / "sub"))
    assert blocked.returncode == 1
    for worker in ("attention-0", "attention-1"):
        assert f"{worker}: FAILED_PRECONDITION: cannot write {blocker / 'sub'}" in blocked.stderr


def test_flag_without_metrics_is_refused_by_up(tiny_model):
    refused = subprocess.run([sys.executable, "-m", "epserve", "up", "--model-path", str(tiny_model),
                              "--enable-expert-distribution-metrics"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "add --metrics" in refused.stderr
