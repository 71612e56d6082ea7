"""GPU tests at the benchmark's real shapes, bf16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (local slots, hidden, inter, logical experts routed over, top-k); slot s holds expert s.
QWEN3 = (128, 2048, 768, 128, 8)
DSV3_EP8 = (32, 7168, 2048, 256, 8)


def gpu_problem(shape, num_tokens, dtype=torch.bfloat16, seed=0):
    num_slots, dim, inter, num_experts, top_k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, device="cuda", generator=g).to(dtype)
    w13 = (torch.randn(num_slots, 2 * inter, dim, device="cuda", generator=g) / dim ** 0.5).to(dtype)
    w2 = (torch.randn(num_slots, dim, inter, device="cuda", generator=g) / inter ** 0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
    weights, experts = torch.softmax(logits, -1).topk(top_k, dim=-1)
    slot_ids = torch.where(experts < num_slots, experts, -1).to(torch.int32)
    return hidden, slot_ids, weights, w13, w2


@pytest.mark.parametrize("shape,num_tokens", [(QWEN3, 1), (QWEN3, 16), (QWEN3, 64), (QWEN3, 1024),
                                              (DSV3_EP8, 1), (DSV3_EP8, 64), (DSV3_EP8, 1024)])
def test_triton_runner_bf16_real_shapes(shape, num_tokens):
    from epserve.moe_runner import make_moe_runner
    from epserve.kernels.fused_moe import fused_moe_reference
    hidden, slot_ids, weights, w13, w2 = gpu_problem(shape, num_tokens, seed=num_tokens)
    if num_tokens == 1 and shape is DSV3_EP8:
        slot_ids[0, 0] = 3                      # make sure this shard serves something
    out = make_moe_runner("triton", "cuda").run(hidden, slot_ids, weights, w13, w2)
    ref = fused_moe_reference(hidden, slot_ids, weights, w13, w2, compute_dtype=torch.float32)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("num_tokens", [1, 4, 64, 300])
def test_both_variants_bf16_and_fp16(num_tokens):
    from epserve.kernels.fused_moe import fused_moe_aligned, fused_moe_gemv, fused_moe_reference
    from epserve.kernels.moe_configs import default_config, AlignedConfig
    from epserve.kernels.moe_gate_up import GemmConfig, SplitTmaGemmConfig, TmaGemmConfig
    from epserve.kernels.moe_gemv import GemvConfig
    for dtype in (torch.bfloat16, torch.float16):
        hidden, slot_ids, weights, w13, w2 = gpu_problem(QWEN3, num_tokens, dtype, seed=7)
        ref = fused_moe_reference(hidden, slot_ids, weights, w13, w2, compute_dtype=torch.float32)
        gemv = fused_moe_gemv(hidden, slot_ids, weights, w13, w2, GemvConfig(8, 512))
        assert rel_err(gemv, ref) <= 1e-2
        config = default_config(max(num_tokens, 1024), 8, 128)
        assert isinstance(config, AlignedConfig)
        tma = AlignedConfig(TmaGemmConfig(64, 128, 64, 8, 4, 3), TmaGemmConfig(64, 128, 64, 8, 4, 3))
        split = AlignedConfig(SplitTmaGemmConfig(128, 128, 64, 8, 8, 3),
                              SplitTmaGemmConfig(128, 256, 64, 8, 8, 3))
        for cfg in (config, tma, split, AlignedConfig(GemmConfig(16, 64, 128), GemmConfig(16, 64, 128))):
            assert rel_err(fused_moe_aligned(hidden, slot_ids, weights, w13, w2, cfg), ref) <= 1e-2


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_triton_runner_replays_from_a_cuda_graph(num_tokens):
    from epserve.moe_runner import make_moe_runner
    from epserve.kernels.fused_moe import fused_moe_reference
    runner = make_moe_runner("triton", "cuda")
    static = list(gpu_problem(QWEN3, num_tokens, seed=1))
    runner.run(*static)                                         # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runner.run(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = runner.run(*static)
    fresh = gpu_problem(QWEN3, num_tokens, seed=2)
    for dst, src in zip(static[:3], fresh[:3]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref = fused_moe_reference(*static, compute_dtype=torch.float32)
    assert rel_err(out, ref) <= 1e-2


def test_routing_kernels_real_shapes():
    from epserve.kernels.grouped_topk import grouped_topk, grouped_topk_reference
    from epserve.kernels.topk_softmax import softmax_topk_renorm, softmax_topk_renorm_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1024, 128, device="cuda", generator=g)
    w, ids = softmax_topk_renorm(logits, 8)
    rw, rids = softmax_topk_renorm_reference(logits, 8)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    logits = torch.randn(1024, 256, device="cuda", generator=g)
    bias = torch.randn(256, device="cuda", generator=g) * 0.1
    w, ids = grouped_topk(logits, bias, 8, 8, 4, 2.5)
    rw, rids = grouped_topk_reference(logits, bias, 8, 8, 4, 2.5)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_pdl_launches_change_no_bits(num_tokens):
    """Programmatic dependent launch (the default on Hopper) against plain launches, eagerly
    and replayed from a CUDA graph: the same bits."""
    from epserve.moe_runner import make_moe_runner
    from epserve.kernels import pdl
    assert pdl.enabled(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    runner = make_moe_runner("triton", "cuda")
    problem = gpu_problem(QWEN3, num_tokens, seed=3)
    with pdl.disabled():
        plain = runner.run(*problem)
    eager = runner.run(*problem)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runner.run(*problem)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = runner.run(*problem)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, plain) and torch.equal(captured, plain)
