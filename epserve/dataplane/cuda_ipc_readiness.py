"""When a ``cuda_ipc`` channel's data may be read: the three readiness kinds behind one interface.

Legend: none (one flag word or one event per call).

The host always learns of a message from the host-shared sequence numbers (``cuda_ipc_layout``);
a readiness kind makes the *data* behind a sequence number safe to read:

| kind     | memory | writer, after its data          | reader, before reading                         |
|----------|--------|---------------------------------|------------------------------------------------|
| `poll`   | host   | nothing (host stores, in order) | nothing                                        |
| `flags`  | GPU    | ``signal_flag`` kernel (release) | ``wait_flag`` kernel (acquire, device budget)  |
| `events` | GPU    | record the channel's IPC event  | host polls ``event.query()`` until done        |

``flags`` also runs on CPU memory under the Triton interpreter (tests only: ``cuda_ipc_flags``
says how it waits there). The step path (``cuda_ipc_step``) uses ``signal_step``/``wait_step``: values
``step * FLAG_STEP_STRIDE + layer + 1`` from a device counter, so captured graphs replay them; on
GPUs it always runs on device flags (``make_step_readiness``), with either per-message kind.
A device wait that runs out of budget records the peer in an error word (``take_device_error``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol

import torch

from epserve.dataplane.cuda_ipc_layout import Channel, Flag
from epserve.dataplane.cuda_ipc_peers import Backoff, wait_until

READINESS_KINDS = ("poll", "flags", "events")
GoneCheck = Callable[[], str]


class Readiness(Protocol):
    name: str

    def after_write(self, channel: Channel, flag: Flag, seq: int) -> None:
        """The writer's data for message ``seq`` is written or enqueued on the current stream."""
        ...

    def before_read(self, channel: Channel, flag: Flag, seq: int, deadline: float, gone: GoneCheck,
                    peer_rank: int) -> bool:
        """The host saw ``seq``: make the data safe to read (False: not within ``deadline``)."""
        ...

    def signal_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int) -> None: ...

    def wait_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, deadline: float,
                  gone: GoneCheck, peer_rank: int) -> bool: ...

    def take_device_error(self) -> int | None:
        """The peer rank whose device wait ran out of budget since the last call (syncs), or None."""
        ...

    def snapshot_error(self) -> torch.Tensor | None:
        """A copy of the error word queued on the current stream (behind a step's launches: nothing waits),
        for ``error_from_snapshot`` once the stream got past it; None where no device wait can run out."""
        ...

    def error_from_snapshot(self, snapshot: torch.Tensor | None) -> int | None:
        """``take_device_error`` from a snapshot the stream has passed (no sync)."""
        ...


def step_value(counter: int, layer: int) -> int:
    from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE

    return counter * FLAG_STEP_STRIDE + layer + 1


class PollReadiness:
    """Host memory written by host stores: the sequence number is the whole story."""

    name = "poll"

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff if backoff is not None else Backoff()

    def after_write(self, channel: Channel, flag: Flag, seq: int) -> None:
        pass

    def before_read(self, channel: Channel, flag: Flag, seq: int, deadline: float, gone: GoneCheck,
                    peer_rank: int) -> bool:
        return True

    def signal_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int) -> None:
        channel.flag(flag).fill_(step_value(int(counter), layer))

    def wait_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, deadline: float,
                  gone: GoneCheck, peer_rank: int) -> bool:
        word, target = channel.flag(flag).numpy(), step_value(int(counter), layer)
        return wait_until(lambda: int(word[0]) >= target, deadline, gone, self.backoff)

    def take_device_error(self) -> int | None:
        return None

    def snapshot_error(self) -> torch.Tensor | None:
        return None

    def error_from_snapshot(self, snapshot: torch.Tensor | None) -> int | None:
        return None


FUSED_ENV = "EPSERVE_CUDA_IPC_FUSED"


class FlagReadiness:
    """Device flags in the channel's data memory, set and awaited by Triton kernels on the stream."""

    name = "flags"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.zero = torch.zeros(1, dtype=torch.int64, device=device)    # counter of the per-message values
        self.error = torch.zeros(1, dtype=torch.int64, device=device)   # peer rank + 1 of a wait that ran out

    def after_write(self, channel: Channel, flag: Flag, seq: int) -> None:
        from epserve.dataplane.cuda_ipc_flags import signal_flag

        signal_flag(channel.flag(flag), self.zero, 0, seq)

    def before_read(self, channel: Channel, flag: Flag, seq: int, deadline: float, gone: GoneCheck,
                    peer_rank: int) -> bool:
        """Enqueues the wait; returns at once (a wait that runs out shows in ``take_device_error``)."""
        from epserve.dataplane.cuda_ipc_flags import spin_budget, wait_flag

        budget = spin_budget(max(deadline - time.monotonic(), 0.0), self.device)
        wait_flag(channel.flag(flag), self.zero, 0, seq, self.error, peer_rank + 1, budget)
        return True

    def signal_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int) -> None:
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE, signal_flag

        signal_flag(channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1)

    def wait_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, deadline: float,
                  gone: GoneCheck, peer_rank: int) -> bool:
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE, spin_budget, wait_flag

        budget = spin_budget(max(deadline - time.monotonic(), 0.0), self.device)
        wait_flag(channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1, self.error, peer_rank + 1, budget)
        return True

    def wait_step_budget(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, budget: int,
                         peer_rank: int) -> None:
        """``wait_step`` with a fixed budget (what a captured graph replays)."""
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE, wait_flag

        wait_flag(channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1, self.error, peer_rank + 1, budget)

    # -- fused hand-offs (cuda_ipc_handoff.py): the flag operation and the copy beside it in one launch
    @property
    def fused(self) -> bool:
        """Whether the step path uses the fused hand-offs: compiled kernels (CUDA devices), unless
        EPSERVE_CUDA_IPC_FUSED=0 (the separate flag and copy launches, as on the CPU)."""
        return self.device.type == "cuda" and os.environ.get(FUSED_ENV, "1") != "0"

    def copy_and_signal_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int,
                             segments: list[tuple[torch.Tensor, torch.Tensor]], arrivals: torch.Tensor) -> None:
        """The copies, then ``signal_step``'s value, in one launch."""
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE
        from epserve.dataplane.cuda_ipc_handoff import copy_and_signal

        copy_and_signal(segments, channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1, arrivals)

    def wait_and_copy_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, budget: int,
                           peer_rank: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``wait_step_budget``, then dst ← src, in one launch."""
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE
        from epserve.dataplane.cuda_ipc_handoff import wait_and_copy

        wait_and_copy(channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1, self.error, peer_rank + 1, budget,
                      src, dst)

    def wait_local_slots_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, budget: int,
                              peer_rank: int, n: int, weight_dtype: torch.dtype, worker: int,
                              slots_per_worker: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``wait_step_budget``, then this worker's local slots of the channel's n choices, in one launch."""
        from epserve.dataplane.cuda_ipc_flags import FLAG_STEP_STRIDE
        from epserve.dataplane.cuda_ipc_handoff import wait_local_slots

        return wait_local_slots(channel.flag(flag), counter, FLAG_STEP_STRIDE, layer + 1, self.error, peer_rank + 1,
                                budget, channel.slot_ids[:n], channel.weights(n, weight_dtype), worker,
                                slots_per_worker, weight_dtype)

    def take_device_error(self) -> int | None:
        code = int(self.error.item())
        if not code:
            return None
        self.error.zero_()
        return code - 1

    def snapshot_error(self) -> torch.Tensor | None:
        pinned = self.error.device.type == "cuda"
        snapshot = torch.empty(1, dtype=torch.int64, pin_memory=pinned)
        snapshot.copy_(self.error, non_blocking=pinned)
        return snapshot

    def error_from_snapshot(self, snapshot: torch.Tensor | None) -> int | None:
        code = 0 if snapshot is None else int(snapshot[0])
        if not code:
            return None
        self.error.zero_()          # queued behind what is in flight: a later step's snapshot may see this one
        return code - 1


class EventReadiness:
    """Interprocess CUDA events, one per channel and direction (``channel.events[flag]``); host waits."""

    name = "events"

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff if backoff is not None else Backoff()

    def after_write(self, channel: Channel, flag: Flag, seq: int) -> None:
        channel.events[flag].record(torch.cuda.current_stream(channel.device))

    def before_read(self, channel: Channel, flag: Flag, seq: int, deadline: float, gone: GoneCheck,
                    peer_rank: int) -> bool:
        """The writer recorded the event before it published ``seq``: once the event is done, so is the data."""
        event = channel.events[flag]
        return wait_until(event.query, deadline, gone, self.backoff)

    def signal_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int) -> None:
        raise NotImplementedError("the step path runs on device flags (make_step_readiness)")

    def wait_step(self, channel: Channel, flag: Flag, counter: torch.Tensor, layer: int, deadline: float,
                  gone: GoneCheck, peer_rank: int) -> bool:
        raise NotImplementedError("the step path runs on device flags (make_step_readiness)")

    def take_device_error(self) -> int | None:
        return None

    def snapshot_error(self) -> torch.Tensor | None:
        return None

    def error_from_snapshot(self, snapshot: torch.Tensor | None) -> int | None:
        return None


def make_readiness(kind: str, device: torch.device) -> Readiness:
    if kind == "poll":
        return PollReadiness()
    if kind == "flags":
        return FlagReadiness(device)
    if kind == "events":
        return EventReadiness()
    raise ValueError(f"cuda_ipc readiness must be one of {READINESS_KINDS}, got {kind!r}")


def make_step_readiness(messages: Readiness, device: torch.device) -> Readiness:
    """The step path's readiness: device flags on GPUs whatever the per-message kind (events wait on
    the host, which a CUDA graph cannot); on host memory the per-message one (poll, or interpreted flags)."""
    return FlagReadiness(device) if isinstance(messages, EventReadiness) else messages


def check_readiness(kind: str | None, device: torch.device) -> str:
    """The readiness for channels on ``device``: default poll on CPU, flags on CUDA."""
    if kind is None:
        return "flags" if device.type == "cuda" else "poll"
    if kind not in READINESS_KINDS:
        raise ValueError(f"cuda_ipc readiness must be one of {READINESS_KINDS}, got {kind!r}")
    if device.type == "cuda" and kind == "poll":
        raise ValueError("readiness 'poll' needs channels in host memory; on a GPU use 'flags' or 'events'")
    if device.type != "cuda" and kind == "events":
        raise ValueError("readiness 'events' needs CUDA; on the CPU use 'poll'")
    if device.type != "cuda" and kind == "flags" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("readiness 'flags' on the CPU runs the flag kernels in the Triton interpreter: set "
                         "TRITON_INTERPRET=1 (tests), or use 'poll'")
    return kind
