"""Elastic expert parallelism end to end (issue 14): real processes, 32 concurrent greedy streams,
float64 tiny model, 2 attention + 4 expert workers, 4 redundant slots, ``--elastic-ep-backend
placement``. Each test injects one fault while the streams run and checks that every stream
finishes with transformers' greedy text:

1. kill -9 an expert worker whose experts all have a replica elsewhere (routing-only version);
2. start it again: it receives experts (make-before-break);
3. kill -9 an expert worker holding the only copy of some experts (they are reloaded onto the
   survivors; their requests wait);
4. start a new (fifth) expert worker: scale-out, it receives experts;
5. drain one: its experts move away, it exits with code 0;
6. kill -9 an attention worker (the gateway resubmits with the tokens streamed so far);
7. kill -9 placement and start it again (same port and --state-db).

The tests run in this order on one deployment (each starts from the state the previous left).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from epserve.deployment import Child, LocalDeployment

from epserve.deployment_config import DeploymentConfig
from epserve.gateway.client import stream_generate
from epserve.protos import placement_pb2, placement_pb2_grpc

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NUM_STREAMS = 32
MAX_NEW_TOKENS = 16
PROMPTS = [f"Stream {i}: the {w} said" for i, w in enumerate(
    ["river", "mountain", "lantern", "garden", "engine", "market", "winter", "letter"] * 4)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def expected(tiny_model) -> dict[str, str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
        out[prompt] = tok.decode(generated, skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("elastic-logs")
    config = DeploymentConfig(
        model_path=str(tiny_model), num_attention_workers=2, num_expert_workers=4, num_redundant_experts=4,
        dtype="float64", placement_port=free_port(), state_db=str(log_dir / "placement.db"), log_dir=str(log_dir),
        extra_placement_args=["--elastic-ep-backend", "placement"])
    with LocalDeployment(config) as deployment:
        yield Cluster(deployment, Path(log_dir))


class Cluster:
    def __init__(self, deployment: LocalDeployment, log_dir: Path) -> None:
        self.deployment, self.log_dir = deployment, log_dir
        self.gateway = f"127.0.0.1:{deployment.gateway_port}"
        self.placement = f"127.0.0.1:{deployment.placement_port}"
        self.admin = placement_pb2_grpc.PlacementAdminStub(grpc.insecure_channel(self.placement))
        self.restart_me = ""                  # the expert worker test 1 killed and test 2 starts again
        self.survivors: list[str] = []        # live expert workers after test 3 (and 4, 5)

    def child(self, name: str) -> Child:
        return next(c for c in reversed(self.deployment.children) if c.name == name)

    def kill(self, name: str) -> None:
        process = self.child(name).process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def start(self, name: str, like: str, port_key: str) -> Child:
        """Start ``name`` with the command ``like`` was started with (its own --worker-id)."""
        command = list(self.child(like).process.args)
        if "--worker-id" in command:
            command[command.index("--worker-id") + 1] = name
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        child = Child(name, process)
        self.deployment.children.append(child)
        for line in process.stdout:
            if line.startswith(f"{port_key}="):
                break
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
        return child

    def placement_view(self) -> placement_pb2.GetPlacementResponse:
        return self.admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=10)

    def workers(self) -> dict[str, placement_pb2.WorkerInfo]:
        return {w.worker_id: w for w in self.admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=10).workers}

    def slots(self, worker_id: str) -> torch.Tensor:
        """[L, S] experts of ``worker_id`` in the map in service."""
        view = self.placement_view().map
        owners = list(view.slot_owners)
        phy2log = torch.tensor(list(view.phy2log)).view(view.num_layers, view.num_physical_slots)
        per = view.num_physical_slots // len(owners)
        index = owners.index(worker_id)
        return phy2log[:, index * per:(index + 1) * per]

    def operations(self) -> list[str]:
        view = self.placement_view()
        return [self.admin.GetPlacement(placement_pb2.GetPlacementRequest(version=v), timeout=10).last_operation
                for v in view.versions]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except grpc.RpcError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Wave:
    """NUM_STREAMS greedy streams at once; ``fault()`` runs once every stream has some tokens."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.texts: dict[int, str] = {}
        self.errors: list[str] = []
        self.arrivals: dict[int, list[float]] = {i: [] for i in range(NUM_STREAMS)}

    def _stream(self, index: int) -> None:
        parts = []
        try:
            for response in stream_generate(self.gateway, PROMPTS[index], max_new_tokens=MAX_NEW_TOKENS,
                                            temperature=0.0, timeout_s=180):
                parts.append(response.text)
                if response.token_ids:
                    self.arrivals[index].append(time.monotonic())
            self.texts[index] = "".join(parts)
        except grpc.RpcError as exc:
            self.errors.append(f"stream {index}: {exc.code().name} {exc.details()}")

    def run(self, fault=None) -> Wave:
        threads = [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
        for thread in threads:
            thread.start()
        if fault is not None:
            deadline = time.monotonic() + 120
            while sum(len(a) >= 2 for a in self.arrivals.values()) < NUM_STREAMS // 2:
                assert time.monotonic() < deadline and any(t.is_alive() for t in threads), "streams did not start"
                time.sleep(0.01)
            fault()
        for thread in threads:
            thread.join(timeout=200)
        return self

    def check(self, expected: dict[str, str]) -> None:
        print(f"longest gap between tokens across streams: {self.longest_gap_s:.3f} s")
        assert self.errors == []
        wrong = [i for i in range(NUM_STREAMS) if self.texts.get(i) != expected[PROMPTS[i]]]
        assert wrong == [], [(PROMPTS[i], self.texts.get(i), expected[PROMPTS[i]]) for i in wrong[:3]]

    @property
    def longest_gap_s(self) -> float:
        times = sorted(t for a in self.arrivals.values() for t in a)
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def replicas(cluster: Cluster) -> torch.Tensor:
    """[L, E] replicas of each expert in the map in service."""
    view = cluster.placement_view().map
    phy2log = torch.tensor(list(view.phy2log)).view(view.num_layers, view.num_physical_slots)
    return torch.stack([torch.bincount(row[row >= 0], minlength=view.num_logical_experts) for row in phy2log])


def only_copies(cluster: Cluster, worker_id: str) -> int:
    """How many (layer, expert) pairs ``worker_id`` holds the only replica of."""
    counts, held = replicas(cluster), cluster.slots(worker_id)
    return sum(int(counts[layer, e]) == 1 for layer in range(len(held)) for e in held[layer] if e >= 0)


def test_kill_expert_worker_with_replicas_elsewhere(cluster, expected):
    view = cluster.placement_view().map
    victim = next(w for w in view.slot_owners if only_copies(cluster, w) == 0)   # the trivial map has one
    Wave(cluster.gateway).run(lambda: cluster.kill(victim)).check(expected)
    wait_for(lambda: cluster.workers()[victim].state == placement_pb2.WORKER_STATE_DEAD, 30, f"{victim} DEAD")
    assert (cluster.slots(victim) == -1).all()
    operations = cluster.operations()
    assert operations[1] == "failover" and "reload" not in operations          # routing only: nothing loaded
    cluster.restart_me = victim


def test_restarted_expert_worker_receives_experts(cluster, expected):
    victim = cluster.restart_me
    cluster.start(victim, victim, "EXPERT_WORKER_PORT")
    wait_for(lambda: (cluster.slots(victim) >= 0).any(), 90, f"experts on the restarted {victim}")
    Wave(cluster.gateway).run().check(expected)


def test_kill_expert_worker_holding_the_only_copy(cluster, expected):
    victim = next(w for w in cluster.placement_view().map.slot_owners if only_copies(cluster, w) > 0)
    Wave(cluster.gateway).run(lambda: cluster.kill(victim)).check(expected)
    assert "reload" in cluster.operations()
    cluster.survivors = [w for w in cluster.placement_view().map.slot_owners if w != victim]


def test_new_expert_worker_receives_experts(cluster, expected):
    cluster.start("expert-4", "expert-0", "EXPERT_WORKER_PORT")
    wait_for(lambda: "expert-4" in cluster.placement_view().map.slot_owners and
             (cluster.slots("expert-4") >= 0).any(), 90, "experts on the new expert-4")
    assert cluster.workers()["expert-4"].rank == 2 + 4                     # a fifth expert rank
    cluster.survivors.append("expert-4")
    Wave(cluster.gateway).run().check(expected)


def test_drained_expert_worker_exits_cleanly(cluster, expected):
    drained_id = cluster.survivors[0]
    drained = cluster.child(drained_id).process
    wave = Wave(cluster.gateway).run(
        lambda: cluster.admin.DrainWorker(placement_pb2.DrainWorkerRequest(worker_id=drained_id), timeout=120))
    wave.check(expected)
    assert drained.wait(timeout=30) == 0
    assert (cluster.slots(drained_id) == -1).all()
    cluster.survivors.remove(drained_id)


def test_kill_attention_worker(cluster, expected):
    Wave(cluster.gateway).run(lambda: cluster.kill("attention-1")).check(expected)


def test_kill_placement_and_restart_it(cluster, expected):
    version = cluster.placement_view().map.version

    def restart_placement() -> None:
        cluster.kill("placement")
        cluster.start("placement", "placement", "PLACEMENT_PORT")

    Wave(cluster.gateway).run(restart_placement).check(expected)
    assert cluster.placement_view().map.version >= version
    alive = [c.name for c in cluster.deployment.children if c.process.poll() is None]
    assert {"attention-0", "gateway", "placement", *cluster.survivors} <= set(alive)
