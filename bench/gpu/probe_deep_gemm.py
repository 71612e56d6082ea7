"""Import deep_gemm and run its two bf16 grouped GEMMs once, against torch (exit 1 on failure)."""

import time

import torch

start = time.time()
import deep_gemm  # noqa: E402

print(f"imported deep_gemm from {deep_gemm.__file__} in {time.time() - start:.1f}s", flush=True)
groups, m, n, k = 4, 128, 256, 512
align = deep_gemm.get_mk_alignment_for_contiguous_layout()
print("M alignment for the contiguous layout:", align, flush=True)
a = torch.randn(groups * m, k, device="cuda").bfloat16()
b = torch.randn(groups, n, k, device="cuda").bfloat16()
d = torch.empty(groups * m, n, device="cuda", dtype=torch.bfloat16)
m_indices = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m)
start = time.time()
deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
torch.cuda.synchronize()
ref = torch.einsum("gmk,gnk->gmn", a.view(groups, m, k).float(), b.float()).reshape(groups * m, n)
err = ((d.float() - ref).norm() / ref.norm()).item()
print(f"contiguous: rel err {err:.2e} (first call incl. JIT {time.time() - start:.1f}s)", flush=True)
assert err < 1e-2
a3 = a.view(groups, m, k)
d3 = torch.empty(groups, m, n, device="cuda", dtype=torch.bfloat16)
masked_m = torch.tensor([m, m // 2, 0, 3], device="cuda", dtype=torch.int32)
start = time.time()
deep_gemm.m_grouped_bf16_gemm_nt_masked(a3, b, d3, masked_m, m // 2)
torch.cuda.synchronize()
ref3 = ref.view(groups, m, n)
worst = max((((d3[g, :c].float() - ref3[g, :c]).norm() / ref3[g, :c].norm()).item() if c else 0.0)
            for g, c in enumerate(masked_m.tolist()))
print(f"masked: worst rel err {worst:.2e} (first call incl. JIT {time.time() - start:.1f}s)", flush=True)
assert worst < 1e-2
