"""One request must never end the engine (step_guard.py): a step that raises fails only the request
to blame, the others get the tokens they would have got; a data-plane error fails the whole step.
Sampling parameters that used to overflow to NaN (issue 15) sample normally."""

from __future__ import annotations

import pytest
import torch

from epserve.attention_worker.colocated import build_colocated_engine, generate_tokens
from epserve.attention_worker.engine import EngineLimits
from epserve.attention_worker.step_guard import MAX_ERROR_CHARS, describe
from epserve.dataplane.base import PeerLost
from epserve.sampling import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
PROMPTS = {"a": [5, 17, 300, 42, 7], "b": [9] * 11, "poison": [1, 2, 3], "c": list(range(40, 60))}


class FailingRunner:
    """The engine's runner, raising ``error`` for any step that holds ``poison_id`` (after ``after``
    calls with it), or for every step when ``poison_id`` is None."""

    def __init__(self, runner, error: Exception, poison_id: str | None, after: int = 0) -> None:
        self.runner, self.error, self.poison_id, self.after = runner, error, poison_id, after
        self.calls_with_poison = 0

    def run(self, chunks, expert_map):
        if self.poison_id is None or any(c.seq.request_id == self.poison_id for c in chunks):
            self.calls_with_poison += 1
            if self.calls_with_poison > self.after:
                raise self.error
        return self.runner.run(chunks, expert_map)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def make_engine(model_dir):
    limits = EngineLimits(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    return build_colocated_engine(str(model_dir), torch.float32, limits=limits)


def run_all(engine, prompts: dict[str, list[int]], params=GREEDY):
    tokens = {rid: [] for rid in prompts}
    finals = {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
    return tokens, finals


def test_a_failing_request_fails_alone_and_the_others_are_unchanged(tiny_model):
    want, _ = run_all(make_engine(tiny_model), {k: v for k, v in PROMPTS.items() if k != "poison"})
    engine = make_engine(tiny_model)
    engine.runner = FailingRunner(engine.runner, RuntimeError("probability tensor contains nan"), "poison", after=2)
    got, finals = run_all(engine, PROMPTS)
    assert finals["poison"].finish_reason == FinishReason.ABORT
    assert "RuntimeError: probability tensor contains nan" in finals["poison"].error
    assert {k: got[k] for k in want} == want
    assert all(not finals[k].error and finals[k].finish_reason == FinishReason.LENGTH for k in want)
    assert engine.kv_cache.allocator.num_free == engine.limits.num_kv_blocks      # nothing leaked
    assert generate_tokens(engine, [PROMPTS["a"]], GREEDY) == [want["a"]]        # and it keeps serving


def test_a_data_plane_error_fails_the_whole_step_without_rerunning_it(tiny_model):
    engine = make_engine(tiny_model)
    failing = FailingRunner(engine.runner, PeerLost("expert rank 3 is gone", peer_rank=3), None)
    engine.runner = failing
    _, finals = run_all(engine, {k: PROMPTS[k] for k in ("a", "b")})
    assert all(f.finish_reason == FinishReason.ABORT and "PeerLost" in f.error for f in finals.values())
    assert failing.calls_with_poison == 1           # no chunk-by-chunk search: the peer would fail them all again


def test_an_engine_invariant_still_ends_the_step(tiny_model):
    engine = make_engine(tiny_model)
    engine.runner = FailingRunner(engine.runner, AssertionError("a bug"), None)
    engine.add_request("a", PROMPTS["a"], GREEDY)
    with pytest.raises(AssertionError):
        engine.step()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-39, max_new_tokens=8), SamplingParams(temperature=1e-45, max_new_tokens=8),
    SamplingParams(temperature=1e-38, max_new_tokens=8),
    SamplingParams(temperature=1.0, repetition_penalty=1e-39, max_new_tokens=8),
    SamplingParams(temperature=1e-39, repetition_penalty=1e-39, top_k=3, top_p=0.5, min_p=0.5, max_new_tokens=8),
], ids=["t1e-39", "t1e-45", "t1e-38", "penalty1e-39", "all"])
def test_issue_15_poison_parameters_sample_without_error(tiny_model, params):
    _, finals = run_all(make_engine(tiny_model), {"p": PROMPTS["a"]}, params)
    assert not finals["p"].error and finals["p"].num_generated >= 1


def test_error_messages_are_bounded():
    assert len(describe(ValueError("x" * 100_000))) <= MAX_ERROR_CHARS + 1
