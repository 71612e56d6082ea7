"""``python -m epserve.placement_service`` as a real process: port on stdout, SIGTERM, restart with --state-db."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.grpc_server import wait_for_channel
from epserve.placement_client import PlacementClient
from epserve.placement_types import WorkerRole
from epserve.placement_service.__main__ import build_parser, main
from epserve.protos import placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


class PlacementProcess:
    """A placement service subprocess; stdout lines arrive on a queue, stderr goes to a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "epserve.placement_service", *args], cwd=REPO_ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for_port(self, timeout_s: float = 30.0) -> int:
        line = self.lines.get(timeout=timeout_s)
        assert line is not None and line.startswith("PLACEMENT_PORT="), (
            f"expected PLACEMENT_PORT=<port>, got {line!r}; log:\n{self.log_path.read_text()}")
        return int(line.split("=", 1)[1])

    def terminate(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def launch(tmp_path):
    processes: list[PlacementProcess] = []

    def start(*args: str) -> PlacementProcess:
        process = PlacementProcess(list(args), tmp_path / f"placement-{len(processes)}.log")
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.close()


def test_process_prints_port_serves_and_exits_0_on_sigterm(launch, model_dir, fingerprint):
    process = launch("--model-path", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                     "--dp-size", "1", "--ep-size", "2", "--moe-a2a-backend", "torch")
    port = process.wait_for_port()
    channel = wait_for_channel(f"127.0.0.1:{port}", timeout_s=10)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        placement = placement_pb2_grpc.PlacementStub(channel)
        stream = placement.WatchPlacement(placement_pb2.WatchPlacementRequest(worker_id="observer"), timeout=30)
        for worker_id, role in [("attn-0", placement_pb2.WORKER_ROLE_ATTENTION),
                                ("expert-0", placement_pb2.WORKER_ROLE_EXPERT),
                                ("expert-1", placement_pb2.WORKER_ROLE_EXPERT)]:
            placement.Register(placement_pb2.RegisterRequest(
                worker_id=worker_id, role=role, address="127.0.0.1:1", model_fingerprint=fingerprint,
                previous_rank=-1), timeout=5)
        update = next(stream)
        assert update.map.version == 1 and update.data_plane.world_size == 3
        started = time.monotonic()
        assert process.terminate(timeout_s=10) == 0
        assert time.monotonic() - started < 5.0
        assert list(stream) == []  # the stream ended cleanly, not with an error
    finally:
        channel.close()
    assert "signal received; shutting down" in process.log_path.read_text()


def test_process_restart_with_state_db_keeps_version_and_ranks(launch, model_dir, fingerprint, tmp_path,
                                                               free_port, wait_until):
    port = free_port()
    args = ["--model-path", str(model_dir), "--port", str(port), "--dp-size", "1", "--ep-size", "1",
            "--heartbeat-interval-ms", "100", "--heartbeat-timeout-ms", "3000",
            "--state-db", str(tmp_path / "state" / "placement.db")]
    first = launch(*args)
    assert first.wait_for_port() == port
    clients = [PlacementClient(f"127.0.0.1:{port}", "attn-0", WorkerRole.ATTENTION, "127.0.0.1:7000",
                               model_fingerprint=fingerprint, timeout_s=2),
               PlacementClient(f"127.0.0.1:{port}", "expert-0", WorkerRole.EXPERT, "127.0.0.1:7001",
                               model_fingerprint=fingerprint, timeout_s=2)]
    try:
        ranks = {client.worker_id: client.register(deadline_s=10).rank for client in clients}
        assert ranks == {"attn-0": 0, "expert-0": 1}
        assert first.terminate() == 0

        second = launch(*args)
        assert second.wait_for_port() == port
        # Placement was down for a while: each client saw UNAVAILABLE and re-registered on its own.
        wait_until(lambda: all(client.num_registrations >= 2 for client in clients), timeout_s=15)
        assert {client.worker_id: client.registration.rank for client in clients} == ranks
        channel = wait_for_channel(f"127.0.0.1:{port}", timeout_s=5)
        try:
            admin = placement_pb2_grpc.PlacementAdminStub(channel)
            response = admin.GetPlacement(placement_pb2.GetPlacementRequest(), timeout=5)
            assert response.map.version == 1 and list(response.versions) == [1]
            workers = admin.ListWorkers(placement_pb2.ListWorkersRequest(), timeout=5).workers
            assert {w.worker_id: w.rank for w in workers} == ranks
        finally:
            channel.close()
        assert "resumed from" in second.log_path.read_text()
        assert second.terminate() == 0
    finally:
        for client in clients:
            client.close()


def test_main_refuses_a_deployment_that_does_not_add_up(model_dir, capsys):
    assert main(["--model-path", str(model_dir), "--ep-size", "3"]) == 2
    refusal = capsys.readouterr().err
    assert "--ep-num-redundant-experts" in refusal and "--ep-size 3" in refusal


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in ("--model-path", "--host", "--port", "--dp-size", "--ep-size", "--ep-num-redundant-experts",
                 "--init-expert-location", "--moe-a2a-backend", "--dist-port", "--advertise-host",
                 "--heartbeat-interval-ms", "--heartbeat-timeout-ms", "--state-db", "--metrics-port"):
        assert flag in text


def test_a_crashed_background_thread_takes_the_process_down():
    code = ("import time\n"
            "from epserve.process import start_daemon_thread\n"
            "start_daemon_thread(lambda: 1 / 0, 'doomed')\n"
            "time.sleep(20)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=15)
    assert result.returncode == 1
    assert "background thread doomed crashed" in result.stderr and "ZeroDivisionError" in result.stderr


def ps_field(pid: int, field: str) -> str:
    return subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_ps_shows_the_process_by_role(launch, model_dir):
    process = launch("--model-path", str(model_dir), "--dp-size", "1", "--ep-size", "1")
    process.wait_for_port()
    assert ps_field(process.proc.pid, "comm") == "placement"
    assert ps_field(process.proc.pid, "args") == "epserve placement"
    assert process.terminate() == 0
