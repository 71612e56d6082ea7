"""``epserve up`` supervises (issue 15): kill -9 each kind of process with 16 streams running; the
supervisor starts it again and the rest keep serving.

- placement: serving does not go through it: every stream finishes; the new placement resumes from
  the state db at the same map version (not version 1) and the workers re-register with it.
- an attention worker: the gateway moves its streams to the other one; every stream finishes.
- the gateway: streams through it break (it was their connection); clients that retry on
  UNAVAILABLE finish on the restarted gateway, on the same port.
- an expert worker: until elastic EP, requests routed to it may fail; the supervisor restarts it.
The launcher's /metrics counts the restarts (epserve_up_child_restarts_total).
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from epserve_up import epserve_up

from epserve.gateway.client import generate
from epserve.grpc_security import Security, open_channel, read_token_file
from epserve.protos import placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.slow

NUM_STREAMS = 16
PROMPTS = [f"Story {i}: once upon a time" for i in range(NUM_STREAMS)]
STARTED = re.compile(r"started (\S+) \(pid (\d+)\) on port")


def pids(log: Path) -> dict[str, int]:
    """Child name → pid of its latest start, from epserve up's log."""
    return {name: int(pid) for name, pid in STARTED.findall(log.read_text())}


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def run_streams(address: str, retry: bool) -> list[object]:
    """Each stream's greedy text, or the exception that ended it."""
    def one(prompt: str):
        for attempt in range(40 if retry else 1):
            try:
                return generate(address, prompt, max_new_tokens=48, temperature=0.0, ignore_eos=True,
                                timeout_s=120).text
            except grpc.RpcError as exc:
                if not retry or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                   grpc.StatusCode.INTERNAL):
                    return exc
                time.sleep(0.5)
        return exc

    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        return list(pool.map(one, PROMPTS))


def test_killed_processes_are_restarted_and_serving_goes_on(tiny_model, tmp_path):
    env = dict(os.environ, EPSERVE_CACHE_DIR=str(tmp_path / "cache"))
    logs = tmp_path / "logs"
    args = ["--model-path", str(tiny_model), "--attention-workers", "2", "--expert-workers", "2", "--dtype",
            "float64", "--metrics", "--max-restarts", "3"]
    with epserve_up(args, logs, auth=True, env=env) as endpoints:
        address, up_log = endpoints["gateway"], logs / "up.log"
        security = Security(token=read_token_file(tmp_path / "cache" / "auth_token"))
        expected = run_streams(address, retry=False)
        assert all(isinstance(text, str) for text in expected)
        version = map_version(endpoints["placement"], security)

        for name in ("placement", "attention-0", "gateway", "expert-0"):
            before = pids(up_log)[name]
            with ThreadPoolExecutor(1) as pool:
                streams = pool.submit(run_streams, address, name == "gateway")
                time.sleep(1.0)                             # the streams are decoding
                os.kill(before, signal.SIGKILL)            # one of the processes this test's epserve up started
                results = streams.result(timeout=300)
            wait_for(lambda: pids(up_log).get(name, before) != before, 120, f"{name} to be started again")
            if name != "expert-0":
                assert results == expected, (name, [r for r in results if not isinstance(r, str)])
            if name == "placement":
                wait_for(lambda: all_alive(endpoints["placement"], security, 4), 60, "workers back in placement")
                assert map_version(endpoints["placement"], security) == version       # resumed, not version 1
        metrics_url = re.search(r"child restarts on (\S+)", up_log.read_text()).group(1)
        metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        for name in ("placement", "attention-0", "gateway", "expert-0"):
            assert f'epserve_up_child_restarts_total{{child="{name}"}} 1.0' in metrics, metrics


def map_version(address: str, security: Security) -> int:
    with open_channel(address, security) as channel:
        return placement_pb2_grpc.PlacementAdminStub(channel).GetPlacement(
            placement_pb2.GetPlacementRequest(), timeout=10).map.version


def all_alive(address: str, security: Security, expected: int) -> bool:
    try:
        with open_channel(address, security) as channel:
            workers = placement_pb2_grpc.PlacementAdminStub(channel).ListWorkers(
                placement_pb2.ListWorkersRequest(), timeout=5).workers
    except grpc.RpcError:
        return False
    return sum(w.state == placement_pb2.WORKER_STATE_ALIVE for w in workers) == expected


def test_a_drained_expert_worker_is_not_started_again(tiny_model, tmp_path):
    """Draining an expert worker ends it with code 0 on purpose: the supervisor leaves it down (a
    restart would hand it experts again and undo the drain)."""
    env = dict(os.environ, EPSERVE_CACHE_DIR=str(tmp_path / "cache"))
    logs = tmp_path / "logs"
    args = ["--model-path", str(tiny_model), "--attention-workers", "1", "--expert-workers", "3",
            "--ep-num-redundant-experts", "4", "--dtype", "float64", "--elastic-ep-backend", "placement"]
    with epserve_up(args, logs, env=env) as endpoints:
        up_log = logs / "up.log"
        drained = pids(up_log)["expert-1"]
        with open_channel(endpoints["placement"], Security()) as channel:
            placement_pb2_grpc.PlacementAdminStub(channel).DrainWorker(
                placement_pb2.DrainWorkerRequest(worker_id="expert-1"), timeout=120)
        wait_for(lambda: "expert-1 exited cleanly" in up_log.read_text(), 60, "the drained worker to exit")
        time.sleep(3.0)                                  # longer than the first restart backoff (1 s)
        assert pids(up_log)["expert-1"] == drained       # not started again
        text = generate(endpoints["gateway"], PROMPTS[0], max_new_tokens=8, temperature=0.0, timeout_s=120).text
        assert text
