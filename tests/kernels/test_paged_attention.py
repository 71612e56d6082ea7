"""Paged decode (split-KV, adapted per row) and prefill attention kernels against float64 references.

Small odd shapes, float32 and float16, small tiles so that contexts span several key tiles,
splits and query blocks, and every config the benchmark sweeps (CPU: the Triton interpreter;
with CUDA: compiled, on the GPU). GPU only (marked): bf16 at Qwen3's attention shape, and a
decode replayed from a CUDA graph after its inputs change in place.
"""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import TOLERANCE, rel_err
from epserve.kernels import paged_attention
from epserve.kernels.paged_attention import (DECODE_SWEEP, MERGES, DecodeConfig, DecodeWorkspace, decode_num_splits,
                                             decode_tokens_per_split, merge_heads, paged_decode_attention,
                                             paged_decode_attention_reference)
from epserve.kernels.paged_prefill import (PREFILL_SWEEP, PrefillConfig, paged_prefill_attention,
                                           paged_prefill_attention_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (H, Hkv, Dh, Bs): every value of each dimension appears; G = 2, 6 and 1
SHAPES = [(4, 2, 16, 4), (6, 1, 32, 16), (2, 2, 16, 16), (4, 2, 32, 16), (6, 1, 16, 4)]
DTYPES = [torch.float32, torch.float16]
SMALL_DECODE = DecodeConfig(block_n=16)
SMALL_PREFILL = PrefillConfig(block_m=16, block_n=16)
UNUSED_ENTRY = 2 ** 31 - 1          # table entries past a sequence's blocks: fault if read


def make_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: str = DEVICE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=g, device=device).to(dtype),
            torch.randn(shape, generator=g, device=device).to(dtype))


def make_tables(contexts: list[int], block_size: int, num_blocks: int, width: int, device: str = DEVICE,
                seed: int = 0) -> torch.Tensor:
    """[B, width] int32: distinct shuffled blocks per sequence; unused entries alternate -1 and huge."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.empty(len(contexts), width, dtype=torch.int32)
    for b, context in enumerate(contexts):
        used = -(-context // block_size)
        tables[b] = torch.tensor([free.pop() if i < used else (-1 if i % 2 else UNUSED_ENTRY)
                                  for i in range(width)], dtype=torch.int32)
    return tables.to(device)


def decode_case(shape, dtype, contexts, device=DEVICE, seed=0):
    num_heads, num_kv_heads, head_dim, block_size = shape
    width = max(-(-c // block_size) for c in contexts) + 2
    num_blocks = len(contexts) * width
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, seed)
    tables = make_tables(contexts, block_size, num_blocks, width, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    q = torch.randn(len(contexts), num_heads, head_dim, generator=g, device=device).to(dtype)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, context_lens, head_dim ** -0.5


def prefill_case(shape, dtype, q_lens, contexts, device=DEVICE, seed=0):
    _, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, contexts, device, seed)
    num_heads, _, head_dim, _ = shape
    g = torch.Generator(device=device).manual_seed(seed + 2)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g, device=device).to(dtype)
    starts = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, tables, starts, context_lens, scale


def as_double(*tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


CONTEXTS = [1, 5, 17, 33, 0, 70]        # 0: a CUDA-graph padding row


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(shape, dtype):
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, CONTEXTS)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    # S = 1; rows split by context (16 keys a split: 1, 1, 2, 3, 1, 3 splits); every row 3 ways
    # (tokens_per_split 1: C = 5 has one 16-key tile, so two of its splits are empty)
    for num_splits, per_split in ((1, None), (3, 16), (3, 1)):
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits,
                                     config=SMALL_DECODE, tokens_per_split=per_split)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, ref) < TOLERANCE[dtype], f"num_splits={num_splits} tokens_per_split={per_split}"
        assert torch.equal(out[4], torch.zeros_like(out[4])), "context 0 must give zeros"


def test_decode_default_tiles_many_splits_and_a_static_workspace():
    shape, dtype = (4, 2, 32, 16), torch.float32
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, [200, 0, 3, 130], seed=3)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    assert rel_err(paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 1), ref) < 1e-5
    # 20 splits: more than a merge step takes; rows split 4, 1, 1, 3 ways by context, or 20 (most empty)
    workspace = DecodeWorkspace.allocate(8, 4, 20, 32, DEVICE)          # sized for a larger batch
    for per_split in (64, 1):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 20, out=out, workspace=workspace,
                               tokens_per_split=per_split)
        assert rel_err(out, ref) < 1e-5 and torch.equal(out[1], torch.zeros_like(out[1])), per_split


@pytest.mark.parametrize("merge", MERGES)
def test_decode_merges_agree_and_the_fused_one_resets_its_counters(merge):
    """Rows of 1..13 splits, G = 6 heads a KV head (padded to 8 in the merge), merged by the last
    split or by the merge kernel; twice in a row, so the fused merge's counters must be back at 0."""
    shape, dtype = (12, 2, 16, 4), torch.float32
    contexts = [200, 1, 0, 64, 130]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, contexts, seed=21)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    config = DecodeConfig(block_n=16, merge=merge)
    for _ in range(2):
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 13, config=config,
                                     tokens_per_split=16)
        assert rel_err(out, ref) < 1e-5
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        if merge == "fused":
            assert int(paged_attention._counters(q.device, 1).count_nonzero()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_adaptive_splits_and_rows_of_one_split_bypass_the_workspace(dtype):
    """S = 8, 16 keys a split: contexts 1, 5, 64, 200, 0 split 1, 1, 4, 8 (13 capped), 1 ways.
    The workspace starts as NaN: rows of one split must not read it (nor write it), and a row
    of 4 splits must not read its splits 4..7."""
    shape = (6, 2, 16, 4)
    contexts = [1, 5, 64, 200, 0]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, contexts, seed=11)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    workspace = DecodeWorkspace.allocate(len(contexts), 6, 8, 16, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 8, out=out, workspace=workspace,
                           config=SMALL_DECODE, tokens_per_split=16)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    written = ~workspace.lse.isnan()                                    # [B, H, S]
    expected = torch.zeros_like(written)
    for b, splits in enumerate([1, 1, 4, 8, 1]):
        if splits > 1:
            expected[b, :, :splits] = True
    assert torch.equal(written, expected)
    assert torch.equal(~workspace.partial_out.isnan().all(dim=-1), expected)


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_decode_merge_programs_of_several_heads(heads):
    """H = 6 merged 1, 2 or 8 heads a program (8: two heads masked off)."""
    shape, dtype = (6, 1, 16, 4), torch.float32
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, CONTEXTS, seed=6)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    config = DecodeConfig(block_n=16, merge_heads=heads, merge="kernel")
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 5, config=config,
                                 tokens_per_split=16)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("config", DECODE_SWEEP, ids=str)
def test_decode_sweep_configs(config):
    """Every config the benchmark sweeps, at S = 1 and with rows split by context."""
    shape, dtype = (4, 2, 16, 16), torch.float16
    contexts = [1, 40, 0, 300, 129]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, contexts, seed=8)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    for num_splits, per_split in ((1, None), (6, decode_tokens_per_split(1, 2, 132, config))):
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits, config=config,
                                     tokens_per_split=per_split)
        assert rel_err(out, ref) < TOLERANCE[dtype], f"num_splits={num_splits}"


def test_decode_reads_strided_q_and_writes_strided_out():
    """q as a view into a fused qkv buffer (row stride > H * Dh), out a view too."""
    shape, dtype = (4, 2, 16, 4), torch.float32
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, [9, 40], seed=5)
    qkv = torch.zeros(2, 8, 16, device=DEVICE)
    qkv[:, :4] = q
    out_buf = torch.zeros(2, 6, 16, device=DEVICE)
    out = paged_decode_attention(qkv[:, :4], k_cache, v_cache, tables, context_lens, scale, 2,
                                 out=out_buf[:, 1:5], config=SMALL_DECODE)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale)
    assert out.data_ptr() == out_buf[:, 1:5].data_ptr() and rel_err(out, ref) < 1e-5
    assert not out_buf[:, 0].any() and not out_buf[:, 5].any()


# q_lens: decode rows (1), a fresh prompt (16), short prompts, a q_len-0 sequence, and chunks
# continuing a prompt (contexts beyond q_len: 5 new tokens after 15 cached, 16 after 24)
Q_LENS = [1, 3, 16, 0, 5, 16, 1]
PREFILL_CONTEXTS = [17, 3, 16, 9, 20, 40, 1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(shape, dtype):
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(shape, dtype, Q_LENS, PREFILL_CONTEXTS)
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(Q_LENS), scale,
                                  config=SMALL_PREFILL)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_prefill_default_tiles():
    shape, dtype = (6, 1, 32, 16), torch.float32
    q_lens, contexts = [70, 1, 0, 33], [70, 100, 5, 133]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(shape, dtype, q_lens, contexts, seed=4)
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("config", PREFILL_SWEEP, ids=str)
def test_prefill_sweep_configs(config):
    """Every config the benchmark sweeps; runs long enough for unmasked tiles and several query blocks."""
    shape, dtype = (8, 2, 16, 16), torch.float16
    q_lens, contexts = [140, 1, 0, 45], [140, 300, 7, 200]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(shape, dtype, q_lens, contexts, seed=9)
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale,
                                  config=config)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("shape", [(4, 2, 16, 4), (6, 1, 32, 16)])
def test_prefill_rows_of_q_len_1_equal_decode(shape):
    contexts = [1, 5, 17, 33, 70]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, torch.float32, contexts, seed=2)
    starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=DEVICE)
    prefill = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, 1, scale)
    decode = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 1)
    torch.testing.assert_close(prefill, decode, rtol=1e-6, atol=1e-6)


def test_kernels_compute_what_the_engine_computes():
    """TorchPagedAttention (per-sequence SDPA over the paged cache, the engine's CPU attention) on
    a mixed step: a chunk continuing a cached prompt, a fresh prompt and a decode row. It also
    applies q/k norm and RoPE and stores the new k/v; the kernels get the same rotated q."""
    from types import SimpleNamespace
    from epserve.attention_worker.attention_torch import TorchPagedAttention
    from epserve.attention_worker.kv_cache import PagedKVCache
    from epserve.models.layers import RotaryEmbedding, rms_norm
    from epserve.models.decoder import ForwardBatch
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 16, 4
    spec = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                           rms_norm_eps=1e-6, rope_theta=10000.0, rotary_dim=head_dim, sliding_window=None)
    cache = PagedKVCache(1, 32, block_size, num_kv_heads, head_dim, torch.float32)
    g = torch.Generator().manual_seed(7)
    cached = [10, 0, 12]                          # tokens already in the cache per sequence
    new = [5, 7, 1]
    contexts = [c + n for c, n in zip(cached, new)]
    cache.allocator.allocate(3)                   # so tables do not start at block 0
    tables = [cache.allocator.allocate(-(-c // block_size)) for c in contexts]
    for table, num_cached in zip(tables, cached):  # fill the earlier context directly
        slots = torch.tensor([table[i // block_size] * block_size + i % block_size for i in range(num_cached)],
                             dtype=torch.long)
        for pool in (cache.k[0], cache.v[0]):
            pool.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(num_cached, num_kv_heads, head_dim,
                                                                       generator=g)
    slot_mapping = torch.tensor([t[i // block_size] * block_size + i % block_size
                                 for t, c, n in zip(tables, cached, new) for i in range(c, c + n)])
    positions = torch.tensor([i for c, n in zip(cached, new) for i in range(c, c + n)])
    batch = ForwardBatch(input_ids=torch.zeros(sum(new), dtype=torch.long), positions=positions, seq_lens=new,
                         context_lens=contexts, block_tables=tables, slot_mapping=slot_mapping)
    qkv = torch.randn(sum(new), (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    q_norm, k_norm = torch.rand(head_dim, generator=g) + 0.5, torch.rand(head_dim, generator=g) + 0.5
    engine = TorchPagedAttention(cache, spec).forward(0, qkv, q_norm, k_norm, batch)   # [T, H Dh]
    engine = engine.view(-1, num_heads, head_dim)
    cos, sin = RotaryEmbedding(head_dim, spec.rope_theta).cos_sin(positions, qkv.dtype)
    q = RotaryEmbedding.apply(rms_norm(qkv[:, :num_heads * head_dim].reshape(-1, num_heads, head_dim), q_norm,
                                       spec.rms_norm_eps), cos, sin)

    width = max(len(t) for t in tables)
    table_tensor = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0] + new).cumsum(0).to(torch.int32).to(DEVICE)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    q, k_cache, v_cache = q.to(DEVICE), cache.k[0].to(DEVICE), cache.v[0].to(DEVICE)   # the cache after the step
    scale = head_dim ** -0.5
    prefill = paged_prefill_attention(q, k_cache, v_cache, table_tensor, starts, context_lens, max(new), scale,
                                      config=SMALL_PREFILL)
    assert rel_err(prefill.cpu(), engine) < 1e-5
    decode = paged_decode_attention(q[-1:], k_cache, v_cache, table_tensor[2:], context_lens[2:], scale, 2,
                                    config=SMALL_DECODE)
    assert rel_err(decode.cpu(), engine[-1:]) < 1e-5


def test_wrappers_reject_bad_inputs():
    q, k_cache, v_cache, tables, context_lens, scale = decode_case((4, 2, 16, 4), torch.float32, [3, 4])
    with pytest.raises(AssertionError, match="dtypes differ"):
        paged_decode_attention(q.half(), k_cache, v_cache, tables, context_lens, scale, 1)
    with pytest.raises(AssertionError, match="int32"):
        paged_decode_attention(q, k_cache, v_cache, tables.long(), context_lens, scale, 1)
    with pytest.raises(AssertionError, match="multiple of Hkv"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, context_lens, scale, 1)
    with pytest.raises(AssertionError, match="workspace"):
        paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 2,
                               workspace=DecodeWorkspace.allocate(2, 4, 3, 16, DEVICE))
    with pytest.raises(AssertionError, match="query_start_loc"):
        paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                                context_lens, 1, scale)


def test_decode_split_policy_at_h200_sizes():
    """132 SMs, Hkv = 4 (Qwen3-30B-A3B): the keys per split grow with the batch, and the engine's
    graphs (contexts up to 4112) get S from 65 at B = 1 down to 1 from B = 50 (3 programs per SM)."""
    assert [decode_tokens_per_split(b, 4, 132) for b in (1, 8, 32, 64, 128, 256)] == [64, 128, 512, 1024, 2048, 4032]
    assert [decode_num_splits(b, 4, 4112, 132) for b in (1, 8, 32, 33, 34, 49, 50, 256)] == [65, 12, 3, 3, 2, 2, 1, 1]
    assert decode_num_splits(1, 4, 32768, 132) == 99                   # at most 3 programs per SM
    assert decode_num_splits(1, 4, 200, 132) == 4 and decode_num_splits(32, 4, 256, 132) == 1
    assert decode_num_splits(1, 4, 0, 132) == 1
    assert decode_num_splits(32, 4, 4112, 132, DecodeConfig(max_programs_per_sm=4)) == 4
    config = DecodeConfig(block_n=32, min_split_tokens=40, sm_split_tokens=0)
    assert decode_tokens_per_split(256, 4, 132, config) == 64          # rounded up to whole tiles
    # merge programs: one head each while few, more heads when B·H is large; never past the tile
    assert merge_heads(1, 32, 65, 128, 132) == 1 and merge_heads(32, 32, 4, 128, 132) == 2
    assert merge_heads(256, 32, 2, 128, 132) == 16 and merge_heads(256, 32, 2, 128, 1) == 32
    assert merge_heads(64, 32, 4096, 128, 1) == 1


# ---- GPU: bf16 at Qwen3-30B-A3B's attention shape --------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QWEN3 = (32, 4, 128, 16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits,per_split", [(1, None), (4, None), (32, None), (32, 1), (65, 64)])
def test_decode_bf16_real_shape(num_splits, per_split):
    contexts = [1, 17, 300, 1024, 4096, 0, 2049, 16]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(QWEN3, torch.bfloat16, contexts, "cuda")
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale, torch.float32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits,
                                 tokens_per_split=per_split)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[5], torch.zeros_like(out[5]))


@pytest.mark.gpu
@requires_cuda
def test_prefill_bf16_real_shape():
    q_lens, contexts = [4096, 1, 700, 0, 37, 1], [4096, 3000, 3700, 12, 37, 1]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(QWEN3, torch.bfloat16, q_lens,
                                                                            contexts, "cuda")
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, starts, context_lens, scale,
                                            torch.float32)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_graph_replay_after_in_place_updates_equals_eager(num_splits):
    # cache and tables sized for 4 x 4096 tokens; captured at one set of contexts
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(QWEN3, torch.bfloat16, [4096] * 4, "cuda",
                                                                   seed=1)
    context_lens.copy_(torch.tensor([100, 4000, 0, 1]))
    workspace = DecodeWorkspace.allocate(4, 32, num_splits, 128, "cuda")
    out = torch.empty_like(q)

    def run():
        paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits, out=out,
                               workspace=workspace)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()                                                          # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    # replayed at other contexts (longer, shorter, a padding row becoming live), tables and q
    q.copy_(torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9)))
    tables.copy_(tables.roll(1, dims=0))
    context_lens.copy_(torch.tensor([3000, 7, 4096, 0]))
    graph.replay()
    torch.cuda.synchronize()
    eager = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits)
    assert torch.equal(out, eager)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale, torch.float32)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[3], torch.zeros_like(out[3]))
