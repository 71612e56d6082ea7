"""The fused attention input (residual add + RMSNorm + QKV GEMV + q/k norm + RoPE + cache store) against the
three operations composed.

Float32 and float16 at small odd shapes under the Triton interpreter on the CPU (compiled on a GPU:
``DEVICE``), with and without the residual add (the first layer) and the q/k norms (Mixtral has none),
partial rotary (GLM-4-MoE's), YaRN's attention factor, padding rows, every block_n that divides the head,
and repeated launches (the per-head counters reset themselves). GPU only: bf16 at Qwen3-30B-A3B's shape,
and a CUDA-graph replay equal to the eager launch.
"""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.norm_qkv_rope import (MAX_TOKENS, NormQkvConfig, add_norm_qkv_rope_store,
                                           add_norm_qkv_rope_store_reference, fits)
from epserve.models.layers import RotaryEmbedding
from kernel_test_utils import TOLERANCE, rel_err

EPS = 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def make_problem(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dim: int, dtype: torch.dtype, *,
                 rotary_dim: int | None = None, num_blocks: int = 6, block_size: int = 4, seed: int = 0,
                 with_delta: bool = True, with_qk_norm: bool = True):
    g = torch.Generator().manual_seed(seed)
    rows = (heads + 2 * kv_heads) * head_dim
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.25] = -1                      # padding rows
    p = dict(
        delta=torch.randn(num_tokens, dim, generator=g).to(dtype) if with_delta else None,
        residual=(torch.randn(num_tokens, dim, generator=g) * 3).to(dtype),
        norm_weight=(1 + 0.3 * torch.randn(dim, generator=g)).to(dtype),
        qkv_weight=(torch.randn(rows, dim, generator=g) / dim ** 0.5).to(dtype),
        positions=torch.randint(0, 5000, (num_tokens,), generator=g),
        inv_freq=RotaryEmbedding(rotary_dim or head_dim, 10000.0).inv_freq,
        k_cache=torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype),
        v_cache=torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype),
        slot_mapping=slots,
        q_norm_weight=(1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype) if with_qk_norm else None,
        k_norm_weight=(1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype) if with_qk_norm else None)
    return {name: None if t is None else t.to(DEVICE) for name, t in p.items()}


def run_both(p: dict, heads: int, kv_heads: int, head_dim: int, config: NormQkvConfig = NormQkvConfig(),
             reference_dtype: torch.dtype = torch.float64, **kw):
    """(q, summed, k_cache, v_cache) of the kernel and of the composition in ``reference_dtype``."""
    shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, eps=EPS, **kw)
    k_cache, v_cache = p["k_cache"].clone(), p["v_cache"].clone()
    args = {n: t for n, t in p.items() if n not in ("k_cache", "v_cache")}
    q, summed = add_norm_qkv_rope_store(k_cache=k_cache, v_cache=v_cache, config=config, **args, **shape)
    ref = {n: (t.to(reference_dtype) if t is not None and t.is_floating_point() and n != "inv_freq" else t)
           for n, t in p.items()}
    ref_k, ref_v = ref.pop("k_cache"), ref.pop("v_cache")
    ref_q, ref_summed = add_norm_qkv_rope_store_reference(k_cache=ref_k, v_cache=ref_v, **ref, **shape)
    return (q, summed, k_cache, v_cache), (ref_q, ref_summed, ref_k, ref_v)


def assert_close(got, want, dtype):
    q, summed, k_cache, v_cache = got
    ref_q, ref_summed, ref_k, ref_v = want
    tol = TOLERANCE[dtype]
    assert q.dtype == summed.dtype == dtype
    assert rel_err(q, ref_q) < tol
    assert rel_err(summed, ref_summed) < tol
    assert rel_err(k_cache, ref_k) < tol
    assert rel_err(v_cache, ref_v) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,heads,kv_heads,head_dim,dim", [(1, 2, 1, 16, 48), (3, 6, 2, 16, 40),
                                                                    (MAX_TOKENS, 4, 4, 32, 64), (5, 3, 1, 24, 24)])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("with_qk_norm", [True, False])
def test_matches_the_composition_in_float64(num_tokens, heads, kv_heads, head_dim, dim, dtype, with_delta,
                                            with_qk_norm):
    p = make_problem(num_tokens, heads, kv_heads, head_dim, dim, dtype, seed=num_tokens * dim + head_dim,
                     with_delta=with_delta, with_qk_norm=with_qk_norm)
    got, want = run_both(p, heads, kv_heads, head_dim)
    assert_close(got, want, dtype)
    if not with_delta:
        assert torch.equal(got[1], p["residual"])                  # nothing added: the residual as it was


@pytest.mark.parametrize("block_n,block_k", [(2, 16), (4, 64), (8, 8), (16, 32)])
def test_every_tile_shape_computes_the_same(block_n, block_k):
    heads, kv_heads, head_dim, dim = 4, 2, 16, 56                   # D not a multiple of the larger block_k
    p = make_problem(3, heads, kv_heads, head_dim, dim, torch.float32, seed=block_n + block_k)
    got, want = run_both(p, heads, kv_heads, head_dim, NormQkvConfig(block_n=block_n, block_k=block_k))
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_model_dtype_rounds_like_the_unfused_kernels(dtype):
    """Against the unfused path run in the model dtype itself: the residual sum exactly, the rest within a
    last bit here and there (the projection sums in another order than the GEMM)."""
    heads, kv_heads, head_dim, dim = 4, 2, 16, 64
    p = make_problem(4, heads, kv_heads, head_dim, dim, dtype, seed=11)
    (q, summed, k_cache, _), (ref_q, ref_summed, ref_k, _) = run_both(p, heads, kv_heads, head_dim,
                                                                       reference_dtype=dtype)
    assert torch.equal(summed, ref_summed)
    for out, ref in ((q, ref_q), (k_cache, ref_k)):
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -8 + 2e-3).all()


@pytest.mark.parametrize("rotary_dim,attention_factor", [(8, 1.0), (16, 1.0), (32, 1.3)])
def test_partial_rotary_and_the_attention_factor(rotary_dim, attention_factor):
    heads, kv_heads, head_dim, dim = 4, 2, 32, 48
    p = make_problem(5, heads, kv_heads, head_dim, dim, torch.float32, rotary_dim=rotary_dim, seed=rotary_dim)
    got, want = run_both(p, heads, kv_heads, head_dim, attention_factor=attention_factor)
    assert_close(got, want, torch.float32)


def test_padding_rows_store_nothing_and_counters_reset_between_launches():
    heads, kv_heads, head_dim, dim = 3, 1, 16, 32
    p = make_problem(4, heads, kv_heads, head_dim, dim, torch.float32, num_blocks=3, block_size=4, seed=2)
    p["slot_mapping"] = torch.tensor([5, -1, 0, 11], device=DEVICE)
    before_k, before_v = p["k_cache"].clone(), p["v_cache"].clone()
    for _ in range(3):                                  # a counter left non-zero would skip a head's epilogue
        got, want = run_both(p, heads, kv_heads, head_dim)
        assert_close(got, want, torch.float32)
    written = torch.zeros(12, dtype=torch.bool, device=DEVICE)
    written[[5, 0, 11]] = True
    flat_k, flat_v = got[2].view(12, -1), got[3].view(12, -1)
    assert torch.equal(flat_k[~written], before_k.view(12, -1)[~written])
    assert torch.equal(flat_v[~written], before_v.view(12, -1)[~written])
    assert not torch.equal(flat_k[written], before_k.view(12, -1)[written])


def test_fits_says_which_steps_callers_must_compose():
    p = make_problem(1, 2, 1, 16, 32, torch.float32)
    assert fits(p["residual"], p["qkv_weight"], p["k_cache"], 16)
    assert not fits(p["residual"], p["qkv_weight"], p["k_cache"], 12)                # heads of partial tiles
    assert not fits(p["residual"], p["qkv_weight"].half(), p["k_cache"], 16)         # two dtypes
    two = make_problem(2, 2, 1, 16, 32, torch.float32)           # computed right, but slower than composed
    assert not fits(two["residual"], two["qkv_weight"], two["k_cache"], 16)


def test_rejects_what_it_cannot_compute():
    heads, kv_heads, head_dim, dim = 2, 1, 16, 32
    p = make_problem(MAX_TOKENS + 1, heads, kv_heads, head_dim, dim, torch.float32)
    with pytest.raises(AssertionError, match="fused path takes"):
        run_both(p, heads, kv_heads, head_dim)
    p = make_problem(2, heads, kv_heads, head_dim, dim, torch.float32)
    with pytest.raises(AssertionError, match="must divide head_dim"):
        run_both(p, heads, kv_heads, head_dim, NormQkvConfig(block_n=32))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_bf16_at_qwen3_30b_a3b_shape_and_graph_replay(num_tokens):
    heads, kv_heads, head_dim, dim = 32, 4, 128, 2048
    p = make_problem(num_tokens, heads, kv_heads, head_dim, dim, torch.bfloat16, num_blocks=64, block_size=16,
                     seed=7)
    got, want = run_both(p, heads, kv_heads, head_dim)
    assert_close(got, want, torch.bfloat16)
    k_cache, v_cache = p["k_cache"].clone(), p["v_cache"].clone()
    args = {n: t for n, t in p.items() if n not in ("k_cache", "v_cache")}
    shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, eps=EPS)
    add_norm_qkv_rope_store(k_cache=k_cache, v_cache=v_cache, **args, **shape)     # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, summed = add_norm_qkv_rope_store(k_cache=k_cache, v_cache=v_cache, **args, **shape)
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, got[0]) and torch.equal(summed, got[1])
    stored = p["slot_mapping"][p["slot_mapping"] >= 0]
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[stored], got[2].view(-1, kv_heads, head_dim)[stored])
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[stored], got[3].view(-1, kv_heads, head_dim)[stored])
