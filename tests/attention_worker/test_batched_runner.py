"""The batched GPU step runner (gpu_runner.py: device metadata, Triton attention, GPU sampling) against
the host runner, on the CPU under the Triton interpreter; CUDA graphs and bf16 on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 300, 42, 7], [9] * 23, [1, 2, 3], list(range(40, 77))]


def engine(model_dir, backend, dtype=torch.float32, device="cpu", **limits):
    options = dict(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                   attention_backend=backend)
    options.update(limits)
    return build_colocated_engine(str(model_dir), dtype, device, limits=EngineLimits(**options))


def test_batched_runner_greedy_equals_host_runner(tiny_model):
    """Ragged prompts, chunked prefill (budget 48 tokens) mixed with decodes, then pure decode steps."""
    want = generate_tokens(engine(tiny_model, "torch_native"), PROMPTS, GREEDY)
    batched = engine(tiny_model, "triton")
    assert type(batched.runner).__name__ == "GpuStepRunner"
    assert generate_tokens(batched, PROMPTS, GREEDY) == want


def test_one_sequence_decodes_through_the_fused_attention_input(tiny_model, monkeypatch):
    """A lone sequence's decode steps take the one-launch attention input (``attend_from_residual``:
    residual add, norm, QKV, q/k norm, RoPE, cache store); its greedy tokens are the host runner's."""
    from epserve.attention_worker.attention_triton import TritonPagedAttention

    used = []
    fused = TritonPagedAttention.attend_from_residual

    def recorded(self, *args):
        out = fused(self, *args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(TritonPagedAttention, "attend_from_residual", recorded)
    want = generate_tokens(engine(tiny_model, "torch_native"), PROMPTS[:1], GREEDY)
    assert generate_tokens(engine(tiny_model, "triton"), PROMPTS[:1], GREEDY) == want
    assert any(used) and not all(used)              # decode steps fused, the prompt's step composed


def test_batched_runner_survives_preemption_and_reuses_rows(tiny_model):
    """A KV cache too small for every sequence at once: sequences are preempted and recomputed with
    new blocks; their device block-table rows must follow. Rows are all free at the end."""
    want = generate_tokens(engine(tiny_model, "torch_native"), PROMPTS, GREEDY)
    small = engine(tiny_model, "triton", num_kv_blocks=20)
    assert generate_tokens(small, PROMPTS, GREEDY) == want
    assert small.scheduler.num_preemptions > 0
    assert len(small.runner._free_rows) == small.runner.num_rows


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model, monkeypatch):
    from epserve.kernels import sampling

    monkeypatch.setattr(sampling, "GATHER", 32)      # the interpreter sorts slowly (as test_sampling.py does)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=1234,
                            max_new_tokens=3, ignore_eos=True)
    alone = generate_tokens(engine(tiny_model, "triton"), [PROMPTS[0]], params)[0]
    crowded = generate_tokens(engine(tiny_model, "triton"), [PROMPTS[2], PROMPTS[0], PROMPTS[1]], params)
    assert crowded[1] == alone
    other_seed = SamplingParams(**{**params.__dict__, "seed": 99})
    assert generate_tokens(engine(tiny_model, "triton"), [PROMPTS[0]], other_seed)[0] != alone


def test_triton_backend_without_cuda_or_interpreter_names_the_fix(tiny_model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--attention-backend triton needs a CUDA device"):
        engine(tiny_model, "triton")


def test_flashinfer_backend_says_it_is_not_built():
    with pytest.raises(ValueError, match="flashinfer is not built"):
        EngineLimits(attention_backend="flashinfer")
