"""Joining the ``cuda_ipc`` data plane: who allocates, what travels through the store, who acks.

Legend: A attention ranks [0, A), W expert ranks [A, A+W) (expert rank A+w is worker w),
M micro-batch slots, C = W * M channels per attention rank.

Attention rank a (``join_attention``), the only side that allocates:
1. its C channels: control words (C × CTRL_BYTES) in one host segment; the data
   (C × ``ChannelShape.data_bytes``) in the same segment (readiness poll) or in one GPU buffer
   (flags, events); for events, 2 × C interprocess events (request, reply per channel);
2. publishes ``attention/a``: its process, the channel shape, M, the expert ranks, the
   readiness kind and the memory descriptions (``cuda_ipc_memory``);
3. waits for every expert's ``expert/e`` (its process, watched for liveness from then on) and
   ``opened/e/a`` (e mapped a's memory, or the error that stopped it); the file keeps its name until
   the attention rank closes (an expert rank restarted later maps it again).
Expert rank e (``join_expert``): publishes ``expert/e``, then for each a waits for
``attention/a``, maps it, publishes ``opened/e/a``.

Every wait shares the join deadline (``timeout_s``) and fails with DataPlaneTimeout naming the
missing rank. An expert rank whose process was restarted joins again the same way: it publishes
``expert/e`` and ``opened/e/a`` anew (with its process), and the attention rank, finding its old peer
gone, takes the new one (``AttentionSide.readmit``); the attention rank keeps its control segment's
name until it closes for that (``cuda_ipc_memory.sweep_stale_segments`` removes those of killed
ones). A restarted attention rank needs a restarted deployment.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from epserve.dataplane.base import BackendUnavailable
from epserve.dataplane.cuda_ipc_layout import CTRL_BYTES, EXPERT_STATE, Channel, ChannelShape, ExpertState, Flag
from epserve.dataplane.cuda_ipc_memory import CudaSegment, HostSegment, IpcEvents
from epserve.dataplane.cuda_ipc_peers import PeerProcess, connect_store, fetch, process_identity, publish
from epserve.dataplane.cuda_ipc_readiness import Readiness, check_readiness, make_readiness, make_step_readiness

logger = logging.getLogger(__name__)


@dataclass
class AttentionSide:
    """An attention rank's view after the join: channels[w][m] to every expert worker w."""

    rank: int
    expert_ranks: list[int]
    shape: ChannelShape
    num_slots: int
    device: torch.device            # where channel data lives
    readiness: Readiness            # the per-message path's
    step_readiness: Readiness       # the step path's (device flags on GPUs)
    channels: list[list[Channel]]
    peers: list[PeerProcess]
    keep_alive: list = field(default_factory=list)   # segments and events the channels view
    store: object = None                              # the rendezvous store (an expert rank joining again)
    epochs: list[int] = field(default_factory=list)  # per worker: how many times a new process took it over

    def __post_init__(self) -> None:
        self.epochs = self.epochs or [0] * len(self.expert_ranks)

    def unreachable(self, worker: int, slot: int) -> str:
        """Why expert ``worker`` cannot answer on its channel ``slot``, or "". A gone process whose rank a
        restarted one took is replaced first (``readmit``)."""
        rank = self.expert_ranks[worker]
        if not self.peers[worker].alive() and not self.readmit(worker):
            return f"expert rank {rank} (pid {self.peers[worker].pid}) exited"
        if int(self.channels[worker][slot].words[EXPERT_STATE]) == ExpertState.STOPPED:
            return f"expert rank {rank} stopped serving"
        return ""

    def readmit(self, worker: int) -> bool:
        """Expert ``worker``'s process is gone: → True when a new process took its rank and mapped this
        rank's channels again (``join_expert`` of a restarted expert worker; its ``opened`` key names it),
        which then becomes the peer (``epochs[worker]`` counts up: ring bookkeeping starts over)."""
        rank = self.expert_ranks[worker]
        key = f"opened/{rank}/{self.rank}"
        try:
            if self.store is None or not self.store.check([key]):
                return False
            opened = json.loads(self.store.get(key).decode("utf-8"))
        except Exception:  # noqa: BLE001 - the store unreachable: nobody can join now
            return False
        identity = opened.get("process")
        old = self.peers[worker]
        if not opened.get("ok") or not identity or (int(identity["pid"]), int(identity["start_time"])) == (
                old.pid, old.start_time):
            return False
        try:
            peer = PeerProcess(identity, rank)
        except ValueError:                          # that one is gone too
            return False
        if not peer.alive():
            peer.close()
            return False
        old.close()
        self.peers[worker] = peer
        self.epochs[worker] += 1
        for channel in self.channels[worker]:       # the old process's last word; the new one says SERVING
            if int(channel.words[EXPERT_STATE]) == ExpertState.STOPPED:
                channel.words[EXPERT_STATE] = ExpertState.JOINING
        logger.info("expert rank %d joined again (pid %d): attention rank %d serves it from its next step",
                    rank, peer.pid, self.rank)
        return True

    def close(self) -> None:
        """Remove the control segment's name (mappings stay valid)."""
        for segment in self.keep_alive:
            if isinstance(segment, HostSegment):
                segment.unlink()


@dataclass
class ExpertLink:
    """An expert rank's channels with one attention rank: channels[m]."""

    attention_rank: int
    worker: int
    shape: ChannelShape
    device: torch.device
    readiness: Readiness
    step_readiness: Readiness
    channels: list[Channel]
    peer: PeerProcess
    keep_alive: list = field(default_factory=list)


def _carve(attention_rank: int, worker: int, num_slots: int, shape: ChannelShape, ctrl: torch.Tensor,
           data: torch.Tensor, events: list | None) -> list[Channel]:
    """Worker ``worker``'s M channels out of the attention rank's control and data memory."""
    row = []
    for slot in range(num_slots):
        c = worker * num_slots + slot
        channel = Channel(attention_rank, worker, slot, shape, ctrl[c * CTRL_BYTES:(c + 1) * CTRL_BYTES],
                          data[c * shape.data_bytes:(c + 1) * shape.data_bytes])
        if events is not None:
            channel.events = {Flag.REQUEST: events[2 * c], Flag.REPLY: events[2 * c + 1]}
        row.append(channel)
    return row


def join_attention(rank: int, expert_ranks: Sequence[int], dist_init_addr: str, timeout_s: float,
                   shape: ChannelShape, num_slots: int, device: torch.device | str,
                   readiness: str | None = None) -> AttentionSide:
    """Allocate, publish, wait for every expert rank to map; → the channels."""
    if num_slots < 1 or not expert_ranks:
        raise ValueError(f"need >= 1 micro-batch slot and >= 1 expert rank; got {num_slots}, {list(expert_ranks)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kind = check_readiness(readiness, device)
    deadline = time.monotonic() + timeout_s
    store = connect_store(dist_init_addr, timeout_s)
    num_channels = len(expert_ranks) * num_slots
    ctrl_bytes, data_bytes = num_channels * CTRL_BYTES, num_channels * shape.data_bytes
    on_host = device.type != "cuda"
    host = HostSegment.create(ctrl_bytes + (data_bytes if on_host else 0), f"a{rank}")
    joined = False
    try:
        gpu = None if on_host else CudaSegment.create(data_bytes, device)
        events = IpcEvents.create(2 * num_channels, device) if kind == "events" else None
        data = host.tensor[ctrl_bytes:] if on_host else gpu.tensor
        publish(store, f"attention/{rank}", {
            "process": process_identity(), "shape": shape.to_dict(), "num_slots": num_slots,
            "expert_ranks": list(expert_ranks), "readiness": kind, "ctrl": host.describe(),
            "data": None if on_host else gpu.describe(), "data_offset": ctrl_bytes if on_host else 0,
            "events": events.describe(device) if events is not None else None})
        channels = [_carve(rank, w, num_slots, shape, host.tensor[:ctrl_bytes], data,
                           events.events if events is not None else None) for w in range(len(expert_ranks))]
        peers = []
        for e in expert_ranks:
            identity = fetch(store, f"expert/{e}", deadline - time.monotonic(), e, f"expert rank {e}")
            peers.append(PeerProcess(identity["process"], e))
        for e in expert_ranks:
            opened = fetch(store, f"opened/{e}/{rank}", deadline - time.monotonic(), e,
                           f"expert rank {e}'s mapping of attention rank {rank}'s channels")
            if not opened["ok"]:
                raise BackendUnavailable(f"expert rank {e} could not map attention rank {rank}'s cuda_ipc channels: "
                                         f"{opened['error']}")
        joined = True
    finally:
        if not joined:      # else kept until close(): a restarted expert rank maps it again
            host.unlink()
    logger.info("attention rank %d joined the cuda_ipc data plane: %d expert ranks x %d slots, %s memory, "
                "readiness %s, %d tokens max", rank, len(expert_ranks), num_slots, device, kind, shape.max_tokens)
    messages = make_readiness(kind, device)
    return AttentionSide(rank, list(expert_ranks), shape, num_slots, device, messages,
                         make_step_readiness(messages, device), channels, peers, [host, gpu, events], store)


def join_expert(rank: int, attention_ranks: Sequence[int], dist_init_addr: str,
                timeout_s: float) -> dict[int, ExpertLink]:
    """Publish this process, map every attention rank's channels to this rank; → links by attention rank."""
    deadline = time.monotonic() + timeout_s
    store = connect_store(dist_init_addr, timeout_s)
    publish(store, f"expert/{rank}", {"process": process_identity()})
    links = {}
    for a in attention_ranks:
        desc = fetch(store, f"attention/{a}", deadline - time.monotonic(), a, f"attention rank {a}")
        try:
            links[a] = _open_link(rank, a, desc)
        except Exception as exc:
            publish(store, f"opened/{rank}/{a}", {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            raise BackendUnavailable(f"expert rank {rank} cannot map attention rank {a}'s cuda_ipc channels: "
                                     f"{exc}") from exc
        publish(store, f"opened/{rank}/{a}", {"ok": True, "process": process_identity()})
    logger.info("expert rank %d joined the cuda_ipc data plane with attention ranks %s", rank, list(attention_ranks))
    return links


def _open_link(rank: int, attention_rank: int, desc: dict) -> ExpertLink:
    if rank not in desc["expert_ranks"]:
        raise ValueError(f"attention rank {attention_rank} expects expert ranks {desc['expert_ranks']}, not {rank}")
    worker = desc["expert_ranks"].index(rank)
    shape, num_slots = ChannelShape.from_dict(desc["shape"]), int(desc["num_slots"])
    peer = PeerProcess(desc["process"], attention_rank)
    host = HostSegment.open(desc["ctrl"])
    ctrl_bytes = len(desc["expert_ranks"]) * num_slots * CTRL_BYTES
    if desc["data"] is None:
        gpu, data, device = None, host.tensor[int(desc["data_offset"]):], torch.device("cpu")
    else:
        gpu = CudaSegment.open(desc["data"])
        data, device = gpu.tensor, gpu.tensor.device
    events = IpcEvents.open(desc["events"]) if desc["events"] is not None else None
    channels = _carve(attention_rank, worker, num_slots, shape, host.tensor[:ctrl_bytes], data,
                      events.events if events is not None else None)
    for channel in channels:
        channel.mark_joined()           # before ``opened`` is published: the attention rank sends after it
    messages = make_readiness(desc["readiness"], device)
    return ExpertLink(attention_rank, worker, shape, device, messages, make_step_readiness(messages, device), channels,
                      peer, [host, gpu, events])
