"""Compile the decode-path kernels for sm_90 with the device's Triton, on a machine without a GPU or torch.

The device machine runs Triton 3.6.0; the CPU venv has a newer one, so a kernel that compiles here may not
compile there. This compiles the fused attention input, the prefetched o_proj GEMV, the router and the
MoE down GEMV (both variants) with whatever Triton runs it and prints registers and stack (spills) per
kernel. torch is stubbed (only the kernels' Python modules import it; nothing here calls it):

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python bench/gpu/compile_decode_kernels.py
"""

import re
import subprocess
import sys
import types
from pathlib import Path


class _Any(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()


class _Dummy:
    def __call__(self, *a, **k):
        return _Dummy()

    def __getattr__(self, n):
        return _Dummy()

    def __or__(self, o):
        return self

    def __ror__(self, o):
        return self

    def __getitem__(self, k):
        return _Dummy()

    def __mro_entries__(self, bases):
        return (object,)


for name in ["torch", "torch.nn", "torch.nn.functional", "torch.distributed"]:
    sys.modules[name] = _Any(name)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

print("triton", triton.__version__)
CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"


def comp(K, sig, consts, w):
    s = dict(sig)
    s.update({k: "constexpr" for k in consts})
    k = triton.compile(
        ASTSource(fn=K, signature=s, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": w, "launch_pdl": True},
    )
    Path("/tmp/cc.cubin").write_bytes(k.asm["cubin"])
    u = subprocess.run([str(CUOBJDUMP), "-res-usage", "/tmp/cc.cubin"], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK):\d+", u))


from epserve.kernels.norm_qkv_rope import _add_norm_qkv_rope_kernel as Q

names = [
    "delta_ptr",
    "res_ptr",
    "norm_w_ptr",
    "w_ptr",
    "res_out_ptr",
    "qkv_ptr",
    "counter_ptr",
    "pos_ptr",
    "inv_freq_ptr",
    "q_w_ptr",
    "k_w_ptr",
    "q_out_ptr",
    "k_cache_ptr",
    "v_cache_ptr",
    "slot_ptr",
]
types_ = ["*bf16"] * 6 + ["*i32", "*i64", "*fp32", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*i64"]
sig = dict(zip(names, types_))
for n in ["D", "H", "HKV", "block_size"]:
    sig[n] = "i32"
sig["eps"] = "fp32"
for n in [
    "stride_dt",
    "stride_rt",
    "stride_ot",
    "stride_wn",
    "stride_qkv",
    "stride_qo_t",
    "stride_qo_h",
    "stride_kc_n",
    "stride_kc_b",
    "stride_kc_h",
    "stride_vc_n",
    "stride_vc_b",
    "stride_vc_h",
]:
    sig[n] = "i32"
# Qwen3-30B-A3B's shape; the variants: the default 8x512 tile, 8x1024, the first layer (no delta), no q/k norm
QKV_BASE = dict(HAS_DELTA=True, BLOCK_D=2048, BN=8, BK=512, HEAD_DIM=128, ROT=128, HALF_P2=64, PASS_P2=1,
                HAS_QK_NORM=True, ATTENTION_FACTOR=1.0, USE_PDL=True)
for name, change in [("8x512", {}), ("8x1024", dict(BK=1024)), ("first layer", dict(HAS_DELTA=False)),
                     ("no qk norm, D=4096", dict(HAS_QK_NORM=False, BLOCK_D=4096))]:
    print("norm_qkv", name, comp(Q, sig, dict(QKV_BASE, **change), 4))
from epserve.kernels.dense_gemv import _linear_prefetched_kernel as L

sig = {
    "x_ptr": "*bf16",
    "w_ptr": "*bf16",
    "out_ptr": "*bf16",
    "T": "i32",
    "N": "i32",
    "K": "i32",
    "stride_xt": "i32",
    "stride_wn": "i32",
    "stride_ot": "i32",
}
print("linear", comp(L, sig, dict(BN=4, BLOCK_K=4096, USE_PDL=True), 4))
sig["x_ptr"] = sig["w_ptr"] = sig["out_ptr"] = "*fp32"
print("linear fp32", comp(L, sig, dict(BN=4, BLOCK_K=4096, USE_PDL=False), 4))
from epserve.kernels.moe_router import _add_norm_router_topk_kernel as R

names = "delta_ptr res_ptr norm_w_ptr router_ptr x_ptr res_out_ptr logits_ptr counter_ptr ids_ptr weights_ptr".split()
sig = dict(zip(names, ["*bf16"] * 6 + ["*fp32", "*i32", "*i32", "*fp32"]))
sig.update(
    D="i32",
    E="i32",
    top_k="i32",
    eps="fp32",
    stride_dt="i32",
    stride_rt="i32",
    stride_xt="i32",
    stride_ot="i32",
    stride_we="i32",
)
print(
    "router",
    comp(R, sig, dict(BLOCK_D=2048, BLOCK_E=4, E_P2=128, K_P2=8, NUM_EB=32, RENORMALIZE=True, USE_PDL=True), 4),
)
from epserve.kernels.moe_gemv import _down_combine_gemv_kernel as DN

sig = {
    "act_ptr": "*bf16",
    "w_ptr": "*bf16",
    "out_ptr": "*bf16",
    "slot_ids_ptr": "*i32",
    "topk_w_ptr": "*fp32",
    "top_k": "i32",
    "D": "i32",
    "I": "i32",
    "stride_aa": "i32",
    "stride_ws": "i32",
    "stride_wn": "i32",
    "stride_ot": "i32",
}
for ahead in (False, True):
    print("down", ahead, comp(DN, sig, dict(K_P2=8, BN=2, BK=128, AHEAD=ahead, USE_PDL=True), 8))
