"""The few-token dense projection GEMV against torch (interpreter on CPU, the device on a GPU)."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.dense_gemv import MAX_ROWS, dense_gemv, dense_gemv_reference
from kernel_test_utils import TOLERANCE, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def operands(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k", [(1, 48, 64), (2, 37, 300), (3, 130, 129), (5, 16, 1000), (8, 70, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float32_reference(rows, n, k, dtype, bias):
    x, w, b = operands(rows, n, k, dtype, bias, seed=rows * n + k)
    out = dense_gemv(x, w, b)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, dense_gemv_reference(x, w, b)) < TOLERANCE[dtype]


def test_deterministic_and_independent_of_other_rows():
    """Bit for bit: the same call twice, and a row whatever the other rows of its batch are (same
    M bucket): one fixed-order sum per output, no atomics."""
    x, w, _ = operands(4, 96, 200, torch.float32, False, seed=7)
    whole = dense_gemv(x, w)
    assert torch.equal(whole, dense_gemv(x, w))
    assert torch.equal(dense_gemv(x[:3].contiguous(), w), whole[:3])
    other = x.clone()
    other[3] = -other[3]
    assert torch.equal(dense_gemv(other, w)[:3], whole[:3])


def test_refuses_more_rows_than_it_is_for():
    x, w, _ = operands(MAX_ROWS + 1, 16, 32, torch.float32, False, seed=1)
    with pytest.raises(AssertionError, match="at most"):
        dense_gemv(x, w)
