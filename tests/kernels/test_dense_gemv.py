"""``linear_prefetched`` (kernels/dense_gemv.py) against ``F.linear`` in float64: float32 and float16 at odd
shapes under the Triton interpreter (compiled on a GPU), every token count it serves, a tile per program
of one or several rows; what it refuses. GPU only: bf16 at Qwen3-30B-A3B's o_proj and a graph replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epserve.kernels.dense_gemv import MAX_TOKENS, LinearConfig, fits, linear_prefetched
from kernel_test_utils import TOLERANCE, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(num_tokens: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEVICE)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 3, MAX_TOKENS])
@pytest.mark.parametrize("n,k,block_n", [(10, 24, 4), (33, 100, 1), (64, 64, 8)])
def test_matches_linear_in_float64(num_tokens, n, k, block_n, dtype):
    x, w = problem(num_tokens, n, k, dtype, seed=n + k + num_tokens)
    out = linear_prefetched(x, w, LinearConfig(block_n=block_n))
    assert out.shape == (num_tokens, n) and out.dtype == dtype
    assert rel_err(out, F.linear(x.double(), w.double())) < TOLERANCE[dtype]


def test_non_contiguous_rows_of_x_are_read_by_stride():
    x, w = problem(6, 12, 32, torch.float32, seed=3)
    wide = torch.zeros(6, 48, device=DEVICE)
    wide[:, 8:40] = x
    assert torch.allclose(linear_prefetched(wide[:, 8:40], w), F.linear(x, w), atol=1e-5)


def test_refuses_more_tokens_and_tiles_past_the_registers():
    x, w = problem(MAX_TOKENS + 1, 8, 16, torch.float32)
    assert not fits(MAX_TOKENS + 1, w)
    with pytest.raises(AssertionError, match="takes 1 to"):
        linear_prefetched(x, w)
    wide = torch.zeros(4, 1 << 16, device=DEVICE)
    assert not fits(1, wide) and fits(1, wide[:, :4096])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_bf16_o_proj_shape_and_graph_replay(num_tokens):
    x, w = problem(num_tokens, 2048, 4096, torch.bfloat16, seed=5)
    eager = linear_prefetched(x, w)
    assert rel_err(eager, F.linear(x.double(), w.double())) < TOLERANCE[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_prefetched(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
