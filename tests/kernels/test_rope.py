"""Fused q/k norm + RoPE + KV-cache store against the layer ops composed.

Small odd shapes in float32 and float16, with and without q/k norm (Qwen3; GPT-OSS and Mixtral have
none), partial rotary (GLM-4-MoE) and YaRN's attention factor (GPT-OSS) — on the CPU under the Triton
interpreter, with CUDA compiled on the GPU (``DEVICE``, as test_paged_attention.py). GPU only (marked):
bf16 at Qwen3-30B-A3B's shapes and a replay from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from epserve.kernels.rope import qk_norm_rope_store, qk_norm_rope_store_reference
from epserve.models.layers import RotaryEmbedding
from kernel_test_utils import TOLERANCE, rel_err

EPS = 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# compiled, the GPU contracts x * cos - y * sin into an FMA where torch rounds each product: in float16
# ~20% of elements differ from the layer ops in the last bit (bf16 on an H100, 2026-12-06)
LAST_BIT_SHARE = 0.3 if DEVICE == "cuda" else 0.01


def make_problem(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                 num_blocks: int = 7, block_size: int = 4, theta: float = 10000.0, seed: int = 0,
                 device: str = DEVICE):
    """Random qkv and norm weights; positions spread past the first block; distinct slots, some -1."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(dtype)
    q_w = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    k_w = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    positions = torch.randint(0, 5000, (num_tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.25] = -1                       # padding tokens
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    inv_freq = RotaryEmbedding(head_dim, theta).inv_freq
    tensors = dict(qkv=qkv, positions=positions, inv_freq=inv_freq, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slots, q_norm_weight=q_w, k_norm_weight=k_w)
    return {name: t.to(device) for name, t in tensors.items()}


def run_both(problem: dict, heads: int, kv_heads: int, head_dim: int, with_norm: bool = True):
    """(kernel q, k_cache, v_cache), (float64 reference q, k_cache, v_cache)."""
    p = dict(problem)
    if not with_norm:
        p["q_norm_weight"] = p["k_norm_weight"] = None
    k_cache, v_cache = p.pop("k_cache").clone(), p.pop("v_cache").clone()
    q = qk_norm_rope_store(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, eps=EPS, **p)
    ref = {name: (t.double() if t is not None and t.is_floating_point() and name != "inv_freq" else t)
           for name, t in p.items()}
    ref_k, ref_v = problem["k_cache"].double(), problem["v_cache"].double()
    ref_q = qk_norm_rope_store_reference(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                         k_cache=ref_k, v_cache=ref_v, eps=EPS, **ref)
    return (q, k_cache, v_cache), (ref_q, ref_k, ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,heads,kv_heads,head_dim", [(1, 2, 1, 16), (7, 6, 2, 16), (13, 6, 2, 32),
                                                                 (5, 4, 4, 32), (9, 3, 1, 24)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_matches_float64_reference(num_tokens, heads, kv_heads, head_dim, dtype, with_norm):
    problem = make_problem(num_tokens, heads, kv_heads, head_dim, dtype, seed=num_tokens * head_dim)
    (q, k_cache, v_cache), (ref_q, ref_k, ref_v) = run_both(problem, heads, kv_heads, head_dim, with_norm)
    assert q.shape == (num_tokens, heads, head_dim) and q.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_err(q, ref_q) < tol
    assert rel_err(k_cache, ref_k) < tol
    assert torch.equal(v_cache.double(), ref_v)                          # v is copied untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 16), (24, 8), (64, 32)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_partial_rotary_rotates_the_leading_dims_only(head_dim, rotary_dim, dtype, with_norm):
    """GLM-4-MoE's partial rotary: RoPE on each head's first rotary_dim dims (inv_freq of that length),
    the rest normed (with the norm) and stored as they are."""
    heads, kv_heads = 4, 2
    problem = make_problem(9, heads, kv_heads, head_dim, dtype, seed=head_dim + rotary_dim)
    problem["inv_freq"] = RotaryEmbedding(rotary_dim, 10000.0).inv_freq.to(DEVICE)
    (q, k_cache, v_cache), (ref_q, ref_k, ref_v) = run_both(problem, heads, kv_heads, head_dim, with_norm)
    tol = TOLERANCE[dtype]
    assert rel_err(q, ref_q) < tol and rel_err(k_cache, ref_k) < tol
    assert torch.equal(v_cache.double(), ref_v)
    if not with_norm:                                  # the pass-through dims are the input, bit for bit
        qkv = problem["qkv"].view(9, heads + 2 * kv_heads, head_dim)
        assert torch.equal(q[..., rotary_dim:], qkv[:, :heads, rotary_dim:])


def test_float16_rounds_like_the_layer_ops():
    """In the model dtype the kernel rounds where torch rounds (norm, cos/sin, each product, the sum)."""
    heads, kv_heads, head_dim = 6, 2, 32
    problem = make_problem(17, heads, kv_heads, head_dim, torch.float16, num_blocks=6, block_size=4, seed=21)
    same = {name: t for name, t in problem.items() if name not in ("k_cache", "v_cache")}
    (q, k_cache, _), _ = run_both(problem, heads, kv_heads, head_dim)
    ref_k, ref_v = problem["k_cache"].clone(), problem["v_cache"].clone()
    ref_q = qk_norm_rope_store_reference(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                         k_cache=ref_k, v_cache=ref_v, eps=EPS, **same)
    for out, ref in ((q, ref_q), (k_cache, ref_k)):
        assert (out != ref).float().mean() < LAST_BIT_SHARE   # cos/sin may differ by a float32 ulp
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -10 + 1e-3).all()


def test_padding_slots_store_nothing_and_blocks_past_the_first_are_written():
    heads, kv_heads, head_dim = 6, 2, 16
    problem = make_problem(11, heads, kv_heads, head_dim, torch.float32, num_blocks=5, block_size=3, seed=4)
    problem["slot_mapping"] = torch.tensor([13, -1, 0, 7, -1, 14, 2, -1, 9, 5, 11], device=DEVICE)
    problem["positions"] = torch.tensor([40, 0, 3, 700, 1, 4095, 12, 2, 33, 8, 100], device=DEVICE)
    before_k, before_v = problem["k_cache"].clone(), problem["v_cache"].clone()
    (q, k_cache, v_cache), (ref_q, ref_k, ref_v) = run_both(problem, heads, kv_heads, head_dim)
    written = torch.zeros(5 * 3, dtype=torch.bool, device=DEVICE)
    written[problem["slot_mapping"][problem["slot_mapping"] >= 0]] = True
    flat_k, flat_v = k_cache.view(15, -1), v_cache.view(15, -1)
    assert torch.equal(flat_k[~written], before_k.view(15, -1)[~written])      # untouched, bit for bit
    assert torch.equal(flat_v[~written], before_v.view(15, -1)[~written])
    assert not torch.equal(flat_k[written], before_k.view(15, -1)[written])
    assert rel_err(k_cache, ref_k) < TOLERANCE[torch.float32]
    assert torch.equal(v_cache.double(), ref_v)
    qkv = problem["qkv"].view(11, heads + 2 * kv_heads, head_dim)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[14], qkv[5, heads + kv_heads:])   # block 4, offset 2
    assert rel_err(q, ref_q) < TOLERANCE[torch.float32]


def gpt_oss_rope(head_dim: int, factor: float = 32.0, original: int = 4096):
    """GPT-OSS's rotary: YaRN (gpt-oss: factor 32 over 4096 positions; the tiny model: 4 over 512), on DEVICE."""
    from epserve.model_config import RopeScaling
    from epserve.models.rope_scaling import MlaRotaryEmbedding
    scaling = RopeScaling(factor=factor, original_max_position_embeddings=original, beta_fast=32.0, beta_slow=1.0,
                          truncate=False)
    rope = MlaRotaryEmbedding(head_dim, 150000.0, scaling, "rotate_half").to(DEVICE)
    assert rope.attention_factor != 1.0
    return rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,factor,original", [(4, 2, 32, 32.0, 4096), (4, 2, 16, 4.0, 512)],
                         ids=["gpt-oss", "tiny"])
def test_yarn_attention_factor_rotates_as_the_gpt_oss_backend(dtype, heads, kv_heads, head_dim, factor, original):
    """GPT-OSS: YaRN frequencies and cos/sin scaled by the attention factor, no q/k norm; the same
    rotation as the CPU sink backend's (``MlaRotaryEmbedding``, rotate-half) and as the reference. "tiny":
    the tiny GPT-OSS's attention shape and rope (tests/attention_worker/family_parity.py), 16-token blocks."""
    rope = gpt_oss_rope(head_dim, factor, original)
    problem = make_problem(9, heads, kv_heads, head_dim, dtype, seed=5 + head_dim, block_size=16)
    problem.update(inv_freq=rope.inv_freq, q_norm_weight=None, k_norm_weight=None)
    problem["positions"][:2] = torch.tensor([0, 1])                       # a prompt's first positions too
    k_cache, v_cache = problem.pop("k_cache").clone(), problem.pop("v_cache").clone()
    v_before = v_cache.clone()
    q = qk_norm_rope_store(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, attention_factor=rope.attention_factor, **problem)
    tables = rope.tables(problem["positions"], dtype)
    want_q = rope.apply(problem["qkv"][:, :heads * head_dim].view(9, heads, head_dim), tables)
    want_k = rope.apply(problem["qkv"][:, heads * head_dim:(heads + kv_heads) * head_dim].view(9, kv_heads, head_dim),
                        tables)
    stored = problem["slot_mapping"] >= 0
    got_k = k_cache.view(-1, kv_heads, head_dim)[problem["slot_mapping"][stored]]
    assert rel_err(q, want_q) < TOLERANCE[dtype] and rel_err(got_k, want_k[stored]) < TOLERANCE[dtype]
    got_v = v_cache.view(-1, kv_heads, head_dim)[problem["slot_mapping"][stored]]
    want_v = problem["qkv"][:, (heads + kv_heads) * head_dim:].view(9, kv_heads, head_dim)[stored]
    assert torch.equal(got_v, want_v)                                     # v copied as it is
    unwritten = torch.ones(v_cache.shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    unwritten[problem["slot_mapping"][stored]] = False
    flat_v, flat_before = v_cache.view(-1, kv_heads, head_dim), v_before.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_v[unwritten], flat_before[unwritten])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q = qk_norm_rope_store_reference(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=ref_k,
                                         v_cache=ref_v, attention_factor=rope.attention_factor, **problem)
    assert rel_err(q, ref_q) < TOLERANCE[dtype] and rel_err(ref_q, want_q) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_factor_scales_position_zero_exactly(dtype):
    """At position 0 (cos = 1, sin = 0) the YaRN rotation is q, k times the attention factor rounded to the
    dtype — exactly, compiled (an FMA with a zero product rounds once) as interpreted: what a prompt's first
    token attends with."""
    heads, kv_heads, head_dim = 4, 2, 16
    rope = gpt_oss_rope(head_dim, 4.0, 512)
    problem = make_problem(5, heads, kv_heads, head_dim, dtype, seed=3, block_size=16)
    problem.update(inv_freq=rope.inv_freq, q_norm_weight=None, k_norm_weight=None)
    problem["positions"] = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    problem["slot_mapping"] = torch.tensor([3, 17, -1, 0, 26], device=DEVICE)
    k_cache, v_cache = problem.pop("k_cache"), problem.pop("v_cache")
    q = qk_norm_rope_store(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, attention_factor=rope.attention_factor, **problem)
    factor = torch.tensor(rope.attention_factor, dtype=torch.float32).to(dtype).item()
    x = problem["qkv"].view(5, heads + 2 * kv_heads, head_dim)
    assert torch.equal(q, x[:, :heads] * factor)
    slots = torch.tensor([3, 17, 0, 26], device=DEVICE)
    tokens = [0, 1, 3, 4]
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[slots], x[tokens, heads:heads + kv_heads] * factor)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[slots], x[tokens, heads + kv_heads:])


def test_rotation_is_the_identity_at_position_zero_and_q_out_is_used():
    heads, kv_heads, head_dim = 2, 1, 16
    problem = make_problem(3, heads, kv_heads, head_dim, torch.float32, seed=9)
    problem["positions"] = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    problem["q_norm_weight"] = problem["k_norm_weight"] = None
    q_out = torch.empty(3, heads, head_dim, device=DEVICE)
    k_cache, v_cache = problem.pop("k_cache"), problem.pop("v_cache")
    q = qk_norm_rope_store(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, q_out=q_out, **problem)
    assert q is q_out
    assert torch.equal(q, problem["qkv"][:, :heads * head_dim].view(3, heads, head_dim))


def test_int32_positions_and_slots_and_a_strided_qkv():
    heads, kv_heads, head_dim = 6, 2, 32
    problem = make_problem(6, heads, kv_heads, head_dim, torch.float32, seed=12)
    (q, k_cache, _), (ref_q, ref_k, _) = run_both(problem, heads, kv_heads, head_dim)
    wide = torch.zeros(6, problem["qkv"].shape[1] + 8, device=DEVICE)
    wide[:, 4:-4] = problem["qkv"]
    problem.update(qkv=wide[:, 4:-4], positions=problem["positions"].int(), slot_mapping=problem["slot_mapping"].int())
    (q2, k_cache2, _), _ = run_both(problem, heads, kv_heads, head_dim)
    assert torch.equal(q2, q) and torch.equal(k_cache2, k_cache)


def test_no_tokens_and_bad_shapes():
    heads, kv_heads, head_dim = 2, 1, 16
    problem = make_problem(0, heads, kv_heads, head_dim, torch.float32)
    k_cache, v_cache = problem.pop("k_cache"), problem.pop("v_cache")
    q = qk_norm_rope_store(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, **problem)
    assert q.shape == (0, heads, head_dim)
    with pytest.raises(AssertionError, match="qkv"):
        qk_norm_rope_store(num_heads=heads + 1, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache,
                           v_cache=v_cache, **problem)


# ---- GPU (bf16 at Qwen3-30B-A3B's attention shapes) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 128, 1000])
def test_gpu_bf16_qwen3_shapes(num_tokens):
    heads, kv_heads, head_dim = 32, 4, 128
    problem = make_problem(num_tokens, heads, kv_heads, head_dim, torch.bfloat16, num_blocks=600, block_size=16,
                           theta=1e6, seed=num_tokens, device="cuda")
    problem["positions"] = torch.randint(0, 40000, (num_tokens,), device="cuda")
    (q, k_cache, v_cache), (ref_q, ref_k, ref_v) = run_both(problem, heads, kv_heads, head_dim)
    tol = TOLERANCE[torch.bfloat16]
    assert rel_err(q, ref_q) < tol and rel_err(k_cache, ref_k) < tol
    assert torch.equal(v_cache.double(), ref_v)
    # against the layers in bf16 itself: the GPU contracts products into FMAs where torch rounds
    # each op, so ~20% of elements differ in the last bit (H100, 2026-12-06); the error stays tiny
    p = dict(problem)
    same_k, same_v = p.pop("k_cache").clone(), p.pop("v_cache").clone()
    same_q = qk_norm_rope_store_reference(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                          k_cache=same_k, v_cache=same_v, eps=EPS, **p)
    assert (q != same_q).float().mean() < 0.3 and rel_err(q, same_q) < 4e-3
    assert torch.equal(v_cache, same_v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replays_from_a_cuda_graph():
    heads, kv_heads, head_dim = 32, 4, 128
    problem = make_problem(64, heads, kv_heads, head_dim, torch.bfloat16, num_blocks=64, block_size=16,
                           seed=1, device="cuda")
    k_cache, v_cache = problem.pop("k_cache"), problem.pop("v_cache")
    args = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, k_cache=k_cache, v_cache=v_cache,
                eps=EPS, **problem)
    eager = qk_norm_rope_store(**args).clone()
    q_out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qk_norm_rope_store(q_out=q_out, **args)
    fresh = make_problem(64, heads, kv_heads, head_dim, torch.bfloat16, num_blocks=64, block_size=16,
                         seed=2, device="cuda")
    problem["qkv"].copy_(fresh["qkv"])
    problem["positions"].copy_(fresh["positions"])
    graph.replay()
    k2, v2 = k_cache.clone(), v_cache.clone()
    expected = qk_norm_rope_store(**{**args, "k_cache": k2, "v_cache": v2})
    torch.testing.assert_close(q_out, expected, rtol=0, atol=0)
    assert not torch.equal(q_out, eager)
