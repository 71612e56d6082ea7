"""Live rebalancing end to end: real processes, a router-skewed tiny model, EPLB on.

Clients stream greedy requests the whole time; EPLB rebalances from the load the attention
workers report (chunk by chunk: one layer per map version); every completion must equal
transformers' greedy output (float64), before, during and after each map change. Then the
placement service is killed mid-traffic and started again on the same port with the same
--state-db: no request fails, the map version is the one it had, and rebalancing works again
through the restarted service. Every worker process must still be running at the end.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from epserve.deployment import LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import generate
from epserve.protos import placement_pb2, placement_pb2_grpc

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CANDIDATES = [f"Story {i}: the {w} was" for i, w in enumerate(
    ["river", "mountain", "lantern", "garden", "engine", "market", "winter", "letter", "harbor", "forest",
     "candle", "violin", "desert", "castle", "signal", "orchard"])]
PROMPTS: list[str] = []  # the 8 candidates with the longest reference completions (set by ``expected``)
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def skewed_model(tiny_model_factory) -> Path:
    return tiny_model_factory(seed=3, num_experts=16, top_k=2, router_skew=1.2)


@pytest.fixture(scope="module")
def expected(skewed_model) -> dict[str, str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(skewed_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(skewed_model)
    out, lengths = {}, {}
    for prompt in CANDIDATES:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        out[prompt], lengths[prompt] = tok.decode(generated, skip_special_tokens=True), len(generated)
    PROMPTS[:] = sorted(CANDIDATES, key=lambda p: -lengths[p])[:8]  # long ones: many decode steps each
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Traffic:
    """Closed-loop greedy clients until stopped; every result (or error) is kept with the map
    version seen before and after it."""

    def __init__(self, gateway: str, placement: str, num_clients: int = 3) -> None:
        self.gateway, self.placement = gateway, placement
        self.results: list[tuple[str, str, int, int]] = []  # prompt, text, version before, after
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._versions = {"last": 0}
        self._pool = ThreadPoolExecutor(num_clients + 1)
        self._futures = [self._pool.submit(self._client, i) for i in range(num_clients)]
        self._futures.append(self._pool.submit(self._watch_version))

    def _watch_version(self) -> None:
        with grpc.insecure_channel(self.placement) as channel:
            admin = placement_pb2_grpc.PlacementAdminStub(channel)
            while not self._stop.wait(0.05):
                try:
                    response = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=2)
                    self._versions["last"] = response.map.version
                except grpc.RpcError:
                    pass  # placement restarting

    def _client(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 3
            before = self._versions["last"]
            try:
                text = generate(self.gateway, prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, timeout_s=60).text
            except grpc.RpcError as exc:
                self.errors.append(f"{prompt!r}: {exc.code().name} {exc.details()}")
                continue
            self.results.append((prompt, text, before, self._versions["last"]))

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=90)
        self._pool.shutdown()


def admin_stub(address: str) -> placement_pb2_grpc.PlacementAdminStub:
    return placement_pb2_grpc.PlacementAdminStub(grpc.insecure_channel(address))


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def restart_placement(deployment: LocalDeployment, log_dir: Path) -> subprocess.Popen:
    """Kill the placement child (SIGKILL: a crash) and start the same command again."""
    child = next(c for c in deployment.children if c.name == "placement")
    command = list(child.process.args)
    child.process.send_signal(signal.SIGKILL)
    child.process.wait(timeout=10)
    log = open(log_dir / "placement-restarted.log", "ab")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    assert line.startswith("PLACEMENT_PORT="), (line, (log_dir / "placement-restarted.log").read_text()[-2000:])
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    return process


def test_rebalance_under_traffic_and_placement_restart(skewed_model, expected, tmp_path):
    log_dir = tmp_path / "logs"
    config = DeploymentConfig(
        model_path=str(skewed_model), num_attention_workers=2, num_expert_workers=2, num_redundant_experts=2,
        dtype="float64", placement_port=free_port(), state_db=str(tmp_path / "placement.db"), log_dir=str(log_dir),
        extra_placement_args=["--enable-eplb", "--eplb-rebalance-num-iterations", "20",
                              "--eplb-rebalance-layers-per-chunk", "1", "--eplb-min-gain", "0.02"],
        extra_attention_args=["--load-report-interval-s", "0.5"])
    restarted = None
    with LocalDeployment(config) as deployment:
        gateway = f"127.0.0.1:{deployment.gateway_port}"
        placement = f"127.0.0.1:{deployment.placement_port}"
        admin = admin_stub(placement)
        get = lambda: admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)  # noqa: E731
        assert get().map.version == 1
        traffic = Traffic(gateway, placement)
        try:
            # 1. Skewed traffic → EPLB rebalances (each layer its own version) while clients run.
            status = wait_for(lambda: (s := get()).num_rebalances >= 1 and s, 60, "an EPLB rebalance")
            assert status.map.version >= 3 and status.last_operation == "eplb"  # 2 layers → 2 versions
            wait_for(lambda: any(after > before for _, _, before, after in traffic.results), 30,
                     "a request that ran across a map change")

            # 2. Placement crashes and restarts mid-traffic: workers keep serving on their map.
            admin.PauseEplb(placement_pb2.PauseEplbRequest(), timeout=5)
            before = wait_for(lambda: (s := get()) and not s.rebalance_in_progress and s, 60,
                              "the EPLB decision under way to finish")
            served = len(traffic.results)
            restarted = restart_placement(deployment, log_dir)
            after = wait_for(lambda: _try(get), 30, "the restarted placement")
            assert (after.map.version, list(after.versions)) == (before.map.version, list(before.versions))
            assert after.map.phy2log == before.map.phy2log and after.eplb_paused
            wait_for(lambda: all(w.state == placement_pb2.WORKER_STATE_ALIVE and w.map_version == before.map.version
                                 for w in _try(lambda: admin.ListWorkers(placement_pb2.ListWorkersRequest(),
                                                                         timeout=5).workers) or [None]
                                 if w is not None) and _heard_all(admin), 30, "workers re-registered")
            wait_for(lambda: len(traffic.results) > served + 6, 60, "traffic after the restart")

            # 3. The restarted service changes the map again, make-before-break, through the same
            #    workers (EPLB still paused, so the admin calls do not race its decisions): the two
            #    workers' slots swapped (every expert moves), rolled back, then R 2 → 0.
            snapshot = json.loads(admin.ExportSnapshot(placement_pb2.ExportSnapshotRequest(), timeout=5).json)
            snapshot["physical_to_logical_map"] = [row[9:] + row[:9] for row in snapshot["physical_to_logical_map"]]
            swapped = admin.ImportSnapshot(placement_pb2.Snapshot(json=json.dumps(snapshot)), timeout=60)
            assert swapped.version > before.map.version and swapped.experts_moved > 18  # most of 2 × 18 slots
            back = admin.Rollback(placement_pb2.RollbackRequest(), timeout=60)
            assert back.version > swapped.version and get().map.phy2log == before.map.phy2log
            smaller = admin.SetRedundancy(placement_pb2.SetRedundancyRequest(num_redundant_experts=0), timeout=60)
            assert smaller.version > back.version and get().map.num_physical_slots == 16
            final = get().map.version
            wait_for(lambda: sum(1 for _, _, b, _ in traffic.results if b >= final) >= 4, 60,
                     "traffic on the newest map")
            lost = [c.name for c in deployment.children if c.name != "placement" and c.process.poll() is not None]
            assert lost == [], f"{lost} exited; see {log_dir}"
        finally:
            traffic.stop()
            if restarted is not None:
                restarted.send_signal(signal.SIGTERM)
                restarted.wait(timeout=15)

    assert traffic.errors == []
    wrong = [(prompt, text) for prompt, text, _, _ in traffic.results if text != expected[prompt]]
    assert wrong == [], f"{len(wrong)} of {len(traffic.results)} completions differ from transformers'"
    versions_seen = {v for _, _, before, after in traffic.results for v in (before, after)}
    assert len(versions_seen) >= 3, versions_seen


def _try(call):
    try:
        return call()
    except grpc.RpcError:
        return None


def _heard_all(admin) -> bool:
    """Every worker heartbeated the restarted service (its last heartbeat is recent)."""
    workers = _try(lambda: admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers) or []
    now_ms = time.time() * 1000
    return len(workers) == 4 and all(now_ms - w.last_heartbeat_unix_ms < 3000 for w in workers)


def test_more_redundant_slots_under_traffic(skewed_model, expected, tmp_path):
    log_dir = tmp_path / "logs"
    config = DeploymentConfig(model_path=str(skewed_model), num_attention_workers=1, num_expert_workers=2,
                              num_redundant_experts=0, dtype="float64", log_dir=str(log_dir),
                              ep_dispatch_algorithm="dynamic")  # every replica gets traffic
    with LocalDeployment(config) as deployment:
        placement = f"127.0.0.1:{deployment.placement_port}"
        traffic = Traffic(f"127.0.0.1:{deployment.gateway_port}", placement, num_clients=4)
        try:
            wait_for(lambda: len(traffic.results) >= 2, 60, "traffic")
            admin = admin_stub(placement)
            exited = lambda: [c.name for c in deployment.children if c.process.poll() is not None]  # noqa: E731
            # Only the first step on the bigger map can trip over it (the window is resized at its
            # end), and only if it routes a token to a new slot: grow and shrink a few times.
            for _ in range(6):
                for num_redundant in (4, 0):
                    changed = admin.SetRedundancy(
                        placement_pb2.SetRedundancyRequest(num_redundant_experts=num_redundant), timeout=60)
                    assert changed.num_versions == 1
                    served = len(traffic.results)
                    wait_for(lambda: len(traffic.results) >= served + 2 or exited(), 60, "traffic on the new map")
                if exited():
                    break
            assert exited() == [], f"{exited()} exited; see {log_dir}"
        finally:
            traffic.stop()
    assert traffic.errors == []
    assert all(text == expected[prompt] for prompt, text, _, _ in traffic.results)
