"""Paged decode and prefill attention with attention sinks and sliding windows (GPT-OSS, windowed Mixtral)
against the float64 references.

A sink is one more logit per head in the softmax's denominator; a window W lets the query at position p
see keys p - W < k <= p. Small odd shapes and tiles (CPU: the Triton interpreter), windows smaller than
a tile, equal to one, larger than every context, and 1; decode rows split by context, every row split
(empty splits), both merges; prefill chunks crossing the window's edge. GPU only (marked): bf16 at
GPT-OSS's attention shape.
"""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import TOLERANCE, rel_err
from epserve.kernels.paged_attention import (MERGES, DecodeConfig, DecodeWorkspace, paged_decode_attention,
                                             paged_decode_attention_reference)
from epserve.kernels.paged_prefill import PrefillConfig, paged_prefill_attention, paged_prefill_attention_reference
from test_paged_attention import DEVICE, SMALL_DECODE, SMALL_PREFILL, as_double, decode_case, prefill_case

CONTEXTS = [1, 5, 6, 17, 0, 70, 33]     # 0: a CUDA-graph padding row
WINDOWS = [None, 1, 5, 16, 23, 1000]    # 5 < a 16-key tile; 16 = a tile; 1000 > every context


def make_sinks(num_heads: int, seed: int = 0, device: str = DEVICE) -> torch.Tensor:
    """[H] float32 logits around the scores' scale, one large enough to take most of its head's weight."""
    sinks = torch.randn(num_heads, generator=torch.Generator().manual_seed(seed)) * 1.5
    sinks[0] = 4.0
    return sinks.to(device)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("with_sinks", [False, True])
def test_decode_matches_reference(window, with_sinks):
    shape, dtype = (6, 2, 16, 4), torch.float32
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, CONTEXTS, seed=31)
    sinks = make_sinks(6) if with_sinks else None
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale,
                                           sinks=sinks, window=window)
    # S = 1; rows split by context; every row split 4 ways (tokens_per_split 1: empty splits)
    for num_splits, per_split in ((1, None), (4, 16), (4, 1)):
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits,
                                     config=SMALL_DECODE, tokens_per_split=per_split, sinks=sinks, window=window)
        assert rel_err(out, ref) < 1e-5, f"num_splits={num_splits} tokens_per_split={per_split}"
        assert torch.equal(out[4], torch.zeros_like(out[4])), "context 0 must give zeros"


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("window", [None, 40])
def test_decode_both_merges_count_the_sinks_once(merge, window):
    """Rows of up to 13 splits (window 40: at most 3), G = 6; the workspace starts as NaN, so rows of
    one split must not read it; twice in a row (the fused merge's counters are back at 0)."""
    shape, dtype = (12, 2, 16, 4), torch.float32
    contexts = [200, 1, 0, 64, 130, 41]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, contexts, seed=22)
    sinks = make_sinks(12, seed=1)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale,
                                           sinks=sinks, window=window)
    workspace = DecodeWorkspace.allocate(len(contexts), 12, 13, 16, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    for _ in range(2):
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 13, workspace=workspace,
                                     config=DecodeConfig(block_n=16, merge=merge), tokens_per_split=16, sinks=sinks,
                                     window=window)
        assert rel_err(out, ref) < 1e-5
        assert torch.equal(out[2], torch.zeros_like(out[2]))
    if window is not None:
        assert workspace.lse[:, :, 3:].isnan().all(), "a 40-key window splits at most 3 ways at 16 keys a split"


def test_decode_window_boundary():
    """A window of W over a context of W keys is the whole context; over W + 1 it drops exactly key 0."""
    shape, dtype, window = (4, 2, 16, 4), torch.float32, 9
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, [window, window + 1], seed=4)
    whole = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 1, config=SMALL_DECODE)
    windowed = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 1, config=SMALL_DECODE,
                                      window=window)
    torch.testing.assert_close(windowed[0], whole[0], rtol=0, atol=0)
    assert not torch.allclose(windowed[1], whole[1])
    # the second row without its key 0: the same as a sequence whose table starts one key later
    keys = torch.arange(1, window + 1)
    table = tables[1].long()
    k = k_cache[table[keys // 4], keys % 4]                                 # [W, Hkv, Dh]
    v = v_cache[table[keys // 4], keys % 4]
    scores = torch.einsum("hd,chd->hc", q[1].double(), k.repeat_interleave(2, 1).double()) * scale
    want = torch.einsum("hc,chd->hd", scores.softmax(-1), v.repeat_interleave(2, 1).double())
    assert rel_err(windowed[1], want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_sinks_in_the_model_dtype(dtype):
    """Sinks given in q's dtype (GPT-OSS's weights) read as float32: the same as float32 sinks."""
    shape = (6, 1, 32, 16)
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, dtype, CONTEXTS, seed=9)
    sinks = make_sinks(6, seed=2).to(dtype)
    ref = paged_decode_attention_reference(*as_double(q, k_cache, v_cache), tables, context_lens, scale,
                                           sinks=sinks.double(), window=16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 3, config=SMALL_DECODE,
                                 sinks=sinks, window=16)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out, paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 3,
                                                   config=SMALL_DECODE, sinks=sinks.float(), window=16))


# decode rows, a fresh prompt, a q_len-0 sequence, and chunks continuing a prompt across the window's edge
Q_LENS = [1, 3, 16, 0, 5, 16, 1, 24]
PREFILL_CONTEXTS = [17, 3, 16, 9, 20, 40, 1, 64]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("config", [SMALL_PREFILL, PrefillConfig(block_m=32, block_n=16)], ids=["m16", "m32"])
def test_prefill_matches_reference(window, with_sinks, config):
    shape, dtype = (6, 2, 16, 4), torch.float32
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(shape, dtype, Q_LENS, PREFILL_CONTEXTS,
                                                                            seed=12)
    sinks = make_sinks(6, seed=3) if with_sinks else None
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale,
                                            sinks=sinks, window=window)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(Q_LENS), scale,
                                  config=config, sinks=sinks, window=window)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("window", [7, 64])
def test_prefill_default_tiles_long_runs(window):
    """128-row programs over 64-key tiles: a 200-token prompt and a 90-token chunk after 110 cached
    tokens, so tiles before the window, masked window tiles, whole tiles and the causal edge all occur."""
    shape, dtype = (8, 1, 16, 16), torch.float16
    q_lens, contexts = [200, 1, 90], [200, 150, 200]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(shape, dtype, q_lens, contexts, seed=5)
    sinks = make_sinks(8, seed=4)
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale,
                                            sinks=sinks, window=window)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale,
                                  sinks=sinks, window=window)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("window", [8, None])
def test_prefill_float32_default_tiles_at_the_tiny_gpt_oss_shape(window):
    """What the GPU engine launches for the tiny GPT-OSS's prompt logits (bench/gpu/diag_gpt_oss.py): float32,
    the default tiles (64 rows of 32 tokens x 2 heads, 64-key tiles), H=4, Hkv=2, Dh=16, 16-token blocks,
    four fresh prompts, sinks, the even layers' window of 8 and the odd layers' none."""
    q_lens = [18, 8, 19, 13]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case((4, 2, 16, 16), torch.float32, q_lens,
                                                                            q_lens, seed=17)
    sinks = make_sinks(4, seed=6)
    ref = paged_prefill_attention_reference(*as_double(q, k_cache, v_cache), tables, starts, context_lens, scale,
                                            sinks=sinks, window=window)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale,
                                  sinks=sinks, window=window)
    assert rel_err(out, ref) < 1e-5
    firsts = starts[:-1].long()                                           # each prompt's position 0
    assert rel_err(out[firsts], ref[firsts]) < 1e-5


def test_prefill_rows_of_q_len_1_equal_decode():
    shape, contexts, sinks = (6, 2, 16, 4), [1, 5, 17, 33, 70], make_sinks(6, seed=5)
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(shape, torch.float32, contexts, seed=2)
    starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=DEVICE)
    prefill = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, 1, scale, sinks=sinks,
                                      window=10)
    decode = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, 1, sinks=sinks, window=10)
    torch.testing.assert_close(prefill, decode, rtol=1e-6, atol=1e-6)


def test_wrappers_reject_bad_sinks_and_windows():
    q, k_cache, v_cache, tables, context_lens, scale = decode_case((4, 2, 16, 4), torch.float32, [3, 4])
    starts = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    for kernel, args in ((paged_decode_attention, (q, k_cache, v_cache, tables, context_lens, scale, 1)),
                         (paged_prefill_attention, (q, k_cache, v_cache, tables, starts, context_lens, 1, scale))):
        with pytest.raises(AssertionError, match=r"sinks must be \[H=4\]"):
            kernel(*args, sinks=torch.zeros(2, device=DEVICE))
        with pytest.raises(AssertionError, match="sinks must be torch.float32 or q.s dtype"):
            kernel(*args, sinks=torch.zeros(4, dtype=torch.int32, device=DEVICE))
        with pytest.raises(AssertionError, match="window must be None"):
            kernel(*args, window=0)


# ---- GPU: bf16 at GPT-OSS's attention shape (H=64, Hkv=8, Dh=64, window 128) ---------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPT_OSS = (64, 8, 64, 16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("num_splits,per_split", [(1, None), (8, None), (32, 1), (65, 64)])
def test_decode_bf16_gpt_oss_shape(window, merge, num_splits, per_split):
    contexts = [1, 17, 128, 129, 300, 4096, 0, 2049]
    q, k_cache, v_cache, tables, context_lens, scale = decode_case(GPT_OSS, torch.bfloat16, contexts, "cuda")
    sinks = make_sinks(64, device="cuda")
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale, torch.float32,
                                           sinks=sinks, window=window)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits,
                                 config=DecodeConfig(merge=merge), tokens_per_split=per_split, sinks=sinks,
                                 window=window)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[6], torch.zeros_like(out[6]))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("window", [None, 128])
def test_prefill_bf16_gpt_oss_shape(window):
    q_lens, contexts = [4096, 1, 700, 0, 37, 1, 200], [4096, 3000, 3700, 12, 37, 1, 260]
    q, k_cache, v_cache, tables, starts, context_lens, scale = prefill_case(GPT_OSS, torch.bfloat16, q_lens,
                                                                            contexts, "cuda")
    sinks = make_sinks(64, device="cuda").bfloat16()
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, starts, context_lens, scale,
                                            torch.float32, sinks=sinks, window=window)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, context_lens, max(q_lens), scale,
                                  sinks=sinks, window=window)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
