"""Device-side readiness flags of the ``cuda_ipc`` data plane: signal and wait, one tiny kernel each.

Legend: no T/D/K here: each launch touches one int64 flag word (and one int64 error word).

The value a launch signals or awaits is ``counter[0] * stride + offset``, read on the device:
- per-message path: ``counter`` is a zero word, ``offset`` the message's sequence number;
- step path (CUDA graphs): ``counter`` is the step number the host writes before each replay,
  ``stride`` FLAG_STEP_STRIDE, ``offset`` layer + 1, so one captured graph signals new values
  at every replay.

``signal_flag``: one program stores the value with release semantics at system scope, after
everything earlier in the stream (``pdl_wait`` first): a peer that observes the value with
acquire semantics sees the data written before it.
``wait_flag``: one program spins on acquire loads until the flag reaches the value (flags only
grow, so a later value also satisfies an earlier wait) or ``budget`` iterations have passed; on
exhaustion it raises ``error[0]`` to at least ``error_code`` and returns (what follows in the
stream then reads data that is not ready: the host checks ``error`` after the step).
Neither syncs with the host: both are capturable in CUDA graphs.

On CPU tensors (tests, ``TRITON_INTERPRET=1``) the interpreter runs a kernel to completion on the
calling thread and patches ``triton.language`` meanwhile, so two threads must not run kernels at
once: launches there hold a lock, and a wait is a loop of zero-budget launches with short sleeps
between them (the lock is free between checks, and the error word is set the same way).

One-GPU physics: without MPS the GPU time-slices between processes, so a waiting kernel can
hold the GPU until its timeslice ends while the peer's kernels wait for theirs (see
docs/architecture.md, and bench/gpu/ipc_handoff.py for the measured cost).
"""

from __future__ import annotations

import threading
import time

import torch
import triton
import triton.language as tl

from epserve.kernels.pdl import enabled as pdl_enabled, launch_options, pdl_launch_dependents, pdl_wait, pdl_wait_only

FLAG_STEP_STRIDE = 1 << 16     # flag values of step s: s * stride + layer + 1 (layers < 65535)
SPINS_PER_SECOND = 1_000_000   # estimate for the budget: ~1 µs per system-scope atomic round trip
INTERPRETER_SPINS_PER_SECOND = 1_000   # the Triton interpreter (CPU tests): ~1 ms per check
MAX_BUDGET = 2**31 - 1
_INTERPRETER_LOCK = threading.Lock()
_INTERPRETER_CHECK_SLEEP_S = 200e-6


@triton.jit(do_not_specialize=["stride", "offset"])
def _signal_flag_kernel(flag_ptr, counter_ptr, stride, offset, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    value = tl.load(counter_ptr) * stride + offset
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit
def spin_until(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget):
    """Spin on acquire loads until flag >= counter[0] * stride + offset, or raise error to error_code
    after ``budget`` spins (also the body of the fused hand-offs, ``cuda_ipc_handoff.py``)."""
    target = tl.load(counter_ptr) * stride + offset
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    spins = 0
    while (seen < target) & (spins < budget):
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        spins += 1
    if seen < target:
        tl.atomic_max(error_ptr, error_code, sem="relaxed", scope="sys")


@triton.jit(do_not_specialize=["stride", "offset", "error_code", "budget"])
def _wait_flag_kernel(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget,
                      USE_PDL: tl.constexpr):
    pdl_wait_only(USE_PDL)
    spin_until(flag_ptr, counter_ptr, stride, offset, error_ptr, error_code, budget)
    pdl_launch_dependents(USE_PDL)                      # not while spinning: see kernels/pdl.py


def _check_word(name: str, word: torch.Tensor, device: torch.device) -> None:
    assert word.dtype == torch.int64 and word.numel() == 1, \
        f"{name} must be int64 [1], got {word.dtype} {tuple(word.shape)}"
    assert word.device == device, f"{name} is on {word.device}, the flag on {device}"


def signal_flag(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int) -> None:
    """flag int64 [1] ← counter[0] * stride + offset (release, system scope), in stream order."""
    _check_word("flag", flag, flag.device)
    _check_word("counter", counter, flag.device)
    if flag.device.type != "cuda":
        with _INTERPRETER_LOCK:
            _signal_flag_kernel[(1,)](flag, counter, stride, offset, USE_PDL=False)
        return
    _signal_flag_kernel[(1,)](flag, counter, stride, offset, num_warps=1, **launch_options(pdl_enabled(flag.device)))


def wait_flag(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int, error: torch.Tensor,
              error_code: int, budget: int) -> None:
    """Stream waits until flag int64 [1] >= counter[0] * stride + offset; after ``budget`` spins
    error int64 [1] ← max(error, error_code) instead."""
    _check_word("flag", flag, flag.device)
    _check_word("counter", counter, flag.device)
    _check_word("error", error, flag.device)
    assert error_code > 0 and 0 <= budget <= MAX_BUDGET, \
        f"error_code {error_code} must be > 0, budget {budget} in [0, {MAX_BUDGET}]"
    if flag.device.type != "cuda":
        _wait_flag_interpreted(flag, counter, stride, offset, error, error_code, budget)
        return
    _wait_flag_kernel[(1,)](flag, counter, stride, offset, error, error_code, budget, num_warps=1,
                            **launch_options(pdl_enabled(flag.device)))


def _wait_flag_interpreted(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int, error: torch.Tensor,
                           error_code: int, budget: int) -> None:
    """``wait_flag`` under the Triton interpreter: zero-budget launches (one check each), lock free between."""
    missed = torch.zeros_like(error)
    for _ in range(budget + 1):
        missed.zero_()
        with _INTERPRETER_LOCK:
            _wait_flag_kernel[(1,)](flag, counter, stride, offset, missed, 1, 0, USE_PDL=False)
        if not int(missed.item()):
            return
        time.sleep(_INTERPRETER_CHECK_SLEEP_S)
    error.clamp_(min=error_code)


def spin_budget(timeout_s: float, device: torch.device) -> int:
    """Iterations of ``wait_flag`` on ``device`` for about ``timeout_s`` (the rates are estimates)."""
    rate = SPINS_PER_SECOND if device.type == "cuda" else INTERPRETER_SPINS_PER_SECOND
    return max(1, min(int(timeout_s * rate), MAX_BUDGET))


def signal_flag_reference(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int) -> None:
    """What ``signal_flag`` leaves in memory (without its ordering guarantee)."""
    flag.copy_(counter * stride + offset)


def wait_flag_reference(flag: torch.Tensor, counter: torch.Tensor, stride: int, offset: int, error: torch.Tensor,
                        error_code: int, budget: int) -> None:
    """What ``wait_flag`` leaves in memory when nobody signals meanwhile (budget > 0 does not matter)."""
    target = counter * stride + offset
    error.copy_(torch.where(flag < target, torch.clamp(error, min=error_code), error))
