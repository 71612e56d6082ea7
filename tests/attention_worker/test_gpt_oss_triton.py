"""GPT-OSS's GPU attention backend (attention_sinks_triton.py: YaRN RoPE in the fused store, sinks and
per-layer windows in the paged kernels) against the CPU backend (attention_sinks.py), and the batched GPU
runner serving a tiny GPT-OSS against the host runner — on the CPU under the Triton interpreter, float32."""

from __future__ import annotations

import os

import pytest
import torch

from epserve.attention_worker.attention_sinks import TorchSinkAttention
from epserve.attention_worker.attention_sinks_triton import TritonSinkAttention
from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import load_model_spec
from epserve.models.decoder import ForwardBatch
from epserve.sampling import SamplingParams
from family_parity import OPTIONS
from test_mla_triton import BLOCK_SIZE, relative_error, step

# CPU tensors through the Triton kernels: the interpreter (conftest.py sets it without CUDA); a GPU runs
# test_gpu_gpt_oss.py
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")


@pytest.fixture(scope="module")
def gpt_oss_model(tiny_model_factory):
    """3 layers: 0 and 2 within an 8-position window, 1 over the whole context; YaRN; 4 heads over 2 KV heads."""
    return tiny_model_factory(seed=0, arch="gpt_oss", **OPTIONS)


def test_backend_equals_the_cpu_backend(gpt_oss_model):
    """A prefill of two prompts (one longer than the window), then a mixed step (a chunk continuing a
    prompt across the window's edge, a fresh prompt, a decode row), then a decode step split 3 ways with
    a padding row, in a windowed and a full layer: the same outputs as TorchSinkAttention, the same caches."""
    spec = load_model_spec(gpt_oss_model)
    assert spec.attention_window(0) == 8 and spec.attention_window(1) is None
    heads, kv_heads, head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    caches = [PagedKVCache(2, 16, BLOCK_SIZE, kv_heads, head_dim, torch.float32) for _ in range(2)]
    gpu, cpu = TritonSinkAttention(caches[0], spec), TorchSinkAttention(caches[1], spec)
    tables = [[3, 7, 1, 11], [0, 12], [5, 9, 2, 14]]
    steps = [step([0, 0], [10, 5], tables[:2], decode=False),
             step([10, 5, 0], [4, 1, 9], tables, decode=False),
             step([14, 6, 9], [1, 1, 1], tables + [[15]], decode=True, num_splits=3, padding_rows=1)]
    g = torch.Generator().manual_seed(0)
    sinks = torch.randn(heads, generator=g) * 2
    for index, batch in enumerate(steps):
        real = sum(batch.seq_lens)                                       # rows past it: padding
        host = ForwardBatch(batch.input_ids[:real], batch.positions[:real], batch.seq_lens, batch.context_lens,
                            batch.block_tables, batch.slot_mapping[:real])
        for layer in (0, 1):
            qkv = torch.randn(batch.num_tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
            got = gpu.forward(layer, qkv, sinks, batch)
            assert got.shape == (batch.num_tokens, heads * head_dim)
            want = cpu.forward(layer, qkv[:real], sinks, host)
            assert relative_error(got[:real], want) < 1e-5, f"step {index} layer {layer}"
            torch.testing.assert_close(caches[0].k[layer], caches[1].k[layer], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(caches[0].v[layer], caches[1].v[layer], rtol=0, atol=0)
    assert torch.equal(got[real:], torch.zeros_like(got[real:])), "a padding row attends to nothing"
    assert not caches[0].k[0][15].any(), "a padding row stores nothing"


def engine(model_dir, backend, **limits):
    options = dict(num_kv_blocks=64, kv_block_size=BLOCK_SIZE, max_num_batched_tokens=48, max_num_seqs=8,
                   attention_backend=backend)
    options.update(limits)
    return build_colocated_engine(str(model_dir), torch.float32, limits=EngineLimits(**options))


@pytest.mark.parametrize("budget", [48, 7])
def test_batched_runner_greedy_equals_host_runner(gpt_oss_model, budget):
    """Ragged prompts across the 8-position window, prefilled whole or in chunks of at most 7 tokens
    (mixed with decodes), then decode steps."""
    prompts = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 57))]
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    batched = engine(gpt_oss_model, "triton", max_num_batched_tokens=budget)
    assert type(batched.runner).__name__ == "GpuStepRunner"
    assert type(batched.runner.attention).__name__ == "TritonSinkAttention"
    host = engine(gpt_oss_model, "torch_native", max_num_batched_tokens=budget)
    assert generate_tokens(batched, prompts, greedy) == generate_tokens(host, prompts, greedy)
