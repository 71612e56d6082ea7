"""Compile the split-TMA grouped GEMMs for sm_90 on a machine without a GPU; print resources.

Registers, stack (spills) and shared memory of each config cost no device time. Needs the
device's Triton (3.6.0) in a separate venv, e.g. ``python3 -m venv /tmp/t36 && /tmp/t36/bin/pip
install triton==3.6.0 torch==2.13.0``, then from the repo root:

    /tmp/t36/bin/python bench/gpu/compile_check.py

Call 6 found with it that the scattered down store spilled ~1 KB per thread at 128x256 (255
registers) and that the TMA-store epilogue needs 154. Caveat: the shared memory reported here
can be lower than the device's (gate_up 128x128x64, 5 stages: 180 KB here, 246 KB required
there), so treat it as a lower bound.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epserve.kernels.moe_down import _down_tma_split_kernel  # noqa: E402
from epserve.kernels.moe_gate_up import _gate_up_tma_split_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"


def desc(rows: int, cols: int) -> str:
    return f"tensordesc<bf16[{rows},{cols}]>"


def resources(fn, sig: dict, consts: dict, warps: int, stages: int) -> str:
    sig.update(USE_PDL="constexpr")
    consts.update(USE_PDL=True)                                   # the default on an H200
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                           options={"num_warps": warps, "num_stages": stages, "launch_pdl": True})
    except Exception as e:                                        # noqa: BLE001
        return f"FAIL {type(e).__name__}: {str(e)[:120]}"
    cubin = Path("/tmp/compile_check.cubin")
    cubin.write_bytes(k.asm["cubin"])
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    return f"shared {k.metadata.shared:6d} B  " + " ".join(re.findall(r"(?:REG|STACK):\d+", usage))


def down(bm, bn, bk, warps, stages, tma_store):
    sig = {"a_desc": desc(bm, bk), "a_half_desc": desc(bm // 2, bk), "w_desc": desc(bn, bk),
           "out_desc": desc(bm, bn) if tma_store else "constexpr",
           "out_half_desc": desc(bm // 2, bn) if tma_store else "constexpr",
           "rows_ptr": "*bf16", "topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32", "offsets_ptr": "*i32",
           "counts_ptr": "*i32", "num_slots": "i32", "D": "i32", "I": "i32", "num_pid_m": "i32",
           "stride_ra": "i32", "S_P2": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr",
           "GROUP_M": "constexpr", "TMA_STORE": "constexpr"}
    consts = {"S_P2": 128, "BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "TMA_STORE": tma_store}
    if not tma_store:
        consts.update(out_desc=None, out_half_desc=None)
    return resources(_down_tma_split_kernel, sig, consts, warps, stages)


def gate_up(bm, bn, bk, warps, stages, tma_store):
    sig = {"x_ptr": "*bf16", "w_desc": desc(bn, bk), "act_ptr": "*bf16",
           "act_desc": desc(bm, bn) if tma_store else "constexpr",
           "act_half_desc": desc(bm // 2, bn) if tma_store else "constexpr",
           "sorted_ids_ptr": "*i32", "offsets_ptr": "*i32", "counts_ptr": "*i32", "num_slots": "i32",
           "top_k": "i32", "D": "i32", "I": "i32", "num_pid_m": "i32", "stride_xt": "i32", "stride_ap": "i32",
           "S_P2": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "GROUP_M": "constexpr",
           "EVEN_K": "constexpr", "TMA_STORE": "constexpr"}
    consts = {"S_P2": 128, "BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "EVEN_K": True, "TMA_STORE": tma_store}
    if not tma_store:
        consts.update(act_desc=None, act_half_desc=None)
    return resources(_gate_up_tma_split_kernel, sig, consts, warps, stages)


if __name__ == "__main__":
    for tma_store in (False, True):
        for cfg in [(128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 128, 8, 2)]:
            print(f"down    split {cfg} tma_store={tma_store}: {down(*cfg, tma_store)}", flush=True)
        for cfg in [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4)]:
            print(f"gate_up split {cfg} tma_store={tma_store}: {gate_up(*cfg, tma_store)}", flush=True)
