"""Does a refactor of the persistent MoE kernels change their machine code? Compiles
``_gate_up_tma_persistent_kernel`` and ``_down_tma_persistent_kernel`` for sm_90 offline (no GPU needed:
Triton's compiler and its bundled nvdisasm), at one tile config with and without the TMA store, and
compares the SASS of two trees instruction by instruction with register numbers masked.

    PYTHONPATH=<tree A> python3 bench/gpu/sass_same.py compile /tmp/a
    PYTHONPATH=<tree B> python3 bench/gpu/sass_same.py compile /tmp/b
    python3 bench/gpu/sass_same.py compare /tmp/a /tmp/b
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
BM, BN, BK = 64, 128, 64
GATE_TYPES = {"x_ptr": "*bf16", "w_desc": f"tensordesc<bf16[{BN}, {BK}]>", "act_ptr": "*bf16",
              "act_desc": f"tensordesc<bf16[{BM}, {BN}]>", "act_half_desc": f"tensordesc<bf16[{BM // 2}, {BN}]>",
              "sorted_ids_ptr": "*i32", "offsets_ptr": "*i32", "counts_ptr": "*i32"}
DOWN_TYPES = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>", "a_half_desc": f"tensordesc<bf16[{BM // 2}, {BK}]>",
              "w_desc": f"tensordesc<bf16[{BN}, {BK}]>", "out_desc": f"tensordesc<bf16[{BM}, {BN}]>",
              "out_half_desc": f"tensordesc<bf16[{BM // 2}, {BN}]>", "rows_ptr": "*bf16", "topk_w_ptr": "*fp32",
              "sorted_ids_ptr": "*i32", "offsets_ptr": "*i32", "counts_ptr": "*i32"}


def compile_kernel(fn, types: dict, consts: dict):
    names = fn.arg_names
    signature, constexprs = {}, {}
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(names.index(name),)] = consts[name]
        else:
            signature[name] = types.get(name, "i32")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))


def compile_all(out: Path) -> None:
    from epserve.kernels import moe_down, moe_gate_up

    out.mkdir(parents=True, exist_ok=True)
    common = dict(S_P2=128, BM=BM, BN=BN, BK=BK, GROUP_M=8, USE_PDL=True, NUM_PROGS=132, FLATTEN=True)
    for store in (False, True):
        kernels = {f"gate_up_{store}": (moe_gate_up._gate_up_tma_persistent_kernel, GATE_TYPES,
                                        dict(common, EVEN_K=True, TMA_STORE=store)),
                   f"down_{store}": (moe_down._down_tma_persistent_kernel, DOWN_TYPES, dict(common, TMA_STORE=store))}
        for name, (fn, types, consts) in kernels.items():
            (out / f"{name}.cubin").write_bytes(compile_kernel(fn, types, consts).asm["cubin"])


def sass(path: Path) -> list[str]:
    text = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    masked = []
    for line in text.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if match:
            masked.append(re.sub(r"\bU?R\d+\b|\bU?P\d+\b|0x[0-9a-f]+|\.L_x_\d+|`\(.*?\)", "_", match.group(1)))
    return masked


def compare(a: Path, b: Path) -> bool:
    same = True
    for cubin in sorted(a.glob("*.cubin")):
        x, y = sass(cubin), sass(b / cubin.name)
        ops_x, ops_y = (collections.Counter(i.split()[0] for i in s) for s in (x, y))
        verdict = "identical modulo registers" if x == y else (
            "same instructions, other order" if ops_x == ops_y else "different instructions")
        print(f"{cubin.stem:16s} {len(x):6d} / {len(y):6d} instructions: {verdict}")
        same &= x == y
    return same


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        compile_all(Path(sys.argv[2]))
    else:
        raise SystemExit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
