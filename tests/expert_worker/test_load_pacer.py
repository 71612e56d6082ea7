"""Live expert loading is paced to a duty cycle; the first map is not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epserve.expert_worker.config import ExpertWorkerConfig
from epserve.expert_worker.load_pacer import LoadPacer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("duty_cycle", [0.25, 0.5, 1.0])
def test_loading_takes_at_most_the_duty_cycle_of_wall_time(duty_cycle):
    clock = FakeClock()
    pacer = LoadPacer(duty_cycle, clock=clock, sleep=clock.sleep)
    clock.now = 10.0                         # idle time before the load is not loading
    pacer.start()
    busy = 0.0
    for work in (0.002, 0.010, 0.001, 0.004):
        clock.now += work
        busy += work
        pacer.tick()
    elapsed = clock.now - 10.0
    assert busy / elapsed == pytest.approx(duty_cycle)
    assert pacer.slept_s == pytest.approx(elapsed - busy)
    if duty_cycle == 1.0:
        assert clock.sleeps == []


def test_real_sleep_paces_a_load():
    pacer = LoadPacer(0.5)
    pacer.start()
    import time

    start = time.perf_counter()
    for _ in range(5):
        deadline = time.perf_counter() + 0.004
        while time.perf_counter() < deadline:    # 4 ms of "loading"
            pass
        pacer.tick()
    assert time.perf_counter() - start >= 0.036     # 20 ms busy at 0.5 → ≥ 40 ms (timer slack)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_bad_duty_cycle_is_refused(bad):
    with pytest.raises(ValueError, match="--expert-load-duty-cycle"):
        LoadPacer(bad)
    with pytest.raises(ValueError, match="--expert-load-duty-cycle"):
        ExpertWorkerConfig(model_path="m", placement="h:1", expert_load_duty_cycle=bad)


def test_flag_error_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "epserve.expert_worker", "--model-path", str(tmp_path),
                             "--placement", "127.0.0.1:1", "--expert-load-duty-cycle", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--expert-load-duty-cycle must be in (0, 1]" in result.stderr
