"""The gateway's hardening without gRPC (issue 15): the poison-request guard, no retry of bad input,
request ids reusable while a worker still ends the previous request, prompt limits checked before
tokenizing the whole prompt, and tokenization in a helper process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from gateway_testlib import CONTEXT_LENGTH

from epserve.gateway.config import GatewayConfig
from epserve.gateway.errors import GatewayError
from epserve.status_error import StatusCode
from epserve.model_config import load_model_spec
from epserve.gateway.prompt_tokenizer import PIECE_CHARS, PromptTokenizer, encode_limited
from epserve.gateway.request_manager import MAX_REQUEST_ID_CHARS, RequestManager
from epserve.gateway.request_types import GenerateInput, SamplingRequest
from epserve.sampling import FinishReason
from epserve.gateway.router import Router
from epserve.gateway.worker_api import WorkerFailed, WorkerLost, WorkerRequest, WorkerStep


class Stream:
    def __init__(self, steps: list[WorkerStep], error: Exception | None) -> None:
        self.steps, self.error = steps, error

    def __iter__(self) -> Iterator[WorkerStep]:
        yield from self.steps
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        pass


class Worker:
    """Answers each generate with the next of ``errors`` (None = serve ``tokens``)."""

    def __init__(self, address: str, errors: list[Exception | None], tokens=(7, 8)) -> None:
        self.address, self.errors, self.tokens = address, list(errors), tokens
        self.requests: list[WorkerRequest] = []
        self.aborts: list[str] = []

    def generate(self, request: WorkerRequest, timeout_s: float) -> Stream:
        self.requests.append(request)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            return Stream([], error)
        steps = [WorkerStep((t,)) for t in self.tokens[:-1]]
        return Stream(steps + [WorkerStep((self.tokens[-1],), True, FinishReason.LENGTH)], None)

    def abort(self, request_id: str) -> bool:
        self.aborts.append(request_id)
        return True

    def abort_nowait(self, request_id: str) -> None:
        self.aborts.append(request_id)


class Directory:
    def __init__(self, *workers: Worker) -> None:
        self.workers = {w.address: w for w in workers}
        self.lost: list[str] = []

    def reachable(self) -> list[str]:
        return [a for a in self.workers if a not in self.lost]

    def client(self, address: str) -> Worker:
        return self.workers[address]

    def mark_lost(self, address: str, reason: str) -> None:
        self.lost.append(address)


@pytest.fixture
def make_manager(gateway_model_dir, gateway_tokenizer):
    def make(*workers: Worker, **config) -> RequestManager:
        cfg = GatewayConfig(model_path=str(gateway_model_dir), attention_workers=("127.0.0.1:1",), **config)
        return RequestManager(cfg, gateway_tokenizer, load_model_spec(gateway_model_dir), Directory(*workers),
                              Router())
    return make


def run(manager: RequestManager, request_id: str = "r1", **inp):
    inp.setdefault("token_ids", (1, 2))
    return list(manager.submit(GenerateInput(request_id, sampling=SamplingRequest(max_new_tokens=2), **inp)).outputs())


def test_poison_request_stops_after_two_workers(make_manager):
    crash = WorkerFailed("INTERNAL", "the attention worker failed this request: RuntimeError: nan")
    workers = [Worker(f"w{i}", [crash]) for i in range(3)]
    manager = make_manager(*workers)
    with pytest.raises(GatewayError) as info:
        run(manager)
    assert info.value.code == StatusCode.INTERNAL and "--max-worker-failures" in info.value.message
    assert sum(len(w.requests) for w in workers) == 2            # never sent to a third worker
    assert manager.num_running == 0


def test_lost_and_failed_workers_both_count(make_manager):
    """Whichever comes first: without the lost one counting, running out of workers would be UNAVAILABLE."""
    workers = [Worker("w0", [WorkerLost("stream cut")]), Worker("w1", [WorkerFailed("INTERNAL", "boom")])]
    with pytest.raises(GatewayError) as info:
        run(make_manager(*workers))
    assert info.value.code == StatusCode.INTERNAL and "2 attention workers" in info.value.message


def test_one_failure_is_retried_on_another_worker(make_manager):
    workers = [Worker("w0", [WorkerFailed("INTERNAL", "boom")]), Worker("w1", [])]
    outputs = run(make_manager(*workers))
    assert outputs[-1].finished and [t for o in outputs for t in o.token_ids] == [7, 8]


def test_bad_input_at_the_worker_is_not_retried(make_manager):
    workers = [Worker("w0", [WorkerFailed("INVALID_ARGUMENT", "prompt_ids holds ids outside")]), Worker("w1", [])]
    with pytest.raises(GatewayError) as info:
        run(make_manager(*workers))
    assert info.value.code == StatusCode.INVALID_ARGUMENT and "prompt_ids" in info.value.message
    assert len(workers[1].requests) == 0


def test_a_worker_still_holding_the_id_gets_a_fresh_one(make_manager):
    worker = Worker("w0", [WorkerFailed("ALREADY_EXISTS", "request_id 'r1' is already running")])
    outputs = run(make_manager(worker))
    assert outputs[-1].finished and outputs[-1].request_id == "r1"
    first, second = worker.requests
    assert first.request_id == "r1" and second.request_id.startswith("r1~") and len(second.request_id) > 3


def test_request_id_length_is_bounded(make_manager):
    with pytest.raises(GatewayError) as info:
        run(make_manager(Worker("w0", [])), request_id="x" * (MAX_REQUEST_ID_CHARS + 1))
    assert info.value.code == StatusCode.INVALID_ARGUMENT and len(info.value.message) < 200


def test_prompt_bytes_limit_before_tokenizing(make_manager):
    manager = make_manager(Worker("w0", []), max_prompt_bytes=1000, max_message_bytes=1 << 20)
    for text in ("x" * 1001, "日" * 400):           # 1001 characters; 400 characters but 1200 bytes
        with pytest.raises(GatewayError) as info:
            run(manager, text=text, token_ids=None)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED and "--max-prompt-bytes" in info.value.message


def test_long_prompt_is_refused_from_a_prefix(gateway_tokenizer):
    calls: list[int] = []

    class Counting:
        def encode(self, text):
            calls.append(len(text))
            return gateway_tokenizer.encode(text)

    text = "hello world " * 100_000            # 1.2 M characters, far over a 511-token context
    ids, counted = encode_limited(Counting(), text, CONTEXT_LENGTH - 1)
    assert ids is None and counted > CONTEXT_LENGTH
    assert sum(calls) <= PIECE_CHARS                 # one piece was enough to know
    short = "hello world " * 10
    assert encode_limited(gateway_tokenizer, short, CONTEXT_LENGTH - 1)[0] == gateway_tokenizer.encode(short)


def test_piecewise_count_matches_whole_tokenization(gateway_tokenizer):
    """Just under the limit in tokens, over PIECE_CHARS in characters: accepted, ids exact."""
    text = ("héllo wörld 日本語 " * 20_000)
    whole = gateway_tokenizer.encode(text)
    ids, counted = encode_limited(gateway_tokenizer, text, len(whole))
    assert ids == whole and counted == len(whole)


def test_tokenizing_in_a_helper_process_does_not_hold_this_process(gateway_model_dir, gateway_tokenizer):
    prompts = PromptTokenizer(str(gateway_model_dir), gateway_tokenizer, max_tokens=10**7,
                              max_prompt_bytes=8 << 20, max_pending=4, num_processes=1)
    try:
        text = "the quick brown fox jumps over the lazy dog " * 20_000       # ~0.9 MB
        assert prompts.encode(text, timeout_s=120) == gateway_tokenizer.encode(text)    # (starts the helper)
        ticks = []
        stop = threading.Event()

        def tick():
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.002)

        ticker = threading.Thread(target=tick)
        ticker.start()
        started = time.perf_counter()
        prompts.encode(text * 2, timeout_s=120)
        took = time.perf_counter() - started
        stop.set()
        ticker.join()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert took > 0.2 and max(gaps) < 0.1, (took, max(gaps))        # this thread's neighbours kept running
    finally:
        prompts.close()


def test_pending_prompt_limit(gateway_model_dir, gateway_tokenizer):
    prompts = PromptTokenizer(str(gateway_model_dir), gateway_tokenizer, max_tokens=10**7,
                              max_prompt_bytes=8 << 20, max_pending=1, num_processes=0)
    gate = threading.Event()

    class Slow:
        def encode(self, text):
            gate.wait(10)
            return [1]

    prompts._tokenizer = Slow()
    worker = threading.Thread(target=prompts.encode, args=("a",))
    worker.start()
    time.sleep(0.1)
    with pytest.raises(GatewayError) as info:
        prompts.encode("b")
    gate.set()
    worker.join()
    assert info.value.code == StatusCode.RESOURCE_EXHAUSTED and "--max-pending-prompts" in info.value.message


def test_a_restarted_placement_listing_nobody_does_not_empty_the_pool(gateway_model_dir):
    from epserve.gateway.discovery import DiscoveredWorkers
    from epserve.gateway.worker_api import WorkerLoad
    from epserve.gateway.worker_pool import WorkerPool

    a, b = "10.0.0.1:1", "10.0.0.2:1"
    lists = [(a, b), (), (b,), (b,)]

    class Discovery:
        def list_workers(self):
            return DiscoveredWorkers(lists.pop(0), 2)

        def close(self):
            pass

    answering = {a, b}
    config = GatewayConfig(model_path=str(gateway_model_dir), placement="127.0.0.1:1")
    pool = WorkerPool(config, Router(), Discovery(), on_health=lambda healthy: None)
    pool._probe = lambda address: WorkerLoad(0, 0, 0) if address in answering else None
    pool.refresh()
    assert pool.reachable() == [a, b]
    pool.refresh()                                  # placement restarted: it lists nobody yet
    assert pool.reachable() == [a, b]
    answering.discard(a)                            # one worker really went away
    pool.refresh()
    pool.refresh()
    assert pool.known() == (b,) and pool.reachable() == [b]
    pool.close()
