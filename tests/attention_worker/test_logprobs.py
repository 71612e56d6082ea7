"""Logprobs from the engine (``return_logprob``, ``top_logprobs_num``) on both step runners — the host
runner (``torch_native``) and the batched device runner (``triton``, here under the Triton
interpreter) — against transformers' float32 log-softmax of the same sequence, within 1e-4."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine
from epserve.attention_worker.engine import EngineLimits
from epserve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
PROMPTS = [[5, 17, 300, 42, 7], [9] * 11, list(range(40, 57))]
BACKENDS = ["torch_native", "triton"]


@pytest.fixture(scope="module")
def hf(tiny_model):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                             experts_implementation="eager").eval()


def run(model_dir, backend: str, requests: list[tuple[list[int], SamplingParams]],
        device: str = "cpu") -> list[tuple[list, list]]:
    """Every request to completion in one engine → (token ids, logprobs per token) per request."""
    limits = EngineLimits(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                          attention_backend=backend)
    engine = build_colocated_engine(str(model_dir), torch.float32, device, limits=limits)
    got = {str(i): ([], []) for i in range(len(requests))}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    while engine.has_work:
        for out in engine.step():
            tokens, logprobs = got[out.request_id]
            tokens.extend(out.new_token_ids)
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.new_token_ids)
                logprobs.extend(out.logprobs)
    return [got[str(i)] for i in range(len(requests))]


def reference(hf, prompt: list[int], generated: list[int], params: SamplingParams) -> torch.Tensor:
    """[G, V] transformers' log-softmax at each generated position, after the repetition penalty on
    the tokens before it and the temperature (none when greedy)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()                              # [G, V]
    rows = []
    for g, row in enumerate(logits):
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt + generated[:g])))
            picked = row[seen]
            row = row.clone()
            row[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        rows.append(torch.log_softmax(row / params.logprob_temperature, dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_logprobs_match_transformers(tiny_model, hf, backend):
    params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, return_logprob=True,
                            top_logprobs_num=3)
    for prompt, (tokens, logprobs) in zip(PROMPTS, run(tiny_model, backend, [(p, params) for p in PROMPTS])):
        want = reference(hf, prompt, tokens, params)
        assert len(logprobs) == len(tokens) == 5
        for g, (token, lp) in enumerate(zip(tokens, logprobs)):
            assert lp.logprob == pytest.approx(float(want[g, token]), abs=TOLERANCE)
            top = torch.topk(want[g], 3)
            assert lp.top_ids[0] == token == int(top.indices[0])        # greedy: the sampled token is the top one
            assert len(lp.top_ids) == len(lp.top_logprobs) == 3
            assert list(lp.top_logprobs) == pytest.approx(top.values.tolist(), abs=TOLERANCE)
            assert [float(want[g, t]) for t in lp.top_ids] == pytest.approx(list(lp.top_logprobs), abs=TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_logprobs_are_of_the_processed_logits(tiny_model, hf, backend):
    """Temperature and repetition penalty shape the logprobs; top-k/top-p do not. One request asks
    without top logprobs, one does not ask at all (its outputs carry none)."""
    hot = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5, max_new_tokens=4,
                         ignore_eos=True, return_logprob=True, top_logprobs_num=2)
    plain = SamplingParams(temperature=1.3, seed=6, max_new_tokens=4, ignore_eos=True, return_logprob=True)
    silent = SamplingParams(temperature=0.9, seed=7, max_new_tokens=4, ignore_eos=True)
    requests = [(PROMPTS[0], hot), (PROMPTS[1], plain), (PROMPTS[2], silent)]
    results = run(tiny_model, backend, requests)
    for (prompt, params), (tokens, logprobs) in zip(requests[:2], results[:2]):
        want = reference(hf, prompt, tokens, params)
        assert [lp.logprob for lp in logprobs] == pytest.approx(
            [float(want[g, t]) for g, t in enumerate(tokens)], abs=TOLERANCE)
        for g, lp in enumerate(logprobs):
            assert len(lp.top_ids) == params.top_logprobs_num
            assert list(lp.top_logprobs) == pytest.approx(torch.topk(want[g], params.top_logprobs_num).values.tolist(),
                                                          abs=TOLERANCE)
    assert len(results[2][0]) == 4 and results[2][1] == []


def test_logprobs_do_not_change_the_tokens(tiny_model):
    """Asking for logprobs leaves the sampled tokens alone (same seed, same tokens), on both runners."""
    base = SamplingParams(temperature=0.8, repetition_penalty=1.2, seed=11, max_new_tokens=4, ignore_eos=True)
    asking = SamplingParams(**{**base.__dict__, "return_logprob": True, "top_logprobs_num": 4})
    for backend in BACKENDS:
        without = run(tiny_model, backend, [(PROMPTS[0], base)])[0][0]
        with_logprobs = run(tiny_model, backend, [(PROMPTS[0], asking)])[0][0]
        assert with_logprobs == without


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_logprobs_match_transformers(tiny_model, hf):
    """On a GPU: decode steps replay CUDA graphs; greedy rows, sampled rows with a penalty, and rows
    asking nothing share steps."""
    greedy = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, return_logprob=True, top_logprobs_num=4)
    hot = SamplingParams(temperature=0.8, repetition_penalty=1.2, seed=3, max_new_tokens=5, ignore_eos=True,
                         return_logprob=True, top_logprobs_num=2)
    silent = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    requests = [(PROMPTS[0], greedy), (PROMPTS[1], hot), (PROMPTS[2], silent)]
    results = run(tiny_model, "triton", requests, device="cuda")
    for (prompt, params), (tokens, logprobs) in zip(requests[:2], results[:2]):
        want = reference(hf, prompt, tokens, params)
        assert [lp.logprob for lp in logprobs] == pytest.approx([float(want[g, t]) for g, t in enumerate(tokens)],
                                                                abs=TOLERANCE)
        for g, lp in enumerate(logprobs):
            assert list(lp.top_logprobs) == pytest.approx(torch.topk(want[g], params.top_logprobs_num).values.tolist(),
                                                          abs=TOLERANCE)
    assert results[2][1] == []


def test_top_logprobs_num_is_bounded():
    with pytest.raises(ValueError, match="top_logprobs_num"):
        SamplingParams(return_logprob=True, top_logprobs_num=21)
