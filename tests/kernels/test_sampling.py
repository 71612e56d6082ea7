"""The batched device sampler against sample_one's semantics, drawn with the kernel's own noise."""

from __future__ import annotations

import pytest
import torch

from epserve.kernels import sampling
from epserve.kernels.sampling import (SamplingTensors, filtered_probs_reference, philox_uniforms, race_reference,
                                      sample, sample_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# one row per line: (temperature, top_k, top_p, min_p, repetition_penalty)
MIXED_ROWS = [
    (0.0, 0, 1.0, 0.0, 1.0),        # greedy
    (0.0, 0, 1.0, 0.0, 1.3),        # greedy with a penalty
    (1.0, 1, 1.0, 0.0, 1.0),        # top_k 1 is greedy
    (1.0, 0, 1.0, 0.0, 1.0),        # plain temperature sampling
    (0.6, 0, 1.0, 0.0, 1.0),
    (1.7, 0, 1.0, 0.0, 1.2),
    (1.0, 5, 1.0, 0.0, 1.0),        # top-k
    (1.3, 40, 1.0, 0.0, 1.0),
    (1.0, 0, 0.9, 0.0, 1.0),        # top-p
    (2.0, 0, 0.3, 0.0, 1.0),
    (1.0, 0, 1.0, 0.05, 1.0),       # min-p
    (1.5, 0, 1.0, 0.2, 0.8),
    (0.8, 20, 0.8, 0.02, 1.1),      # everything at once
    (3.0, 100, 0.95, 0.0, 1.0),
    (1.0, 7, 0.5, 0.1, 1.4),
]


def make_params(rows, seeds=None, positions=None, device=DEVICE) -> SamplingTensors:
    temperature, top_k, top_p, min_p, penalty = list(zip(*rows)) or [()] * 5
    n = len(rows)
    seeds = list(range(1000, 1000 + n)) if seeds is None else seeds
    positions = [7 * i + 3 for i in range(n)] if positions is None else positions
    return SamplingTensors(
        temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
        top_k=torch.tensor(top_k, dtype=torch.int32, device=device),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
        min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
        repetition_penalty=torch.tensor(penalty, dtype=torch.float32, device=device),
        seed=torch.tensor(seeds, dtype=torch.int64, device=device),
        position=torch.tensor(positions, dtype=torch.int64, device=device))


def make_logits(num_rows: int, vocab: int, seed: int, scale: float = 3.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=g) * scale
    seen = torch.rand(num_rows, vocab, generator=g) < 0.1
    return logits.to(device), seen.to(device)


def reference_tokens(logits, params, seen):
    uniforms = philox_uniforms(params.seed, params.position, logits.shape[1])
    return sample_reference(logits, params, seen, uniforms)


@pytest.fixture(autouse=True)
def small_gather(monkeypatch):
    """The interpreter runs tl.sort slowly: gather at most 32 candidates (which also makes the
    threshold searches take their refinement passes at these small vocabularies)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(sampling, "GATHER", 32)


@pytest.mark.parametrize("vocab", [37, 300])
def test_greedy_rows_are_the_argmax(vocab):
    logits, _ = make_logits(6, vocab, seed=vocab)
    logits[2, 5] = logits[2, 11] = logits[2].max() + 1                  # a tie: the first index wins
    params = make_params([(0.0, 0, 1.0, 0.0, 1.0)] * 3 + [(1.0, 1, 0.5, 0.1, 1.0)] * 3)
    expected = torch.argmax(logits, dim=-1)
    assert expected[2] == 5
    for kwargs in ({}, {"use_filters": False}, {"greedy_only": True}):
        assert torch.equal(sample(logits, params, None, **kwargs), expected)


def test_greedy_only_ignores_the_sampling_parameters_but_not_the_penalty():
    logits, seen = make_logits(len(MIXED_ROWS), 50, seed=1)
    params = make_params(MIXED_ROWS)
    tokens = sample(logits, params, seen, greedy_only=True)
    greedy = make_params([(0.0, 0, 1.0, 0.0, row[4]) for row in MIXED_ROWS])
    assert torch.equal(tokens, reference_tokens(logits, greedy, seen))


@pytest.mark.parametrize("vocab", [61, 300, 1000])
@pytest.mark.parametrize("with_seen", [True, False])
def test_matches_reference_exactly_with_the_kernels_uniforms(vocab, with_seen):
    logits, seen = make_logits(len(MIXED_ROWS), vocab, seed=vocab)
    seen = seen if with_seen else None
    params = make_params(MIXED_ROWS)
    tokens = sample(logits, params, seen)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(MIXED_ROWS),)
    assert torch.equal(tokens, reference_tokens(logits, params, seen))


def test_rows_without_filters_agree_between_both_paths():
    rows = [row for row in MIXED_ROWS if row[1] in (0, 1) and row[2] == 1.0 and row[3] == 0.0]
    logits, seen = make_logits(len(rows), 200, seed=5)
    params = make_params(rows)
    expected = reference_tokens(logits, params, seen)
    assert torch.equal(sample(logits, params, seen, use_filters=False), expected)
    assert torch.equal(sample(logits, params, seen), expected)


def test_flat_logits_force_refinement_passes():
    """All logits within 1e-3: every first-pass bracket holds the whole vocabulary, so the
    threshold searches split their brackets until few enough tokens remain to sort."""
    rows = [(1.0, 150, 1.0, 0.0, 1.0), (1.0, 0, 0.4, 0.0, 1.0), (0.5, 90, 0.7, 0.0, 1.0), (1.0, 299, 0.999, 0.0, 1.0)]
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 1e-3).to(DEVICE)
    params = make_params(rows)
    assert torch.equal(sample(logits, params, None), reference_tokens(logits, params, None))


def test_ties_at_the_top_k_boundary_are_all_kept():
    logits = torch.tensor([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0, -1.0, 3.0]], device=DEVICE)
    kept = filtered_probs_reference(logits, make_params([(1.0, 2, 1.0, 0.0, 1.0)]), None)[0] > 0
    assert kept.tolist() == [True, False, True, True, True, False, False, True]
    for position in range(24):
        params = make_params([(1.0, 2, 1.0, 0.0, 1.0)], seeds=[9], positions=[position])
        token = int(sample(logits, params, None))
        assert kept[token]
        assert token == int(reference_tokens(logits, params, None))


def test_a_seeded_request_draws_the_same_token_in_any_row_of_any_batch():
    logits, seen = make_logits(len(MIXED_ROWS), 150, seed=8)
    request = 12                                                      # all filters and a penalty
    params = make_params(MIXED_ROWS)
    alone = sample(logits[request:request + 1], make_params([MIXED_ROWS[request]], seeds=[1012], positions=[87]),
                   seen[request:request + 1])
    in_batch = sample(logits, params, seen)
    assert params.seed[request] == 1012 and params.position[request] == 87
    assert alone[0] == in_batch[request]
    # the same request in row 0 of a batch of other requests
    order = [request, 3, 7, 0]
    shuffled = make_params([MIXED_ROWS[i] for i in order], seeds=[1000 + i for i in order],
                           positions=[7 * i + 3 for i in order])
    tokens = sample(logits[order], shuffled, seen[order])
    assert torch.equal(tokens, in_batch[order])


def test_positions_and_seeds_select_independent_streams():
    seeds = torch.tensor([5, 5, 5, 6], dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([0, 1, 2 ** 31 - 1, 0], dtype=torch.int64, device=DEVICE)
    uniforms = philox_uniforms(seeds, positions, 4096)
    assert ((uniforms >= 0) & (uniforms < 1)).all()
    for a in range(4):
        for b in range(a + 1, 4):
            assert (uniforms[a] == uniforms[b]).float().mean() < 0.01
    assert torch.equal(uniforms[:2], philox_uniforms(seeds[:2], positions[:2], 4096))      # a pure function
    # the same request at successive positions draws different tokens
    logits = torch.zeros(32, 100, device=DEVICE)
    params = make_params([(1.0, 0, 1.0, 0.0, 1.0)] * 32, seeds=[77] * 32, positions=list(range(32)))
    assert len(set(sample(logits, params, None, use_filters=False).tolist())) > 20


def test_uniforms_are_uniform():
    uniforms = philox_uniforms(torch.tensor([3], device=DEVICE), torch.tensor([11], device=DEVICE), 65536)[0]
    counts = torch.histc(uniforms.double().cpu(), bins=16, min=0.0, max=1.0)
    expected = uniforms.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0                                               # 15 dof: p < 1e-4 above this


def test_draws_follow_the_filtered_distribution():
    """The race over the kernel's Philox noise draws from the filtered distribution: many draws from
    one long stream cut into rows (cheap on the interpreter; the kernel equals the reference's race
    on the same noise, tested above). Fixed seed: deterministic."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.8, 0.3, 0.0, -0.5, -1.0, -3.0, float("-inf")]], device=DEVICE)
    params = make_params([(0.9, 7, 0.9, 0.04, 1.0)])
    probs = filtered_probs_reference(logits, params, None)[0]
    support = probs > 0
    assert 3 <= int(support.sum()) <= 6                              # the filters do bite
    num_draws, vocab = 20000, logits.shape[1]
    noise = philox_uniforms(torch.tensor([2024], device=DEVICE), torch.tensor([0], device=DEVICE), num_draws * vocab)
    draws = race_reference(probs.expand(num_draws, vocab), noise.view(num_draws, vocab))
    counts = torch.bincount(draws, minlength=vocab).double()
    assert counts[~support].sum() == 0
    expected = probs[support].double() * num_draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 25.0                                               # <= 5 dof: p < 1e-4 above this


@pytest.mark.filterwarnings("ignore::RuntimeWarning")             # the interpreter's numpy: inf / nan lanes
@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-30])
def test_tiny_temperatures_sample_the_argmax(temperature):
    logits, _ = make_logits(4, 80, seed=2)
    rows = [(temperature, 0, 1.0, 0.0, 1.0), (temperature, 10, 0.9, 0.0, 1.0), (temperature, 0, 1.0, 0.5, 1.0),
            (temperature, 3, 0.2, 0.1, 1.0)]
    tokens = sample(logits, make_params(rows), None)
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    assert torch.equal(sample(logits, make_params(rows), None, use_filters=False), torch.argmax(logits, dim=-1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_extreme_parameters_and_logits_give_valid_tokens():
    vocab = 64
    logits, seen = make_logits(12, vocab, seed=4)
    logits[2] = 0.0                                                   # all equal
    logits[3, ::2] = float("-inf")                                    # half -inf
    logits[4] = float("-inf")                                         # all -inf
    logits[5, 7] = float("nan")
    logits[6, 3] = float("inf")
    logits[7, :5] = 3e38                                              # near the float max
    rows = [
        (1.0, 0, 1.0, 0.0, 1e-39),      # penalty 1e-39: seen positive logits overflow
        (1e-45, 0, 1.0, 0.0, 1e-39),
        (1.0, 0, 1.0, 0.0, 1.0),
        (1.0, 0, 0.9, 0.5, 1.0),
        (1.0, 5, 0.9, 0.1, 1.0),
        (1.0, 0, 1.0, 0.0, 1.0),
        (1e-39, 0, 1.0, 0.0, 1.0),
        (1e30, 0, 1.0, 0.0, 3e38),
        (1e30, vocab - 1, 1e-9, 0.999, 1.0),
        (1.0, 10 ** 6, 1.0, 0.0, 1.0),
        (1.0, 0, 1e-9, 0.0, 1.0),
        (1e-45, 2, 0.01, 0.9, 1e-39),
    ]
    params = make_params(rows)
    for kwargs in ({}, {"use_filters": False}, {"greedy_only": True}):
        tokens = sample(logits, params, seen, **kwargs)
        assert ((tokens >= 0) & (tokens < vocab)).all(), kwargs
    tokens = sample(logits, params, seen)
    expected = reference_tokens(logits, params, seen)
    # rows 4 (all -inf) and 8 (temperature 1e30: every probability rounds to the same value) meet
    # top-p inside a tie of equal probabilities: the kernel keeps the whole tie (row 8: ordered by
    # logit), the reference cuts it in its sort order. Every other row agrees exactly.
    others = torch.ones(12, dtype=torch.bool, device=DEVICE)
    others[[4, 8]] = False
    assert torch.equal(tokens[others], expected[others])
    assert logits[3, tokens[3]] > float("-inf")                       # a -inf logit is never drawn
    assert tokens[6] == 3                                              # +inf counts as the largest float
    assert tokens[7] < 5            # 3e38 above the rest: even temperature 1e30 leaves the rest e = 0
    probs = filtered_probs_reference(logits, params, seen)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(12, device=DEVICE))


def test_no_rows_and_bad_arguments():
    params = make_params([])
    assert sample(torch.empty(0, 10, device=DEVICE), params, None).shape == (0,)
    logits = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(AssertionError, match="rows"):
        sample(logits, make_params([(1.0, 0, 1.0, 0.0, 1.0)]), None)
    with pytest.raises(AssertionError, match="seen"):
        sample(logits, make_params([(1.0, 0, 1.0, 0.0, 1.0)] * 2), torch.zeros(2, 10, dtype=torch.int32))
    with pytest.raises(AssertionError, match="top_k"):
        SamplingTensors(**{**make_params([(1.0, 0, 1.0, 0.0, 1.0)]).__dict__, "top_k": torch.zeros(1)})


# ---- GPU: Qwen3's vocabulary, 128 rows ----

QWEN3_VOCAB = 151936


def qwen3_batch(num_rows: int, seed: int):
    """bf16-valued logits of an LLM-like spread, a penalty mask, MIXED_ROWS cycled over the rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(num_rows, QWEN3_VOCAB, device="cuda", generator=g) * 2.5).bfloat16().float()
    logits[:, :64] += 8.0                                             # a few likely tokens per row
    seen = torch.rand(num_rows, QWEN3_VOCAB, device="cuda", generator=g) < 0.01
    rows = [MIXED_ROWS[i % len(MIXED_ROWS)] for i in range(num_rows)]
    params = make_params(rows, seeds=[seed * 1000 + i for i in range(num_rows)],
                         positions=[100 + 13 * i for i in range(num_rows)], device="cuda")
    return logits, seen, params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_qwen3_vocab_matches_reference():
    logits, seen, params = qwen3_batch(128, seed=1)
    expected = reference_tokens(logits, params, seen)
    # The GPU's exp/log differ from torch's in the last bits: a race between two nearly equal
    # candidates can go the other way (a few rows in 128 on an H100, 2026-12-06).
    assert (sample(logits, params, seen) == expected).float().mean() >= 0.9
    greedy = make_params([(0.0, 0, 1.0, 0.0, row[4]) for row in [MIXED_ROWS[i % len(MIXED_ROWS)] for i in range(128)]],
                         device="cuda")
    assert torch.equal(sample(logits, params, seen, greedy_only=True), reference_tokens(logits, greedy, seen))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_high_temperature_rows_keep_large_candidate_sets():
    """Temperature 5 over Qwen3's vocabulary: top-k 50000 and top-p 0.9 keep tens of thousands of
    tokens, so the searches refine their brackets several times before they sort."""
    logits, seen, _ = qwen3_batch(16, seed=3)
    rows = [(5.0, 50000, 1.0, 0.0, 1.0), (5.0, 0, 0.9, 0.0, 1.0), (5.0, 20000, 0.6, 0.0, 1.3), (10.0, 0, 0.5, 1e-3, 1.0)]
    params = make_params(rows * 4, device="cuda")
    assert torch.equal(sample(logits, params, seen), reference_tokens(logits, params, seen))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_draws_follow_the_filtered_distribution():
    num_draws, vocab = 65536, 40
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(6)) * 2).cuda()
    rows = [(0.8, 20, 0.9, 0.01, 1.0)] * num_draws
    params = make_params(rows, seeds=[31] * num_draws, positions=list(range(num_draws)), device="cuda")
    tokens = sample(logits.expand(num_draws, vocab).contiguous(), params, None)
    probs = filtered_probs_reference(logits, params, None)[0].double()
    support = probs > 0
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~support].sum() == 0
    expected = probs[support] * num_draws
    dof = int(support.sum()) - 1
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < dof + 6 * (2 * dof) ** 0.5                          # ~6 sigma over the mean


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_filters", [True, False])
def test_gpu_sampler_replays_from_a_cuda_graph(use_filters):
    logits, seen, params = qwen3_batch(128, seed=4)
    sample(logits, params, seen, use_filters=use_filters)            # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample(logits, params, seen, use_filters=use_filters)
    fresh_logits, fresh_seen, fresh = qwen3_batch(128, seed=5)
    logits.copy_(fresh_logits)
    seen.copy_(fresh_seen)
    for name in ("seed", "position", "temperature"):
        getattr(params, name).copy_(getattr(fresh, name))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(tokens, sample(logits, params, seen, use_filters=use_filters))
