"""The overlap schedule (engine.py ``_launch_ahead``): the GPU runner's next decode step is launched before
the step before it has finished, its input tokens read on the device. It must change no output: tokens,
stops, aborts, arrivals, seeded sampling, logprobs and failures are what the engine gives with
``disable_overlap_schedule``. On the CPU under the Triton interpreter (the runner, its placeholders and
the engine's bookkeeping are the same code as on a GPU)."""

from __future__ import annotations

import torch

from epserve.attention_worker.colocated import build_colocated_engine
from epserve.attention_worker.engine import EngineLimits
from epserve.sampling import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)
PROMPTS = {"a": [5, 17, 300, 42, 7], "b": [9] * 23, "c": [1, 2, 3], "d": list(range(40, 77))}


def make_engine(model_dir, overlap: bool = True, **limits):
    options = dict(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                   attention_backend="triton", disable_overlap_schedule=not overlap)
    options.update(limits)
    return build_colocated_engine(str(model_dir), torch.float32, "cpu", limits=EngineLimits(**options))


def run(engine, prompts: dict[str, list[int]], params=GREEDY, events: dict[int, tuple] | None = None):
    """Serve ``prompts`` to the end; ``events``: step number → ("add", id, prompt) or ("abort", id), done
    before that ``step()`` call. Returns (tokens per request, final output per request)."""
    tokens: dict[str, list[int]] = {}
    finals = {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
        tokens[rid] = []
    events = dict(events or {})
    call = 0
    while engine.has_work or events:
        event = events.pop(call, None)
        if event is not None and event[0] == "add":
            engine.add_request(event[1], event[2], params)
            tokens[event[1]] = []
        elif event is not None:
            engine.abort(event[1])
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
        call += 1
    return tokens, finals


def assert_all_freed(engine):
    assert engine.kv_cache.allocator.num_free == engine.limits.num_kv_blocks
    assert len(engine.runner._free_rows) == engine.runner.num_rows


def test_decode_steps_are_launched_ahead_and_tokens_are_unchanged(tiny_model):
    want, _ = run(make_engine(tiny_model, overlap=False), PROMPTS)
    engine = make_engine(tiny_model)
    assert engine.overlap
    got, finals = run(engine, PROMPTS)
    assert got == want
    assert all(len(t) == GREEDY.max_new_tokens for t in got.values())
    assert all(f.finish_reason == FinishReason.LENGTH for f in finals.values())
    # 7 new tokens: the prompts' step, then decode steps; all but the last ones are launched ahead
    assert engine.num_steps_ahead >= GREEDY.max_new_tokens - 3
    assert not any(t < 0 for seq_tokens in got.values() for t in seq_tokens)
    assert_all_freed(engine)


def test_the_overlap_schedule_can_be_turned_off(tiny_model):
    engine = make_engine(tiny_model, overlap=False)
    run(engine, PROMPTS)
    assert not engine.overlap and engine.num_steps_ahead == 0


def test_a_stop_token_met_while_the_next_step_runs_drops_that_steps_token(tiny_model):
    """The step after a stop token was already launched for that sequence: its token must not reach the
    output, and the sequence's blocks and row are freed."""
    free, _ = run(make_engine(tiny_model, overlap=False), PROMPTS)
    stop = free["a"][2]
    params = SamplingParams(temperature=0, max_new_tokens=7, stop_token_ids=[stop])
    want, want_finals = run(make_engine(tiny_model, overlap=False), PROMPTS, params)
    engine = make_engine(tiny_model)
    got, finals = run(engine, PROMPTS, params)
    assert got == want
    assert got["a"][-1] == stop and len(got["a"]) <= 3
    assert {k: (f.finish_reason, f.matched_stop_token) for k, f in finals.items()} == \
        {k: (f.finish_reason, f.matched_stop_token) for k, f in want_finals.items()}
    assert engine.num_steps_ahead > 0
    assert_all_freed(engine)


def test_arrivals_and_aborts_between_steps(tiny_model):
    """A request arriving mid-decode stops the launching ahead until it is admitted; an abort while a
    step ahead runs drops that step's token. Tokens are what the engine without overlap gives."""
    events = {3: ("add", "late", [7, 7, 8, 9]), 5: ("abort", "b")}
    want, want_finals = run(make_engine(tiny_model, overlap=False), PROMPTS, events=events)
    engine = make_engine(tiny_model)
    got, finals = run(engine, PROMPTS, events=events)
    assert finals["b"].finish_reason == FinishReason.ABORT
    assert {k: v for k, v in got.items() if k != "b"} == {k: v for k, v in want.items() if k != "b"}
    # the abort lands after a step that was launched ahead: "b" has at most the tokens of that step more
    assert got["b"] == want["b"][:len(got["b"])] and len(got["b"]) >= len(want["b"]) - 1
    assert len(got["late"]) == GREEDY.max_new_tokens
    assert engine.num_steps_ahead > 0
    assert_all_freed(engine)


def test_seeded_sampling_and_repetition_penalty_draw_the_same_tokens(tiny_model, monkeypatch):
    """The placeholders' positions key the sampler's noise exactly as the real tokens would."""
    from epserve.kernels import sampling

    monkeypatch.setattr(sampling, "GATHER", 32)      # the interpreter sorts slowly (as test_sampling.py does)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=1234,
                            max_new_tokens=4, ignore_eos=True)
    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    want, _ = run(make_engine(tiny_model, overlap=False), prompts, params)
    engine = make_engine(tiny_model)
    assert run(engine, prompts, params)[0] == want
    assert engine.num_steps_ahead > 0


def test_a_logprob_request_runs_its_steps_one_at_a_time(tiny_model):
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, return_logprob=True,
                            top_logprobs_num=2)
    prompts = {k: PROMPTS[k] for k in ("a", "b")}
    want, want_finals = run(make_engine(tiny_model, overlap=False), prompts, params)
    engine = make_engine(tiny_model)
    got, finals = run(engine, prompts, params)
    assert got == want and engine.num_steps_ahead == 0


def test_the_kv_cache_full_stops_launching_ahead_instead_of_preempting(tiny_model):
    """Too few blocks for every sequence's next position: the step is scheduled the ordinary way, which
    preempts; the tokens are unchanged."""
    want, _ = run(make_engine(tiny_model, overlap=False, num_kv_blocks=20), PROMPTS)
    engine = make_engine(tiny_model, num_kv_blocks=20)
    got, _ = run(engine, PROMPTS)
    assert got == want
    assert engine.scheduler.num_preemptions > 0
    assert_all_freed(engine)


class FailingLaunches:
    """The engine's GPU runner, raising ``error`` from every launch or run of a step holding ``poison_id``
    after ``after`` such launches."""

    def __init__(self, runner, error: Exception, poison_id: str, after: int) -> None:
        self.runner, self.error, self.poison_id, self.after = runner, error, poison_id, after
        self.calls = 0

    def _check(self, chunks) -> None:
        if any(c.seq.request_id == self.poison_id for c in chunks):
            self.calls += 1
            if self.calls > self.after:
                raise self.error

    def launch(self, chunks, expert_map, previous=None):
        self._check(chunks)
        return self.runner.launch(chunks, expert_map, previous)

    def run(self, chunks, expert_map):
        self._check(chunks)
        return self.runner.run(chunks, expert_map)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_a_request_failing_in_a_step_launched_ahead_fails_alone(tiny_model):
    prompts = {k: PROMPTS[k] for k in ("a", "c", "d")}
    want, _ = run(make_engine(tiny_model, overlap=False), {k: v for k, v in prompts.items() if k != "c"})
    engine = make_engine(tiny_model)
    failing = FailingLaunches(engine.runner, RuntimeError("probability tensor contains nan"), "c", after=3)
    engine.runner = failing
    got, finals = run(engine, prompts)
    assert finals["c"].finish_reason == FinishReason.ABORT and "probability tensor contains nan" in finals["c"].error
    assert {k: got[k] for k in want} == want
    assert engine.num_steps_ahead > 0
    engine.runner = failing.runner
    assert_all_freed(engine)


def test_expert_load_windows_count_every_token_once_while_steps_run_ahead(tiny_model):
    """A ``stat`` recorder (every attention worker has one) keeps the overlap schedule: its window counts
    each real token's choices once. Records that must be exact per pass turn the schedule off."""
    from epserve.attention_worker.expert_recorder import RecorderMode

    limits = EngineLimits(num_kv_blocks=64, kv_block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                          attention_backend="triton")
    engine = build_colocated_engine(str(tiny_model), torch.float32, "cpu", limits=limits,
                                    recorder_mode=RecorderMode.STAT)
    assert engine.overlap
    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    run(engine, prompts, params)
    assert engine.num_steps_ahead > 0
    window, _, _ = engine.recorder.take_window()
    spec = engine.model.spec
    tokens = sum(len(p) for p in prompts.values()) + len(prompts) * (params.max_new_tokens - 1)
    assert window.sum().item() == tokens * spec.num_experts_per_tok * spec.num_moe_layers
    per_pass = build_colocated_engine(str(tiny_model), torch.float32, "cpu", limits=limits,
                                      recorder_mode=RecorderMode.PER_PASS)
    assert not per_pass.overlap


class StaleExpertSide:
    """Stands in for an expert worker that does not hold the step's map version yet, at the given launches
    (counted from 1, every launch of the runner's): what it returns then — zero partials — makes that
    step's logits garbage (here: every row's mass on token ``garbage``, sampled and, with a repetition
    penalty, marked seen), and the step's check (``end_step``) raises StaleMapVersion, as
    ``StepExperts`` does after reading the worker's status."""

    def __init__(self, runner, stale: set[int], garbage: int) -> None:
        from epserve.dataplane.base import StaleMapVersion

        self.stale, self.launches, self.garbage = stale, 0, garbage
        end_step, sample = runner.executor.end_step, runner.sampler.sample_on_device

        def stale_end_step():
            self.launches += 1
            if self.launches not in self.stale:
                return end_step()
            launch = self.launches

            def check() -> None:
                raise StaleMapVersion(f"launch {launch}: expert rank 1 does not hold map version 1",
                                      requested=1, held_versions=(0,), peer_rank=1)
            return check

        def garbage_sample(logits, seqs):
            if self.launches in self.stale:
                logits = torch.full_like(logits, -30.0)
                logits[:, self.garbage] = 30.0
            return sample(logits, seqs)

        runner.executor.end_step, runner.sampler.sample_on_device = stale_end_step, garbage_sample


def test_a_stale_step_runs_again_and_the_step_launched_ahead_of_it_is_undone(tiny_model, monkeypatch):
    """Launch 3 is stale: the step launched ahead of it (launch 4) read its garbage tokens, so it is waited
    out and undone (placeholder, cached count, KV blocks), and step 3 runs again — stale once more (launch
    5), so the runner repeats it (launch 6). Seeded sampling with a repetition penalty draws the tokens of
    a run without any of this: the garbage tokens marked seen are forgotten (the garbage is a token the
    run samples last, which a penalty for having seen it would change)."""
    from epserve.kernels import sampling

    monkeypatch.setattr(sampling, "GATHER", 32)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=3.0, seed=99,
                            max_new_tokens=5, ignore_eos=True)
    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    want, _ = run(make_engine(tiny_model, overlap=False), prompts, params)
    engine = make_engine(tiny_model)
    side = StaleExpertSide(engine.runner, stale={3, 5}, garbage=want["a"][-1])
    got, finals = run(engine, prompts, params)
    assert got == want
    assert all(f.finish_reason == FinishReason.LENGTH for f in finals.values())
    assert side.launches >= 7 and engine.num_steps_ahead > 0
    assert not any(t < 0 for tokens in got.values() for t in tokens)
    assert_all_freed(engine)


def test_a_request_aborted_while_its_stale_step_ran_is_not_run_again(tiny_model, caplog):
    """Launch 3 is stale and request c is aborted before its tokens are read (its blocks freed, its row given
    back): the step runs again without c — no step of a retired sequence, no request run alone to find
    a culprit — and a's tokens are a run's without faults."""
    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    want, _ = run(make_engine(tiny_model, overlap=False), {"a": PROMPTS["a"]})
    engine = make_engine(tiny_model)
    StaleExpertSide(engine.runner, stale={3}, garbage=want["a"][-1])
    got, finals = run(engine, prompts, events={2: ("abort", "c")})
    assert got["a"] == want["a"]
    assert finals["c"].finish_reason == FinishReason.ABORT
    assert "running each alone" not in caplog.text and "failed on the expert side" in caplog.text
    assert_all_freed(engine)
