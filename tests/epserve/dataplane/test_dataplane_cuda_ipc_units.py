"""cuda_ipc pieces in one process: the flag kernels against their references (interpreted on the
CPU, compiled on a GPU when there is one), a channel's layout, status and trace words, readiness
choice, peer liveness and the polling backoff."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import torch

from epserve.dataplane.cuda_ipc_flags import (FLAG_STEP_STRIDE, signal_flag, signal_flag_reference, spin_budget,
                                              wait_flag, wait_flag_reference)
from epserve.dataplane.cuda_ipc_layout import (CTRL_BYTES, RSP_STATUS, STEP_TRACE, Channel, ChannelShape, Flag,
                                               Status, read_status, read_trace, write_status, write_trace)
from epserve.dataplane.cuda_ipc_peers import Backoff, PeerProcess, process_identity
from epserve.dataplane.cuda_ipc_readiness import check_readiness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="the flag kernels need a GPU or the Triton interpreter")


def words(*values: int) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.int64, device=DEVICE) for v in values]


@needs_kernels
@pytest.mark.parametrize("counter,stride,offset", [(0, 0, 7), (0, 0, 1), (3, FLAG_STEP_STRIDE, 5), (1, 1, 0)])
def test_signal_flag_equals_reference(counter: int, stride: int, offset: int) -> None:
    flag, expected, count = words(-1, -1, counter)
    signal_flag(flag, count, stride, offset)
    signal_flag_reference(expected, count, stride, offset)
    assert torch.equal(flag, expected) and int(flag) == counter * stride + offset


@needs_kernels
@pytest.mark.parametrize("flag_value,target,error_before,budget", [
    (7, 7, 0, 5), (9, 7, 0, 0), (6, 7, 0, 3), (6, 7, 9, 3), (0, FLAG_STEP_STRIDE + 1, 2, 0)])
def test_wait_flag_equals_reference(flag_value: int, target: int, error_before: int, budget: int) -> None:
    flag, zero, error, expected = words(flag_value, 0, error_before, error_before)
    wait_flag(flag, zero, 0, target, error, 4, budget)
    wait_flag_reference(flag, zero, 0, target, expected, 4, budget)
    assert torch.equal(error, expected)
    assert int(error) == (max(error_before, 4) if flag_value < target else error_before)
    assert int(flag) == flag_value


@pytest.mark.skipif(DEVICE.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter's wait loop")
def test_interpreted_wait_sees_a_signal_from_another_thread() -> None:
    flag, counter, error = words(0, 2, 0)
    signaller = threading.Timer(0.05, lambda: signal_flag(flag, counter, FLAG_STEP_STRIDE, 3))
    signaller.start()
    start = time.monotonic()
    wait_flag(flag, counter, FLAG_STEP_STRIDE, 3, error, 1, spin_budget(5.0, DEVICE))
    assert int(error) == 0 and 0.04 < time.monotonic() - start < 2.0
    signaller.join()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_wait_released_by_a_signal_on_another_stream() -> None:
    flag, counter, error = words(0, 5, 0)
    waiter, signaller = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(waiter):
        wait_flag(flag, counter, FLAG_STEP_STRIDE, 2, error, 1, spin_budget(5.0, DEVICE))
    time.sleep(0.01)
    with torch.cuda.stream(signaller):
        signal_flag(flag, counter, FLAG_STEP_STRIDE, 2)
    torch.cuda.synchronize()
    assert int(error) == 0 and int(flag) == 5 * FLAG_STEP_STRIDE + 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_signal_and_wait_with_new_counter_values() -> None:
    flag, counter, error = words(0, 1, 0)
    signal_flag(flag, counter, FLAG_STEP_STRIDE, 1)                  # compile both before capture
    wait_flag(flag, counter, FLAG_STEP_STRIDE, 1, error, 1, 10)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        signal_flag(flag, counter, FLAG_STEP_STRIDE, 1)
        wait_flag(flag, counter, FLAG_STEP_STRIDE, 1, error, 1, 10)
        wait_flag(flag, counter, FLAG_STEP_STRIDE, 2, error, 7, 10)  # never signalled: runs out
    for step in (2, 3):
        counter.fill_(step)
        error.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert int(flag) == step * FLAG_STEP_STRIDE + 1 and int(error) == 7


def test_channel_views_do_not_overlap() -> None:
    shape = ChannelShape(max_tokens=5, hidden_size=3, top_k=2, dtype=torch.float16)
    ctrl, data = torch.zeros(CTRL_BYTES, dtype=torch.uint8), torch.zeros(shape.data_bytes, dtype=torch.uint8)
    channel = Channel(0, 1, 1, shape, ctrl, data)
    channel.hidden.fill_(1.0)
    channel.slot_ids.fill_(-1)
    channel.weights(5, torch.float64).fill_(2.0)
    channel.partial.fill_(3.0)
    for i, flag in enumerate(Flag):
        channel.flag(flag).fill_(10 + i)
    assert channel.hidden.shape == (5, 3) and channel.partial.shape == (5, 3) and channel.slot_ids.shape == (5, 2)
    assert bool((channel.hidden == 1).all()) and bool((channel.partial == 3).all())
    assert bool((channel.slot_ids == -1).all()) and bool((channel.weights(5, torch.float64) == 2).all())
    assert [int(channel.flag(f)) for f in Flag] == [10, 11, 12, 13]
    assert channel.weights(4, torch.float32).shape == (4, 2)
    assert ChannelShape.from_dict(shape.to_dict()) == shape


def test_status_and_trace_words_round_trip() -> None:
    ctrl = torch.zeros(CTRL_BYTES, dtype=torch.uint8)
    shape = ChannelShape(1, 1, 1, torch.float32)
    w = Channel(0, 0, 0, shape, ctrl, torch.zeros(shape.data_bytes, dtype=torch.uint8)).words
    write_status(w, RSP_STATUS, Status.STALE_VERSION, tuple(range(12)), "é" * 200)
    status, held, error = read_status(w, RSP_STATUS)
    assert status == Status.STALE_VERSION and held == tuple(range(4, 12)) and error.startswith("é" * 100)
    write_status(w, RSP_STATUS, Status.OK)
    assert read_status(w, RSP_STATUS) == (Status.OK, (), "")
    w[RSP_STATUS] = 99
    assert read_status(w, RSP_STATUS)[0] == Status.ERROR
    for trace in (b"", b"00-abc", b"x" * 64):
        write_trace(w, STEP_TRACE, trace)
        assert read_trace(w, STEP_TRACE) == trace


def test_readiness_choice() -> None:
    assert check_readiness(None, torch.device("cpu")) == "poll"
    assert check_readiness(None, torch.device("cuda", 0)) == "flags"
    assert check_readiness("events", torch.device("cuda", 0)) == "events"
    with pytest.raises(ValueError, match="host memory"):
        check_readiness("poll", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="needs CUDA"):
        check_readiness("events", torch.device("cpu"))
    with pytest.raises(ValueError, match="one of"):
        check_readiness("doorbell", torch.device("cpu"))


def test_peer_process_sees_an_exit_even_before_it_is_reaped() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        peer = PeerProcess(process_identity(child.pid), rank=5)
        assert peer.alive() and PeerProcess(process_identity(), rank=0).alive()
        child.kill()
        deadline = time.monotonic() + 5
        while peer.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"            # not reaped yet: a zombie
        assert not peer.alive()
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ValueError, match="one host"):
        PeerProcess({"pid": child.pid, "start_time": 1}, rank=5)


def test_backoff_spins_then_sleeps_up_to_its_cap() -> None:
    backoff = Backoff(spin_s=0.01, max_sleep_s=2e-3)
    start = time.perf_counter()
    pauses = 0
    while time.perf_counter() - start < 0.005:
        backoff.pause()
        pauses += 1
    assert pauses > 100                       # spinning: no sleeps yet
    time.sleep(0.01)
    for _ in range(12):
        backoff.pause()
    start = time.perf_counter()
    backoff.pause()
    assert 1.5e-3 <= time.perf_counter() - start < 20e-3


def test_a_segment_whose_name_is_gone_says_why():
    """A segment's name goes when its attention worker stops: an expert worker joining then is told so (not
    only the container hint)."""
    from epserve.dataplane.cuda_ipc_memory import HostSegment

    segment = HostSegment.create(4096, "test")
    description = segment.describe()
    segment.unlink()
    with pytest.raises(FileNotFoundError, match="the attention worker that made it has stopped"):
        HostSegment.open(description)


def test_segments_of_dead_creators_are_swept_and_live_ones_kept(tmp_path):
    """A killed attention worker's segment name is removed by the next creator in its PID namespace; a live
    creator's, another namespace's and a foreign file are kept."""
    from epserve.dataplane.cuda_ipc_memory import _pid_namespace, sweep_stale_segments

    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = _pid_namespace()
    names = {"dead": f"epserve-ipc-a0-{namespace}-{dead.pid}-0123456789ab",
             "live": f"epserve-ipc-a0-{namespace}-{os.getpid()}-0123456789ab",
             "other namespace": f"epserve-ipc-a0-{namespace + 1}-{dead.pid}-0123456789ab",
             "old name": "epserve-ipc-a0-0123456789ab", "foreign": "something-else"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    sweep_stale_segments(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
