"""``epserve admin`` as a subprocess against an in-process placement service with fake workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_rebalance_fakes import FakeCluster, report_load, skewed_counts

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def placement(start_server):
    server = start_server()
    cluster = FakeCluster(server.controller).start(heartbeat_s=0.05)
    deadline = time.monotonic() + 5
    while not all(a.version == 1 for a in cluster.attention):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield server
    cluster.stop()


def admin(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epserve", "admin", "--placement", address, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_placement_workers_plan_rebalance_rollback(placement):
    address = placement.address
    shown = admin(address, "placement", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["version"] == 1 and data["physical_to_logical_map"] == [list(range(8))] * 3
    table = admin(address, "placement")
    assert table.returncode == 0 and "map version 1" in table.stdout and "expert-0" in table.stdout

    workers = admin(address, "workers")
    assert workers.returncode == 0, workers.stderr
    lines = workers.stdout.splitlines()
    assert lines[0].split()[:4] == ["WORKER", "ROLE", "RANK", "STATE"] and len(lines) == 5
    assert any(line.split()[:4] == ["expert-1", "expert", "3", "ALIVE"] for line in lines)

    report_load(placement.controller, skewed_counts(placement.controller))
    plan = admin(address, "plan", "--json", "--layers", "0,2")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["changed_layers"] == [0, 2] and planned["balancedness_after"] > planned["balancedness_before"]

    done = admin(address, "--timeout", "30", "rebalance")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("version 1 → 2 (1 version)") and "experts moved" in done.stdout
    back = json.loads(admin(address, "rollback", "--json").stdout)
    assert (back["previous_version"], back["version"]) == (2, 3)
    assert json.loads(admin(address, "placement", "--json").stdout)["physical_to_logical_map"] == data[
        "physical_to_logical_map"]


def test_snapshots_pause_and_errors(placement, tmp_path):
    address = placement.address
    exported = tmp_path / "snap.json"
    result = admin(address, "export-snapshot", str(exported))
    assert result.returncode == 0 and f"wrote {exported}" in result.stdout
    assert json.loads(exported.read_text())["physical_to_logical_map"] == [list(range(8))] * 3
    as_pt = tmp_path / "snap.pt"
    assert admin(address, "export-snapshot", str(as_pt)).returncode == 0 and as_pt.stat().st_size > 0

    flipped = json.loads(exported.read_text())
    flipped["physical_to_logical_map"] = [list(reversed(range(8)))] * 3
    other = tmp_path / "flipped.json"
    other.write_text(json.dumps(flipped))
    imported = json.loads(admin(address, "import-snapshot", str(other), "--json").stdout)
    assert imported["version"] == 2
    assert admin(address, "import-snapshot", str(as_pt)).stdout.startswith("version 2 → 3")

    assert json.loads(admin(address, "pause-eplb", "--json").stdout) == {"enabled": False, "paused": True}
    assert "running" in admin(address, "resume-eplb").stdout

    bad = admin(address, "set-redundancy", "1")
    assert bad.returncode == 1 and "set-redundancy: INVALID_ARGUMENT:" in bad.stderr and "split evenly" in bad.stderr
    missing = admin(address, "drain", "nobody")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    wrong_model = tmp_path / "wrong.json"
    wrong_model.write_text(json.dumps({"num_logical_experts": 4, "physical_to_logical_map": [[0, 1, 2, 3]] * 3}))
    refused = admin(address, "import-snapshot", str(wrong_model))
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    assert admin(address, "import-snapshot", str(tmp_path / "absent.json")).returncode == 2
    assert json.loads(admin(address, "placement", "--json").stdout)["version"] == 3  # errors changed nothing


def test_unreachable_placement_fails_within_the_deadline(free_port):
    start = time.monotonic()
    result = admin(f"127.0.0.1:{free_port()}", "--timeout", "2", "placement")
    assert result.returncode == 1 and "placement: UNAVAILABLE" in result.stderr
    assert time.monotonic() - start < 20
