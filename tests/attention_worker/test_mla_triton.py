"""The GPU MLA backend (attention_mla_triton.py: RoPE, the latent store and the absorbed-form Triton kernels)
against the CPU backend (attention_mla.py), and the batched GPU runner serving DeepSeek-V3/V2 against the host
runner — on the CPU under the Triton interpreter, float32."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from epserve.attention_worker.attention_mla import TorchMlaAttention
from epserve.attention_worker.attention_mla_triton import TritonMlaAttention
from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.mla_kv_cache import MlaKVCache
from epserve.model_config import load_model_spec
from epserve.models.decoder import ForwardBatch
from epserve.sampling import SamplingParams

# CPU tensors through the Triton kernels: the interpreter (conftest.py sets it without CUDA); a GPU runs
# test_gpu_deepseek.py
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")

# as test_deepseek_parity.py: 3 layers (the first dense), 16 experts, top-4, 4 heads; C = 32, Dr = 8
OPTIONS = dict(num_layers=3, num_experts=16, top_k=4, hidden_size=64, moe_intermediate_size=32,
               num_attention_heads=4, head_dim=16)
BLOCK_SIZE = 4


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def deepseek_model(tiny_model_factory, request):
    return tiny_model_factory(seed=0, arch=request.param, **OPTIONS)


def step(cached: list[int], new: list[int], tables: list[list[int]], decode: bool, num_splits: int = 1,
         padding_rows: int = 0) -> ForwardBatch:
    """A step of len(new) sequences, new[b] tokens after cached[b], then ``padding_rows`` CUDA-graph
    padding rows (one token each, slot -1, context 0, the last table)."""
    positions = [p for c, n in zip(cached, new) for p in range(c, c + n)] + [0] * padding_rows
    slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for t, c, n in zip(tables, cached, new) for p in range(c, c + n)] + [-1] * padding_rows
    contexts = [c + n for c, n in zip(cached, new)]
    rows = tables[:len(new)] + tables[-1:] * padding_rows
    width = max(len(t) for t in rows) + 1
    meta = GpuAttentionMetadata(
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in rows], dtype=torch.int32),
        context_lens=torch.tensor(contexts + [0] * padding_rows, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + new + [1] * padding_rows).cumsum(0).to(torch.int32),
        max_query_len=max(new), decode=decode, num_splits=num_splits)
    return ForwardBatch(torch.zeros(len(positions), dtype=torch.long), torch.tensor(positions), new, contexts,
                        tables[:len(new)], torch.tensor(slots), device=meta)


def layer_inputs(spec, num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mla, heads = spec.mla, spec.num_attention_heads
    return (torch.randn(num_tokens, heads, mla.qk_head_dim, generator=g),
            torch.randn(num_tokens, mla.kv_lora_rank, generator=g),
            torch.randn(num_tokens, mla.qk_rope_head_dim, generator=g),
            torch.randn(heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank, generator=g) / 6)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_backend_equals_the_cpu_backend(deepseek_model):
    """A prefill of two prompts, then a mixed step (a chunk continuing a prompt across a block boundary, a
    fresh prompt, a decode row), then a decode step split 3 ways with a padding row: the same outputs as
    TorchMlaAttention (YaRN; V3's interleaved and V2's complex rotary), and the same caches."""
    spec = load_model_spec(deepseek_model)
    mla = spec.mla
    caches = [MlaKVCache(1, 16, BLOCK_SIZE, mla.kv_lora_rank, mla.qk_rope_head_dim, torch.float32) for _ in range(2)]
    gpu, cpu = TritonMlaAttention(caches[0], spec), TorchMlaAttention(caches[1], spec)
    tables = [[3, 7, 1], [0, 12], [5, 9, 2, 14]]
    steps = [step([0, 0], [6, 5], tables[:2], decode=False),
             step([6, 5, 0], [4, 1, 9], tables, decode=False),
             step([10, 6, 9], [1, 1, 1], tables + [[15]], decode=True, num_splits=3, padding_rows=1)]
    for index, batch in enumerate(steps):
        q, latent, k_rope, kv_b_proj = layer_inputs(spec, batch.num_tokens, seed=index)
        got = gpu.forward(0, q, latent, k_rope, kv_b_proj, batch)
        assert got.shape == (batch.num_tokens, spec.num_attention_heads * mla.v_head_dim)
        real = sum(batch.seq_lens)                                       # rows past it: padding
        host = ForwardBatch(batch.input_ids[:real], batch.positions[:real], batch.seq_lens, batch.context_lens,
                            batch.block_tables, batch.slot_mapping[:real])
        want = cpu.forward(0, q[:real], latent[:real], k_rope[:real], kv_b_proj, host)
        assert relative_error(got[:real], want) < 1e-5, f"step {index}"
        torch.testing.assert_close(caches[0].kv[0], caches[1].kv[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[real:], torch.zeros_like(got[real:])), "a padding row attends to nothing"
    assert not caches[0].kv[0][15].any(), "a padding row stores nothing"


def test_backend_refuses_a_latent_width_the_kernels_do_not_take():
    mla = SimpleNamespace(kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, qk_head_dim=16,
                          rope_style="interleave")
    spec = SimpleNamespace(mla=mla, architecture="DeepseekV3ForCausalLM", num_attention_heads=2, rope_theta=1e4,
                           rope_scaling=None)
    cache = MlaKVCache(1, 4, BLOCK_SIZE, 24, 8, torch.float32)
    with pytest.raises(ValueError, match="kv_lora_rank 24 is not a power of 2.*--attention-backend torch_native"):
        TritonMlaAttention(cache, spec)


def engine(model_dir, backend, **limits):
    options = dict(num_kv_blocks=64, kv_block_size=BLOCK_SIZE, max_num_batched_tokens=48, max_num_seqs=8,
                   attention_backend=backend)
    options.update(limits)
    return build_colocated_engine(str(model_dir), torch.float32, limits=EngineLimits(**options))


def test_batched_runner_greedy_equals_host_runner(deepseek_model):
    """Ragged prompts, chunked prefill (budget 48 tokens) mixed with decodes, then pure decode steps."""
    prompts = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 77))]
    greedy = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    batched = engine(deepseek_model, "triton")
    assert type(batched.runner).__name__ == "GpuStepRunner"
    assert type(batched.runner.attention).__name__ == "TritonMlaAttention"
    assert generate_tokens(batched, prompts, greedy) == generate_tokens(engine(deepseek_model, "torch_native"),
                                                                       prompts, greedy)
