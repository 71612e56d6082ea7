"""RMSNorm and fused residual-add + RMSNorm kernels against the layers' torch numerics."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.rms_norm import (add_rms_norm, add_rms_norm_inplace, add_rms_norm_reference, rms_norm,
                                      rms_norm_reference)
from kernel_test_utils import TOLERANCE, rel_err

EPS = 1e-6


def make_rows(num_rows: int, width: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_rows, width, generator=g) * 3).to(dtype).to(device)
    residual = (torch.randn(num_rows, width, generator=g) * 5).to(dtype).to(device)
    weight = (1 + 0.3 * torch.randn(width, generator=g)).to(dtype).to(device)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,width", [(1, 16), (7, 33), (13, 200), (3, 1000)])
def test_rms_norm_matches_float64_reference(num_rows, width, dtype):
    x, _, weight = make_rows(num_rows, width, dtype, seed=width)
    out = rms_norm(x, weight, EPS)
    ref = rms_norm_reference(x.double(), weight.double(), EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,width", [(1, 16), (5, 48), (11, 257)])
def test_add_rms_norm_matches_reference(num_rows, width, dtype):
    x, residual, weight = make_rows(num_rows, width, dtype, seed=num_rows)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = add_rms_norm(x, residual, weight, EPS)
    ref_normed, ref_summed = add_rms_norm_reference(x.double(), residual.double(), weight.double(), EPS)
    assert rel_err(summed, ref_summed) < TOLERANCE[dtype]
    assert rel_err(normed, ref_normed) < TOLERANCE[dtype]
    # the sum is rounded to the dtype exactly as torch's add rounds it
    assert torch.equal(summed, residual_before + x_before)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def within_ulps(out: torch.Tensor, ref: torch.Tensor, ulps: int = 1) -> bool:
    bound = ref.float().abs() * torch.finfo(ref.dtype).eps * ulps + 1e-6
    return bool(((out.float() - ref.float()).abs() <= bound).all())


def test_float16_rounds_like_the_layers():
    """In the model dtype the kernel rounds where torch rounds: h to the dtype, then one product
    (at most one ulp apart: the row sum's order)."""
    x, residual, weight = make_rows(9, 96, torch.float16, seed=3)
    assert within_ulps(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))
    normed, summed = add_rms_norm(x, residual, weight, EPS)
    ref_normed, ref_summed = add_rms_norm_reference(x, residual, weight, EPS)
    assert torch.equal(summed, ref_summed)
    assert within_ulps(normed, ref_normed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_form_writes_residual_and_out(dtype):
    x, residual, weight = make_rows(6, 40, dtype, seed=11)
    ref_normed, ref_summed = add_rms_norm_reference(x.double(), residual.double(), weight.double(), EPS)
    out = torch.full_like(x, float("nan"))
    returned = add_rms_norm_inplace(x, residual, weight, EPS, out)
    assert returned is out
    assert rel_err(residual, ref_summed) < TOLERANCE[dtype]
    assert rel_err(out, ref_normed) < TOLERANCE[dtype]


def test_out_may_alias_x_and_rows_may_be_strided():
    x, residual, weight = make_rows(5, 24, torch.float32, seed=5)
    wide = torch.zeros(5, 64)
    view = wide[:, 8:32]                                             # row stride 64
    view.copy_(x)
    ref = rms_norm_reference(x.double(), weight.double(), EPS)
    assert rms_norm(view, weight, EPS, out=view) is view
    assert rel_err(view, ref) < TOLERANCE[torch.float32]
    assert torch.count_nonzero(wide[:, :8]) == 0 and torch.count_nonzero(wide[:, 32:]) == 0
    # in place: out aliases x, summed overwrites residual
    x2, residual2, _ = make_rows(5, 24, torch.float32, seed=6)
    ref_normed, ref_summed = add_rms_norm_reference(x2.double(), residual2.double(), weight.double(), EPS)
    add_rms_norm_inplace(x2, residual2, weight, EPS, out=x2)
    assert rel_err(x2, ref_normed) < TOLERANCE[torch.float32]
    assert rel_err(residual2, ref_summed) < TOLERANCE[torch.float32]


def test_float32_weight_promotes_like_torch():
    x, _, weight = make_rows(4, 32, torch.float16, seed=8)
    out = rms_norm(x, weight.float(), EPS)
    ref = rms_norm_reference(x, weight.float(), EPS)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_no_rows_and_bad_shapes():
    weight = torch.ones(8)
    assert rms_norm(torch.empty(0, 8), weight, EPS).shape == (0, 8)
    normed, summed = add_rms_norm(torch.empty(0, 8), torch.empty(0, 8), weight, EPS)
    assert normed.shape == summed.shape == (0, 8)
    with pytest.raises(AssertionError, match="weight"):
        rms_norm(torch.ones(2, 8), torch.ones(9), EPS)
    with pytest.raises(AssertionError, match="residual"):
        add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), weight, EPS)


# ---- GPU (bf16 at Qwen3-30B-A3B's hidden size) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_rows", [1, 64, 300])
def test_gpu_bf16_qwen3_hidden(num_rows):
    x, residual, weight = make_rows(num_rows, 2048, torch.bfloat16, seed=num_rows, device="cuda")
    tol = TOLERANCE[torch.bfloat16]
    assert rel_err(rms_norm(x, weight, EPS), rms_norm_reference(x.double(), weight.double(), EPS)) < tol
    ref_normed, ref_summed = add_rms_norm_reference(x.double(), residual.double(), weight.double(), EPS)
    normed, summed = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, residual + x)
    assert rel_err(normed, ref_normed) < tol and rel_err(summed, ref_summed) < tol
    # against the model's own bf16 op: h may round one ulp apart (approximate rsqrt, the row
    # sum's order), and the product with the weight once more
    assert within_ulps(normed, rms_norm_reference(residual + x, weight, EPS), ulps=2)
    out = torch.empty_like(x)
    add_rms_norm_inplace(x, residual, weight, EPS, out)
    assert torch.equal(out, normed) and torch.equal(residual, summed)
