"""GPT-OSS on the batched GPU runner (skipped without CUDA): attention sinks, the 8-position window of the
even layers and YaRN through the Triton backend (attention_sinks_triton.py), parity with transformers as the
Qwen3 GPU tests check it. GPT-OSS's experts run on the torch MoE runner only, which syncs with the host, so
decode steps run eager (no CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.attention_sinks import TorchSinkAttention
from epserve.attention_worker.attention_sinks_triton import TritonSinkAttention
from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.colocated import build_colocated_engine
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.model_config import load_model_spec
from epserve.models.decoder import ForwardBatch
from family_parity import OPTIONS
from test_gpu_engine import (PROMPTS, assert_greedy_matches, assert_prompt_logits_match, prompt_logits,
                             transformers_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")
# Compiled on a GPU the Triton sink backend's logits are 0.1–0.3 off transformers' (exact under the
# interpreter): the engine refuses it there unless EPSERVE_GPT_OSS_TRITON=1 (model_family.py). These tests
# run it anyway and are expected to fail until the cause is found; strict: a pass says it is fixed.
KNOWN_GPU_MISMATCH = pytest.mark.xfail(strict=True, reason="GPT-OSS's Triton backend differs on a GPU "
                                                            "(bench/gpu/diag_gpt_oss.py); cause not found yet")


@pytest.fixture(autouse=True)
def _allow_the_triton_sink_backend(monkeypatch):
    monkeypatch.setenv("EPSERVE_GPT_OSS_TRITON", "1")


@pytest.fixture(scope="module")
def gpt_oss_model(tiny_model_factory):
    return tiny_model_factory(seed=0, arch="gpt_oss", **OPTIONS)


@pytest.fixture(scope="module")
def hf(gpt_oss_model):
    return transformers_reference(gpt_oss_model)


def gpu_engine(model_dir, dtype, **limits):
    options = dict(num_kv_blocks=256, kv_block_size=16, max_num_batched_tokens=512, max_num_seqs=16,
                   num_micro_batches=1, cuda_graph_max_bs=16)
    options.update(limits)
    return build_colocated_engine(str(model_dir), dtype, "cuda", moe_runner_backend="torch",
                                  limits=EngineLimits(**options))


def test_the_runner_uses_the_sink_kernels(gpt_oss_model):
    engine = gpu_engine(gpt_oss_model, torch.bfloat16)
    assert type(engine.runner).__name__ == "GpuStepRunner"
    assert type(engine.runner.attention).__name__ == "TritonSinkAttention"
    assert engine.runner.attention.windows == [8, None, 8]
    assert engine.runner.graphs is None                      # the torch MoE runner is not capturable
    assert engine.kv_cache.k[0].device.type == "cuda"


def test_backend_equals_the_cpu_backend_on_the_gpu(gpt_oss_model):
    """Where the engine's logits part (diagnosis): the Triton sink backend compiled on the GPU against the CPU
    backend's torch ops on the same GPU tensors, for the prefill the parity tests run (four fresh prompts of
    18, 8, 19, 13 tokens, 16-token blocks) in a windowed and a full layer, float32."""
    spec = load_model_spec(gpt_oss_model)
    heads, kv_heads, head_dim, block = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, 16
    caches = [PagedKVCache(2, 16, block, kv_heads, head_dim, torch.float32, "cuda") for _ in range(2)]
    gpu, cpu = TritonSinkAttention(caches[0], spec), TorchSinkAttention(caches[1], spec)
    lens, tables = [18, 8, 19, 13], [[3, 7], [0], [5, 9], [12]]
    positions = [p for n in lens for p in range(n)]
    slots = [t[p // block] * block + p % block for t, n in zip(tables, lens) for p in range(n)]
    meta = GpuAttentionMetadata(
        block_tables=torch.tensor([t + [0] * (2 - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32),
        max_query_len=max(lens), decode=False)
    batch = ForwardBatch(torch.zeros(len(positions), dtype=torch.long, device="cuda"),
                         torch.tensor(positions, device="cuda"), lens, lens, tables,
                         torch.tensor(slots, device="cuda"), device=meta)
    g = torch.Generator().manual_seed(0)
    sinks = (torch.randn(heads, generator=g) * 2).cuda()
    for layer in (0, 1):
        qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * head_dim, generator=g).cuda()
        got, want = gpu.forward(layer, qkv, sinks, batch), cpu.forward(layer, qkv, sinks, batch)
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        torch.testing.assert_close(caches[0].v[layer], caches[1].v[layer], rtol=0, atol=0, msg=f"v, layer {layer}")
        torch.testing.assert_close(caches[0].k[layer], caches[1].k[layer], rtol=1e-5, atol=1e-5,
                                   msg=f"k, layer {layer}")
        assert rel < 1e-5, f"layer {layer}: relative error {rel:.3e}"


@KNOWN_GPU_MISMATCH
def test_float32_ragged_logits_match_transformers(gpt_oss_model, hf):
    assert_prompt_logits_match(gpu_engine(gpt_oss_model, torch.float32), hf)


@KNOWN_GPU_MISMATCH
@pytest.mark.parametrize("budget", [512, 8])
def test_float32_greedy_matches_transformers(gpt_oss_model, hf, budget):
    """Prefill whole or in chunks of 8 tokens, then 16 decode steps (split-KV with sinks, past the window)."""
    assert_greedy_matches(gpu_engine(gpt_oss_model, torch.float32, max_num_batched_tokens=budget), hf)


@KNOWN_GPU_MISMATCH
def test_bf16_logits_near_float32(gpt_oss_model, hf):
    _, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    bf16 = prompt_logits(gpu_engine(gpt_oss_model, torch.bfloat16), ids)
    fp32 = prompt_logits(gpu_engine(gpt_oss_model, torch.float32), ids)
    for got, want in zip(bf16, fp32):
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel <= 5e-2, f"relative error {rel:.3e}"


def test_refused_on_a_gpu_without_the_opt_in(gpt_oss_model, monkeypatch):
    monkeypatch.delenv("EPSERVE_GPT_OSS_TRITON")
    with pytest.raises(ValueError, match="--attention-backend torch_native"):
        gpu_engine(gpt_oss_model, torch.bfloat16)
