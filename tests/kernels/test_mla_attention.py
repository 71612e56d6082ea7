"""MLA decode (split-KV, adapted per row), prefill and latent-store kernels against float64 references.

Small odd shapes (heads fewer and more than a head block, rotary widths below and off a power of 2),
float32 and float16, small tiles so contexts span several key tiles, splits and block boundaries
(CPU: the Triton interpreter; with CUDA: compiled). GPU only (marked): bf16 at DeepSeek-V3's attention
shape (H = 128, C = 512, Dr = 64) and a decode replayed from a CUDA graph after its inputs change.
"""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import TOLERANCE, rel_err
from epserve.kernels.paged_attention import DecodeWorkspace
from epserve.kernels.mla_attention import (MlaDecodeConfig, MlaPrefillConfig, mla_decode_attention,
                                           mla_decode_attention_reference, mla_decode_num_splits,
                                           mla_prefill_attention, mla_prefill_attention_reference)
from epserve.kernels.mla_store import mla_store_latent, mla_store_latent_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (H, C, Dr, Bs): H under one 16-head block, over one (a partial second block); Dr 8 (padded to 16), 24 (to 32)
SHAPES = [(4, 32, 8, 4), (19, 16, 24, 16), (2, 16, 16, 4)]
DTYPES = [torch.float32, torch.float16]
SMALL_DECODE = MlaDecodeConfig(block_n=16)
SMALL_PREFILL = MlaPrefillConfig(block_m=16, block_n=16)
UNUSED_ENTRY = 2 ** 31 - 1          # table entries past a sequence's blocks: fault if read


def make_tables(contexts: list[int], block_size: int, num_blocks: int, width: int, device: str, seed: int):
    """[B, width] int32: distinct shuffled blocks per sequence; unused entries alternate -1 and huge."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.empty(len(contexts), width, dtype=torch.int32)
    for b, context in enumerate(contexts):
        used = -(-context // block_size)
        tables[b] = torch.tensor([free.pop() if i < used else (-1 if i % 2 else UNUSED_ENTRY)
                                  for i in range(width)], dtype=torch.int32)
    return tables.to(device)


def make_case(shape, dtype, num_queries, contexts, device=DEVICE, seed=0):
    """(q [num_queries, H, C + Dr], cache, tables, context_lens, scale)."""
    num_heads, latent, rope, block_size = shape
    width = max(-(-c // block_size) for c in contexts) + 2
    num_blocks = len(contexts) * width
    g = torch.Generator(device=device).manual_seed(seed)
    cache = torch.randn(num_blocks, block_size, latent + rope, generator=g, device=device).to(dtype)
    q = torch.randn(num_queries, num_heads, latent + rope, generator=g, device=device).to(dtype)
    tables = make_tables(contexts, block_size, num_blocks, width, device, seed)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    return q, cache, tables, context_lens, (latent + rope) ** -0.5


def as_double(*tensors):
    return [t.double() for t in tensors]


CONTEXTS = [1, 5, 17, 33, 0, 70, 16]        # 0: a CUDA-graph padding row; 16: exactly one block / tile


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(shape, dtype):
    latent = shape[1]
    q, cache, tables, context_lens, scale = make_case(shape, dtype, len(CONTEXTS), CONTEXTS)
    ref = mla_decode_attention_reference(*as_double(q, cache), tables, context_lens, scale, latent)
    # S = 1; rows split by context (16 keys a split); every row 3 ways (C = 5: two empty splits)
    for num_splits, per_split in ((1, None), (3, 16), (3, 1)):
        out = mla_decode_attention(q, cache, tables, context_lens, scale, num_splits, latent, config=SMALL_DECODE,
                                   tokens_per_split=per_split)
        assert out.dtype == dtype and out.shape == (len(CONTEXTS), shape[0], latent)
        assert rel_err(out, ref) < TOLERANCE[dtype], f"num_splits={num_splits} tokens_per_split={per_split}"
        assert torch.equal(out[4], torch.zeros_like(out[4])), "context 0 must give zeros"


def test_decode_default_tiles_many_splits_and_a_static_workspace():
    """Default tiles; 10 splits through a workspace sized for a larger batch, starting as NaN (rows of
    one split must neither read nor need it)."""
    shape = (4, 32, 8, 16)
    contexts = [200, 0, 3, 130]
    q, cache, tables, context_lens, scale = make_case(shape, torch.float32, 4, contexts, seed=3)
    ref = mla_decode_attention_reference(*as_double(q, cache), tables, context_lens, scale, 32)
    assert rel_err(mla_decode_attention(q, cache, tables, context_lens, scale, 1, 32), ref) < 1e-5
    workspace = DecodeWorkspace.allocate(8, 4, 10, 32, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    for per_split in (64, 1):
        out = torch.full((4, 4, 32), float("nan"), device=DEVICE)
        mla_decode_attention(q, cache, tables, context_lens, scale, 10, 32, out=out, workspace=workspace,
                             tokens_per_split=per_split)
        assert rel_err(out, ref) < 1e-5 and torch.equal(out[1], torch.zeros_like(out[1])), per_split


# q_lens: decode rows (1), a fresh prompt (16: one block at Bs 16), short prompts, a q_len-0 sequence, and
# chunks continuing a prompt (5 new tokens after 15 cached, 16 after 24: across a block boundary)
Q_LENS = [1, 3, 16, 0, 5, 16, 1]
PREFILL_CONTEXTS = [17, 3, 16, 9, 20, 40, 1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(shape, dtype):
    latent = shape[1]
    q, cache, tables, context_lens, scale = make_case(shape, dtype, sum(Q_LENS), PREFILL_CONTEXTS)
    starts = torch.tensor([0] + Q_LENS, device=DEVICE).cumsum(0).to(torch.int32)
    ref = mla_prefill_attention_reference(*as_double(q, cache), tables, starts, context_lens, scale, latent)
    out = mla_prefill_attention(q, cache, tables, starts, context_lens, max(Q_LENS), scale, latent,
                                config=SMALL_PREFILL)
    assert out.dtype == dtype and out.shape == (sum(Q_LENS), shape[0], latent)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_prefill_default_tiles_long_runs():
    """Default tiles: unmasked key tiles before each query block, several query blocks a sequence."""
    shape = (4, 16, 8, 16)
    q_lens, contexts = [70, 1, 0, 33], [70, 100, 5, 133]
    q, cache, tables, context_lens, scale = make_case(shape, torch.float32, sum(q_lens), contexts, seed=4)
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    ref = mla_prefill_attention_reference(*as_double(q, cache), tables, starts, context_lens, scale, 16)
    out = mla_prefill_attention(q, cache, tables, starts, context_lens, max(q_lens), scale, 16)
    assert rel_err(out, ref) < 1e-5


def test_prefill_rows_of_q_len_1_equal_decode():
    shape = (19, 16, 24, 4)
    contexts = [1, 5, 17, 33, 70]
    q, cache, tables, context_lens, scale = make_case(shape, torch.float32, len(contexts), contexts, seed=2)
    starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=DEVICE)
    prefill = mla_prefill_attention(q, cache, tables, starts, context_lens, 1, scale, 16, config=SMALL_PREFILL)
    decode = mla_decode_attention(q, cache, tables, context_lens, scale, 1, 16, config=SMALL_DECODE)
    torch.testing.assert_close(prefill, decode, rtol=1e-6, atol=1e-6)


def test_kernels_read_strided_q_and_write_strided_out():
    """q and out as [T, H, ·] views of [H, T, ·] buffers (the GPU backend's layout around its bmm)."""
    shape = (4, 32, 8, 4)
    contexts = [9, 40]
    q, cache, tables, context_lens, scale = make_case(shape, torch.float32, 2, contexts, seed=5)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    out_buf = torch.zeros(4, 2, 32, device=DEVICE)
    out = mla_decode_attention(q_t, cache, tables, context_lens, scale, 2, 32, out=out_buf.transpose(0, 1),
                               config=SMALL_DECODE, tokens_per_split=16)
    ref = mla_decode_attention_reference(*as_double(q, cache), tables, context_lens, scale, 32)
    assert rel_err(out, ref) < 1e-5 and rel_err(out_buf.transpose(0, 1), ref) < 1e-5
    starts = torch.arange(3, dtype=torch.int32, device=DEVICE)
    out_buf.zero_()
    mla_prefill_attention(q_t, cache, tables, starts, context_lens, 1, scale, 32, out=out_buf.transpose(0, 1),
                          config=SMALL_PREFILL)
    assert rel_err(out_buf.transpose(0, 1), ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_latent_skips_padding_rows(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    latent = torch.randn(5, 32, generator=g, device=DEVICE).to(dtype)
    k_rope = torch.randn(5, 24, generator=g, device=DEVICE).to(dtype)
    slots = torch.tensor([7, -1, 0, 30, -1], device=DEVICE)
    cache = torch.full((8, 4, 56), 3.0, device=DEVICE).to(dtype)
    want = cache.clone()
    mla_store_latent(latent, k_rope, cache, slots)
    mla_store_latent_reference(latent, k_rope, want, slots)
    assert torch.equal(cache, want)
    assert (cache.view(-1, 56) == 3.0).all(dim=1).sum() == 32 - 3            # the other slots untouched


def test_wrappers_reject_bad_inputs():
    q, cache, tables, context_lens, scale = make_case((4, 32, 8, 4), torch.float32, 2, [3, 4])
    with pytest.raises(AssertionError, match="dtypes differ"):
        mla_decode_attention(q.half(), cache, tables, context_lens, scale, 1, 32)
    with pytest.raises(AssertionError, match="int32"):
        mla_decode_attention(q, cache, tables.long(), context_lens, scale, 1, 32)
    with pytest.raises(AssertionError, match="power of 2"):
        mla_decode_attention(q, cache, tables, context_lens, scale, 1, 24)
    with pytest.raises(AssertionError, match="workspace"):
        mla_decode_attention(q, cache, tables, context_lens, scale, 2, 32,
                             workspace=DecodeWorkspace.allocate(2, 4, 3, 32, DEVICE))
    with pytest.raises(AssertionError, match="query_start_loc"):
        mla_prefill_attention(q, cache, tables, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                              context_lens, 1, scale, 32)


def test_decode_split_policy_counts_head_blocks():
    """DeepSeek-V3's 128 heads in blocks of 16 split like 8 KV heads (132 SMs)."""
    from epserve.kernels.paged_attention import DecodeConfig, decode_num_splits

    for batch in (1, 8, 32, 128):
        assert mla_decode_num_splits(batch, 128, 4096, 132) == \
            decode_num_splits(batch, 8, 4096, 132, DecodeConfig(block_n=32))
    assert mla_decode_num_splits(1, 4, 4096, 132, MlaDecodeConfig(block_h=16)) == \
        decode_num_splits(1, 1, 4096, 132, DecodeConfig(block_n=32))


# ---- GPU: bf16 at DeepSeek-V3's attention shape ------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEEPSEEK_V3 = (128, 512, 64, 16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits,per_split", [(1, None), (4, None), (32, None), (16, 64)])
def test_decode_bf16_real_shape(num_splits, per_split):
    contexts = [1, 17, 300, 1024, 4096, 0, 2049, 16]
    q, cache, tables, context_lens, scale = make_case(DEEPSEEK_V3, torch.bfloat16, len(contexts), contexts, "cuda")
    ref = mla_decode_attention_reference(q, cache, tables, context_lens, scale, 512, torch.float32)
    out = mla_decode_attention(q, cache, tables, context_lens, scale, num_splits, 512, tokens_per_split=per_split)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[5], torch.zeros_like(out[5]))


@pytest.mark.gpu
@requires_cuda
def test_prefill_bf16_real_shape():
    q_lens, contexts = [1024, 1, 300, 0, 37, 1], [1024, 3000, 1700, 12, 37, 1]
    q, cache, tables, context_lens, scale = make_case(DEEPSEEK_V3, torch.bfloat16, sum(q_lens), contexts, "cuda")
    starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    ref = mla_prefill_attention_reference(q, cache, tables, starts, context_lens, scale, 512, torch.float32)
    out = mla_prefill_attention(q, cache, tables, starts, context_lens, max(q_lens), scale, 512)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_graph_replay_after_in_place_updates_equals_eager(num_splits):
    q, cache, tables, context_lens, scale = make_case(DEEPSEEK_V3, torch.bfloat16, 4, [4096] * 4, "cuda", seed=1)
    context_lens.copy_(torch.tensor([100, 4000, 0, 1]))
    workspace = DecodeWorkspace.allocate(4, 128, num_splits, 512, "cuda")
    out = q.new_empty(4, 128, 512)

    def run():
        mla_decode_attention(q, cache, tables, context_lens, scale, num_splits, 512, out=out, workspace=workspace)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()                                                          # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    q.copy_(torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9)))
    tables.copy_(tables.roll(1, dims=0))
    context_lens.copy_(torch.tensor([3000, 7, 4096, 0]))
    graph.replay()
    torch.cuda.synchronize()
    eager = mla_decode_attention(q, cache, tables, context_lens, scale, num_splits, 512)
    assert torch.equal(out, eager)
    ref = mla_decode_attention_reference(q, cache, tables, context_lens, scale, 512, torch.float32)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[3], torch.zeros_like(out[3]))
