"""Programmatic dependent launch (PDL) for the MoE pipeline's kernels (Hopper and newer).

The aligned MoE is a chain of short dependent launches (count, scatter, gate_up, down,
combine). Launched with PDL, a kernel's programs are placed on the GPU while its
predecessor's last programs still run; each waits at ``griddepcontrol.wait`` (the
predecessor has finished and its writes are visible) and then lets its own successor be
launched. The gap between two launches is then mostly hidden; nothing else changes.

Every kernel launched with PDL calls ``pdl_wait`` before it reads or writes memory shared
with other kernels, so the order of memory effects is the order of the stream, as without
PDL. The launch attribute survives CUDA-graph capture (a programmatic edge in the graph).

Enabled on CUDA devices of compute capability 9.0 or newer, unless ``EPSERVE_MOE_PDL=0`` in the
environment at import; never under the Triton interpreter (CPU tests). ``disabled()`` turns it off for a block of
code (the benchmark times both in one run).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# read once: every kernel launch asks
_ENV_OFF = os.environ.get("EPSERVE_MOE_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1"
_forced_off = 0


@functools.lru_cache(maxsize=16)
def _device_supports(device_index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL."""
    if _forced_off or _ENV_OFF or device.type != "cuda":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(use_pdl: bool) -> dict:
    """Extra launch keywords for a kernel taking ``USE_PDL`` (the constexpr) and these."""
    return {"USE_PDL": use_pdl, "launch_pdl": True} if use_pdl else {"USE_PDL": False}


@contextlib.contextmanager
def disabled():
    """Launch without PDL inside this block (for A/B timing in one process)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1


@triton.jit
def pdl_wait_only(USE_PDL: tl.constexpr):
    """Wait for the previous kernel without letting the next one be launched yet: for kernels that
    spin on a flag set by another process (epserve/dataplane), so that the next kernel's programs do
    not sit on SMs, holding their resources, while the peer needs them. Call
    ``pdl_launch_dependents`` once the wait is over."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel in the stream, then let the next one be launched.

    Call first thing, before any early exit: a program that exits without waiting would let
    the next kernel's programs start while this kernel's predecessor still runs."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
