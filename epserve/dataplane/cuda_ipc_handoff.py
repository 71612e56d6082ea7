"""A ``cuda_ipc`` step hand-off in one launch: copy then signal, or wait then copy (device flags).

Legend: n elements of a segment, BLOCK elements per program and segment, G programs.

Per MoE layer at a few tokens the step path is a chain of tiny dependent launches across two
processes; each boundary costs a few µs of drain and launch even inside a CUDA graph. These kernels
fold the flag operations of ``cuda_ipc_flags.py`` into the copies next to them:
- ``copy_and_signal(segments, ...)``: up to three (src, dst) copies (dst's dtype: int32 slot ids
  land in the int64 channel words), then the flag. Every program copies its BLOCK of each segment;
  after a CTA barrier it counts itself in at ``arrivals`` (acquire-release, GPU scope) and the last
  program to arrive stores the flag value with release semantics at system scope, so a peer that
  acquires the flag sees every program's data; it resets ``arrivals`` for the next launch (graph
  replays need no memset). The attention side's ``send`` (hidden, slot ids, weights) and the
  expert side's partial.
- ``wait_and_copy``: every program spins on the flag (``spin_until``: acquire, system scope, a
  budget), then copies every G-th BLOCK, reading past L1 (the data was written by the peer during
  this launch). G is at most ``MAX_WAITING_PROGRAMS``: spinning programs occupy warp slots, and a
  prefill-sized grid of them (thousands) would fill every SM while the peer needs them to compute
  what they await. The attention side's ``receive`` from one expert worker.
- ``wait_local_slots``: the spin, then ``kernels/local_slots.py``'s transform of the choices. The
  expert side's first launch of a layer.
A waiting kernel lets the next kernel of its stream be launched (PDL) only once its wait is
over: parked programs of a GEMM would otherwise hold the SMs' shared memory while the peer process
needs it to produce what is awaited. A wait that runs out of budget raises ``error`` as
``wait_flag`` does and goes on (the host checks after the step). On CPU tensors the Triton
interpreter runs them (tests; a flag that is not yet set then spins the interpreter until the
budget runs out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epserve.dataplane.cuda_ipc_flags import _INTERPRETER_LOCK, spin_until
from epserve.kernels.local_slots import BLOCK as SLOT_BLOCK, local_slots_block
from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_launch_dependents, pdl_wait, pdl_wait_only

BLOCK = 2048
MAX_WAITING_PROGRAMS = 8    # programs that spin: a spinning program holds its SM's warp slots, which the peer
                            # process (under MPS, on the same GPU) needs to produce what is awaited


def waiting_programs(numel: int, block: int) -> int:
    """Programs of a launch that waits: one per block up to ``MAX_WAITING_PROGRAMS`` (then they stride)."""
    return max(1, min(triton.cdiv(numel, block), MAX_WAITING_PROGRAMS))


@triton.jit
def _copy_block(src_ptr, dst_ptr, n, block, BLOCK: tl.constexpr, VOLATILE: tl.constexpr):
    offs = block * BLOCK + tl.arange(0, BLOCK)                          # < 2^31 elements (asserted)
    ok = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=ok, volatile=VOLATILE).to(dst_ptr.dtype.element_ty),
             mask=ok)


@triton.jit(do_not_specialize=["n0", "n1", "n2", "stride", "offset"])
def _copy_signal_kernel(src0, dst0, n0, src1, dst1, n1, src2, dst2, n2, flag_ptr, counter_ptr, stride, offset,
                        arrivals_ptr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    block = tl.program_id(0)
    _copy_block(src0, dst0, n0, block, BLOCK, False)
    _copy_block(src1, dst1, n1, block, BLOCK, False)
    _copy_block(src2, dst2, n2, block, BLOCK, False)
    tl.debug_barrier()                                  # every thread's stores precede the release below
    if tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.store(arrivals_ptr, 0)
        tl.atomic_xchg(flag_ptr, tl.load(counter_ptr) * stride + offset, sem="release", scope="sys")


@triton.jit(do_not_specialize=["stride", "offset", "error_code", "budget", "n"])
def _wait_copy_kernel(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget, src_ptr, dst_ptr, n,
                      BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait_only(USE_PDL)
    spin_until(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget)
    pdl_launch_dependents(USE_PDL)                      # not while spinning: see kernels/pdl.py
    tl.debug_barrier()
    for block in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        _copy_block(src_ptr, dst_ptr, n, block, BLOCK, True)


@triton.jit(do_not_specialize=["stride", "offset", "error_code", "budget", "numel", "base", "slots_per_worker"])
def _wait_local_slots_kernel(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget, slot_ptr,
                             weight_ptr, local_ptr, local_weight_ptr, numel, base, slots_per_worker,
                             BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait_only(USE_PDL)
    spin_until(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget)
    pdl_launch_dependents(USE_PDL)
    tl.debug_barrier()
    for block in range(tl.program_id(0), tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        local_slots_block(slot_ptr, weight_ptr, local_ptr, local_weight_ptr, numel, base, slots_per_worker, block,
                          BLOCK, True)


def _launch(kernel, grid, *args, device: torch.device, **meta) -> None:
    if device.type == "cuda":
        kernel[grid](*args, **meta, num_warps=4, **launch_options(pdl_enabled(device)))
        return
    with _INTERPRETER_LOCK:
        kernel[grid](*args, **meta, USE_PDL=False)


def _check_words(flag: torch.Tensor, *words: torch.Tensor) -> None:
    for word in (flag, *words):
        assert word.numel() == 1 and word.device == flag.device, "flag words must be one element on one device"


def copy_and_signal(segments: list[tuple[torch.Tensor, torch.Tensor]], flag: torch.Tensor, counter: torch.Tensor,
                    stride: int, offset: int, arrivals: torch.Tensor) -> None:
    """dst ← src for each (src, dst) (same shapes, contiguous, dst's dtype), then flag int64 [1] ←
    counter[0] * stride + offset (release, system scope); arrivals int32 [1], zero between launches."""
    assert 1 <= len(segments) <= 3, "one to three segments"
    assert arrivals.dtype == torch.int32 and flag.dtype == counter.dtype == torch.int64
    _check_words(flag, counter, arrivals)
    args = []
    for src, dst in segments:
        assert src.shape == dst.shape and src.is_contiguous() and dst.is_contiguous(), \
            f"segment {tuple(src.shape)} -> {tuple(dst.shape)}: same shapes, contiguous"
        assert src.device == dst.device == flag.device, "segments and flag on one device"
        args += [src, dst, src.numel()]
    while len(args) < 9:
        args += [flag, flag, 0]                                          # an empty segment
    most = max(src.numel() for src, _ in segments)
    assert most < 2**31, "segments of fewer than 2^31 elements"
    _launch(_copy_signal_kernel, (max(1, triton.cdiv(most, BLOCK)),), *args, flag, counter, stride, offset, arrivals,
            device=flag.device, BLOCK=BLOCK)


def wait_and_copy(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int, error: torch.Tensor,
                  error_code: int, budget: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Wait until flag >= counter[0] * stride + offset (after ``budget`` spins: error ← max(error,
    error_code) and go on), then dst ← src (contiguous, same shape)."""
    _check_words(flag, counter, error)
    assert src.shape == dst.shape and src.is_contiguous() and dst.is_contiguous() and src.device == flag.device
    assert error_code > 0 and budget >= 0 and src.numel() < 2**31
    _launch(_wait_copy_kernel, (waiting_programs(src.numel(), BLOCK),), flag, counter, stride, offset, error,
            error_code, budget, src, dst, src.numel(), device=flag.device, BLOCK=BLOCK)


def wait_local_slots(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int, error: torch.Tensor,
                     error_code: int, budget: int, slot_ids: torch.Tensor, weights: torch.Tensor, worker: int,
                     slots_per_worker: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The wait of ``wait_and_copy``, then ``local_slots(slot_ids [n, K], weights [n, K], ...)`` →
    (local [n, K] int64, local_weights [n, K] out_dtype)."""
    _check_words(flag, counter, error)
    assert slot_ids.shape == weights.shape and slot_ids.dim() == 2 and slot_ids.is_contiguous() \
        and weights.is_contiguous(), "slot_ids and weights: contiguous [n, K]"
    local = torch.empty(slot_ids.shape, dtype=torch.int64, device=slot_ids.device)
    local_weights = torch.empty(slot_ids.shape, dtype=out_dtype, device=slot_ids.device)
    _launch(_wait_local_slots_kernel, (waiting_programs(slot_ids.numel(), SLOT_BLOCK),), flag, counter, stride,
            offset, error, error_code, budget, slot_ids, weights, local, local_weights, slot_ids.numel(),
            worker * slots_per_worker, slots_per_worker, device=flag.device, BLOCK=SLOT_BLOCK)
    return local, local_weights
