"""A user-space CUDA MPS daemon for processes that share one GPU (the ``cuda_ipc`` data plane).

Without MPS a GPU time-slices between the CUDA contexts of different processes: a kernel of the
expert process that waits on a flag written by the attention process can hold the GPU for a whole
timeslice (measured on an H100: 4.36 ms per hand-off with device flags, 0.30 ms with IPC events).
Under MPS the processes' kernels run concurrently and the same hand-off takes ~10 µs
(bench/results/ipc_handoff_h100.json).

``UserMps`` starts ``nvidia-cuda-mps-control -d`` with its pipe and log directories in a folder of
its own (``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``): no root, no change to the
device's compute mode, nothing outside that folder touched; ``quit`` stops it. Processes join it
by inheriting ``env`` (it must be set before they create their first CUDA context).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
SYSTEM_PIPE = Path("/tmp/nvidia-mps")        # where a daemon started without CUDA_MPS_PIPE_DIRECTORY listens
MPS_MODES = ("auto", "on", "off")


class MpsUnavailable(RuntimeError):
    pass


class UserMps:
    """``with UserMps() as env: subprocess.Popen(..., env=env)``; ``env`` is os.environ plus the MPS dirs."""

    def __init__(self, root: str | Path | None = None, timeout_s: float = 20.0) -> None:
        self._root = Path(root) if root is not None else None
        self._timeout_s = timeout_s
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.env: dict[str, str] = {}
        self.folder: Path | None = None

    def start(self) -> dict[str, str]:
        control = shutil.which(CONTROL)
        if control is None:
            raise MpsUnavailable(f"{CONTROL} is not on PATH (it ships with the NVIDIA driver utilities); "
                                 "without MPS, processes sharing one GPU time-slice")
        if self._root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="epserve-mps-")
            self.folder = Path(self._tmp.name)
        else:
            self.folder = self._root
        for sub in ("pipe", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(self.folder / "pipe"),
                   CUDA_MPS_LOG_DIRECTORY=str(self.folder / "log"))
        done = subprocess.run([control, "-d"], env=env, capture_output=True, text=True, timeout=self._timeout_s)
        if done.returncode != 0:
            raise MpsUnavailable(f"{CONTROL} -d failed (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[:500]}")
        self.env = env
        return env

    def stop(self) -> None:
        if not self.env:
            return
        control = shutil.which(CONTROL)
        if control is not None:
            subprocess.run([control], input="quit\n", env=self.env, capture_output=True, text=True,
                           timeout=self._timeout_s)
        self.env = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class MpsPlan:
    start: bool          # start a user-space daemon for the deployment
    warning: str = ""    # what the user should know (printed by ``epserve up``)


def shared_gpus(devices: Sequence[str]) -> list[str]:
    """CUDA devices that more than one process of ``devices`` (one entry per process) uses."""
    seen: dict[str, int] = {}
    for device in devices:
        if device.startswith("cuda"):
            index = device.partition(":")[2] or "0"
            seen[f"cuda:{index}"] = seen.get(f"cuda:{index}", 0) + 1
    return sorted(d for d, count in seen.items() if count > 1)


def plan_mps(mode: str, backend: str, devices: Sequence[str], env: dict[str, str] | None = None) -> MpsPlan:
    """What ``epserve up --mps MODE`` does for a deployment whose processes use ``devices``.

    auto: start a daemon when the cuda_ipc data plane puts several processes on one GPU and none is
    reachable already (CUDA_MPS_PIPE_DIRECTORY set, or a system daemon's pipe in /tmp/nvidia-mps);
    on: start one whenever none is reachable; off: never (a warning when cuda_ipc shares a GPU).
    ValueError when ``on`` cannot be honoured."""
    if mode not in MPS_MODES:
        raise ValueError(f"--mps must be one of {', '.join(MPS_MODES)}, got {mode!r}")
    env = os.environ if env is None else env
    shared = shared_gpus(devices) if backend == "cuda_ipc" else []
    running = bool(env.get("CUDA_MPS_PIPE_DIRECTORY")) or (SYSTEM_PIPE / "control").exists()
    slow = (f"the cuda_ipc processes sharing {', '.join(shared)} will time-slice the GPU: each MoE layer's "
            "hand-off waits for a scheduler timeslice (~4 ms measured on an H100, bench/results/serve_deployed.md)")
    if mode == "off":
        return MpsPlan(False, f"--mps off: {slow}" if shared else "")
    if running:
        return MpsPlan(False)
    if mode == "auto" and not shared:
        return MpsPlan(False)
    if shutil.which(CONTROL) is None:
        if mode == "on":
            raise ValueError(f"--mps on: {CONTROL} is not on PATH (it comes with the NVIDIA driver utilities); "
                             "install it or use --mps off")
        return MpsPlan(False, f"{CONTROL} not found, so no MPS daemon: {slow}")
    return MpsPlan(True)
