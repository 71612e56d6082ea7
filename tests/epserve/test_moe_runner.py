"""MoE runner backends: selection, explicit-backend errors, guardrails, parity with torch."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

from epserve.moe_runner import available_backends, make_moe_runner

HAS_CUDA = torch.cuda.is_available()


def small_problem(num_tokens=5, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(num_tokens)
    slots, dim, inter, top_k = 6, 24, 20, 3
    hidden = torch.randn(num_tokens, dim, generator=g).to(dtype)
    w13 = (torch.randn(slots, 2 * inter, dim, generator=g) / dim ** 0.5).to(dtype)
    w2 = (torch.randn(slots, dim, inter, generator=g) / inter ** 0.5).to(dtype)
    slot_ids = torch.rand(num_tokens, slots, generator=g).topk(top_k, dim=1).indices.to(torch.int32)
    slot_ids[0, 1] = -1
    weights = torch.rand(num_tokens, top_k, generator=g)
    return tuple(t.to(device) for t in (hidden, slot_ids, weights, w13, w2))


def test_backends_are_registered():
    assert {"torch", "triton", "deep_gemm", "flashinfer_cutlass"} <= set(available_backends())


def test_auto_on_cpu_is_torch():
    assert make_moe_runner("auto", "cpu").name == "torch"


def test_unknown_backend_fails():
    with pytest.raises(ValueError, match="unknown --moe-runner-backend"):
        make_moe_runner("cublas_magic")


def test_explicit_triton_without_cuda_names_cuda(monkeypatch):
    # Triton settles interpreter mode when first imported: import it before the variable goes away,
    # or the kernels a later test defines are compiled-mode ones the interpreter cannot call.
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        make_moe_runner("triton", "cpu")


def test_explicit_triton_without_triton_names_triton(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    with pytest.raises(ImportError, match="triton"):
        make_moe_runner("triton", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only: the interpreter path")
def test_triton_interpreter_matches_torch():
    hidden, slot_ids, weights, w13, w2 = small_problem(7)
    runner = make_moe_runner("triton", "cpu")
    assert runner.name == "triton"
    ref = make_moe_runner("torch").run(hidden, slot_ids, weights, w13, w2)
    out = runner.run(hidden, slot_ids, weights, w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_deep_gemm_missing_library_names_it():
    try:
        import deep_gemm  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="deep_gemm"):
            make_moe_runner("deep_gemm", "cuda")
    else:
        pytest.skip("deep_gemm is importable here")


@pytest.mark.parametrize("quantization,ep_size,tp_size,match", [
    (None, 1, 1, "modelopt_fp4"),
    ("fp8_blockwise_nonsense", 1, 1, "modelopt_fp4"),
    ("modelopt_fp4", 2, 4, "--ep-size 1 or equal to --tp-size"),
    ("fp8", 2, 2, "needs --ep-size 1"),
])
def test_flashinfer_cutlass_guardrails(quantization, ep_size, tp_size, match):
    with pytest.raises(ValueError, match=match):
        make_moe_runner("flashinfer_cutlass", "cuda", ep_size=ep_size, tp_size=tp_size,
                        quantization=quantization)


@pytest.mark.parametrize("quantization,ep_size,tp_size", [("modelopt_fp4", 1, 4), ("modelopt_fp4", 4, 4),
                                                          ("fp8", 1, 8)])
def test_flashinfer_cutlass_valid_flags_then_says_what_is_missing(quantization, ep_size, tp_size):
    with pytest.raises((ImportError, NotImplementedError), match="flashinfer"):
        make_moe_runner("flashinfer_cutlass", "cuda", ep_size=ep_size, tp_size=tp_size,
                        quantization=quantization)


def test_bad_parallel_sizes():
    with pytest.raises(ValueError, match="ep_size"):
        make_moe_runner("torch", ep_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 5, 200])
def test_triton_matches_torch_on_gpu(num_tokens):
    assert make_moe_runner("auto", "cuda").name == "triton"
    problem = small_problem(num_tokens, torch.bfloat16, "cuda")
    ref = make_moe_runner("torch").run(*problem).float()
    out = make_moe_runner("triton", "cuda").run(*problem).float()
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [3, 300])
def test_deep_gemm_matches_torch_on_gpu(num_tokens):
    try:
        runner = make_moe_runner("deep_gemm", "cuda")
    except ImportError as e:
        pytest.skip(str(e))
    g = torch.Generator(device="cuda").manual_seed(0)
    slots, dim, inter = 8, 512, 256
    hidden = torch.randn(num_tokens, dim, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(slots, 2 * inter, dim, device="cuda", generator=g) / dim ** 0.5).bfloat16()
    w2 = (torch.randn(slots, dim, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    slot_ids = torch.rand(num_tokens, slots, device="cuda", generator=g).topk(4, dim=1).indices.int()
    slot_ids[::3, 0] = -1
    weights = torch.rand(num_tokens, 4, device="cuda", generator=g)
    ref = make_moe_runner("torch").run(hidden, slot_ids, weights, w13, w2).float()
    out = runner.run(hidden, slot_ids, weights, w13, w2).float()
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-2
