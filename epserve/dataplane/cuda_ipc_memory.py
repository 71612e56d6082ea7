"""Memory both processes of a ``cuda_ipc`` channel map: host shared files and CUDA IPC buffers.

Each kind is created once by the attention rank at join, described by a small JSON-able dict
that travels through the rendezvous store, and opened by every expert rank from it. Nothing is
allocated per message.

- ``HostSegment``: a file in /dev/shm (tmpfs; the temp directory where there is none), mapped
  MAP_SHARED by ``torch.from_file`` in every process, uint8 [nbytes], zero-filled at creation.
  The creator unlinks the file once every peer has mapped it (``unlink``), so a crash later
  leaks nothing; a crash during join leaves one ``epserve-ipc-*`` file behind.
- ``CudaSegment``: one ``torch.empty`` on the creator's GPU exported with
  ``UntypedStorage._share_cuda_()`` (a cudaIpcMemHandle plus torch's producer ref-counter, so
  the block stays allocated while a consumer holds it) and opened with ``_new_shared_cuda``.
  The peer must run on the same host, with the same device numbering (CUDA_VISIBLE_DEVICES); on
  another GPU of the host it needs peer access.
- ``IpcEvents``: ``torch.cuda.Event(interprocess=True)`` created by the attention rank, shared
  by ``ipc_handle()`` and opened with ``Event.from_ipc_handle``; either side records them.
"""

from __future__ import annotations

import base64
import os
import tempfile
import uuid
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _pid_namespace() -> int:
    """This process's PID namespace (containers sharing /dev/shm may not share it)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_stale_segments(directory: Path) -> None:
    """Remove segment files whose creator process is gone. An attention worker keeps its segment's name
    while it runs (an expert worker restarted later maps it again) and removes it when it closes; one that
    was killed leaves it behind, and the next one to create a segment on this host removes it. Only files
    made in this PID namespace are judged (a pid means nothing in another)."""
    namespace = str(_pid_namespace())
    for path in directory.glob(f"epserve-ipc-*-{namespace}-*-*"):
        parts = path.name.split("-")
        try:
            pid = int(parts[-2])
        except (ValueError, IndexError):
            continue
        if parts[-3] != namespace:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:                 # another user's live process
            pass


class HostSegment:
    """uint8 [nbytes] in a shared file. ``create`` on one side, ``open(describe())`` on the other."""

    def __init__(self, path: Path, nbytes: int, owner: bool) -> None:
        self.path, self.nbytes, self.owner = path, nbytes, owner
        self.tensor = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)

    @classmethod
    def create(cls, nbytes: int, tag: str) -> HostSegment:
        directory = SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir())
        sweep_stale_segments(directory)
        path = directory / f"epserve-ipc-{tag}-{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return cls(path, nbytes, owner=True)

    @classmethod
    def open(cls, description: dict) -> HostSegment:
        path, nbytes = Path(description["path"]), int(description["nbytes"])
        if not path.exists():
            raise FileNotFoundError(f"shared segment {path} is gone: the attention worker that made it has "
                                    "stopped (a restarted attention worker needs a restarted cuda_ipc deployment), "
                                    "or this process does not see its /dev/shm: every worker of a cuda_ipc "
                                    "deployment must be on one host and see the same /dev/shm (containers: "
                                    "--ipc=host)")
        return cls(path, nbytes, owner=False)

    def describe(self) -> dict:
        return {"kind": "host", "path": str(self.path), "nbytes": self.nbytes}

    def unlink(self) -> None:
        """Remove the file name; every existing mapping stays valid."""
        if self.owner:
            self.path.unlink(missing_ok=True)


class CudaSegment:
    """uint8 [nbytes] on a GPU, shared by CUDA IPC handle."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> CudaSegment:
        tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)           # zeros in place before any peer maps them
        return cls(tensor)

    @classmethod
    def open(cls, description: dict) -> CudaSegment:
        (device, handle, size, offset, ref_handle, ref_offset, event_handle,
         event_sync) = description["share"]
        with torch.cuda.device(int(device)):    # the storage is tagged with the current device
            storage = torch.UntypedStorage._new_shared_cuda(
                int(device), _unb64(handle), int(size), int(offset), _unb64(ref_handle), int(ref_offset),
                _unb64(event_handle), bool(event_sync))
            tensor = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", int(device)))
            tensor.set_(storage, 0, (int(description["nbytes"]),), (1,))
        return cls(tensor)

    def describe(self) -> dict:
        storage = self.tensor.untyped_storage()
        (device, handle, size, offset, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()
        share = [int(device), _b64(handle), int(size), int(offset), _b64(ref_handle or b""), int(ref_offset),
                 _b64(event_handle or b""), bool(event_sync)]
        return {"kind": "cuda", "nbytes": int(self.tensor.numel()), "share": share}

    def unlink(self) -> None:
        """Nothing to remove: the block lives as long as this process holds ``tensor``."""


class IpcEvents:
    """A list of interprocess CUDA events (two per channel: request, reply)."""

    def __init__(self, events: list[torch.cuda.Event]) -> None:
        self.events = events

    @classmethod
    def create(cls, count: int, device: torch.device) -> IpcEvents:
        with torch.cuda.device(device):
            events = [torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True) for _ in range(count)]
            for event in events:   # a recorded event: the first query before any exchange reads "done"
                event.record()
        return cls(events)

    @classmethod
    def open(cls, description: dict) -> IpcEvents:
        device = torch.device("cuda", int(description["device"]))
        return cls([torch.cuda.Event.from_ipc_handle(device, _unb64(h)) for h in description["handles"]])

    def describe(self, device: torch.device) -> dict:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device": index, "handles": [_b64(e.ipc_handle()) for e in self.events]}
