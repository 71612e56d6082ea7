"""Runs generation requests: the gateway's logic, without gRPC.

Threads: each request's stream runs in the thread of the RPC that iterates
``RequestHandle.outputs()``; ``abort``/``cancel`` come from other threads (the Abort RPC, gRPC's
termination callback when a client goes away, shutdown) and interrupt it by cancelling the
worker stream it is blocked on. One lock guards the table of running requests; each request
has its own lock for its abort state and current worker stream.

Flow of a request:
  submit:   tokenize (text) or take token ids, validate (INVALID_ARGUMENT naming the field),
            lower max_new_tokens to what fits in the context, register the id (ALREADY_EXISTS
            while another request runs under it; a uuid when empty)
  outputs:  route to the reachable worker with the fewest outstanding tokens, stream its token
            ids through an OutputProcessor (UTF-8-safe text, stop strings held back), yield one
            GenerateOutput per worker step and a final one with finish_reason and usage.
            A stop string ends the request here and aborts it at the worker.
            Worker lost (UNAVAILABLE, stream cut): mark it lost, re-submit prompt + tokens
            streamed so far to another worker (num_generated_before, max_new_tokens reduced);
            no worker left -> UNAVAILABLE. A worker refusing with RESOURCE_EXHAUSTED (KV cache
            full) -> try the others, then RESOURCE_EXHAUSTED. Deadline -> DEADLINE_EXCEEDED
            (aborted at the worker). A worker rejecting it with INVALID_ARGUMENT -> the client,
            never retried; failing it with INTERNAL -> another worker. Poison-request guard: a
            request that lost or failed on --max-worker-failures workers (2) is not sent to
            another one (INTERNAL). A worker still ending an earlier request of the same id
            (ALREADY_EXISTS) gets this one under an id of its own (``worker_request_id``).
  abort:    aborts at the worker, cancels the stream; the stream ends with finish_reason ABORT.
  cancel:   the client went away: the same, with nothing more sent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

from epserve.gateway.config import GatewayConfig
from epserve.gateway.errors import GatewayError, ValidationError
from epserve.status_error import StatusCode
from epserve.gateway.observer import NullObserver, RequestObserver
from epserve.gateway.output_processor import OutputProcessor
from epserve.gateway.prompt_tokenizer import PromptTokenizer
from epserve.gateway.request_types import GenerateInput, GenerateOutput, Usage
from epserve.model_config import ModelSpec
from epserve.gateway.router import Router
from epserve.tokenizer import Tokenizer
from epserve.gateway.validation import Limits, effective_max_new_tokens, validate_prompt, validate_sampling
from epserve.sampling import FinishReason, SamplingParams, TokenLogprob
from epserve.gateway.worker_api import (StreamCancelled, WorkerClient, WorkerDirectory, WorkerFailed, WorkerLost,
                                WorkerRequest, WorkerStream, WorkerTimeout)

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256
REUSE_GRACE_S = 2.0          # how long a reused request id waits for its cancelled predecessor to leave
ABORTED = "aborted"        # Abort RPC
CANCELLED = "cancelled"    # the client went away
SHUTDOWN = "shutdown"      # the gateway is stopping


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deadline: float) -> None:
        self.request_id = request_id
        self.worker_request_id = request_id   # the id at the worker: a fresh one when the worker still holds it
        self.prompt_ids = prompt_ids
        self.params = params
        self.deadline = deadline           # time.monotonic()
        self.lock = threading.Lock()
        self.stop_reason: str | None = None
        self.started = False
        self.done = False
        self.worker: WorkerClient | None = None
        self.stream: WorkerStream | None = None

    def attach(self, worker: WorkerClient, stream: WorkerStream) -> bool:
        """Records the current worker stream; False when the request was stopped meanwhile."""
        with self.lock:
            if self.stop_reason is not None:
                return False
            self.worker, self.stream = worker, stream
            return True

    def detach(self) -> None:
        with self.lock:
            self.worker = self.stream = None


class RequestHandle:
    """One submitted request: iterate ``outputs()`` once; ``cancel()`` when the client is gone."""

    def __init__(self, manager: RequestManager, request: _Request) -> None:
        self._manager = manager
        self._request = request

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def outputs(self) -> Iterator[GenerateOutput]:
        return self._manager._run(self._request)

    def cancel(self) -> None:
        self._manager._stop(self._request, CANCELLED, wait=False)


class RequestManager:
    def __init__(self, config: GatewayConfig, tokenizer: Tokenizer, spec: ModelSpec,
                 workers: WorkerDirectory, router: Router, observer: RequestObserver | None = None) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._workers = workers
        self._router = router
        self._observer = observer or NullObserver()
        self.limits = Limits(vocab_size=spec.vocab_size, max_context_length=spec.max_position_embeddings,
                             max_new_tokens_limit=config.max_new_tokens_limit)
        self._prompts = PromptTokenizer(config.model_path, tokenizer, spec.max_position_embeddings - 1,
                                        config.max_prompt_bytes, config.max_pending_prompts,
                                        config.tokenizer_processes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._requests: dict[str, _Request] = {}
        self._accepting = True

    @property
    def num_running(self) -> int:
        with self._lock:
            return len(self._requests)

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    def submit(self, inp: GenerateInput, timeout_s: float | None = None) -> RequestHandle:
        """Validates and registers a request; raises GatewayError. ``timeout_s``: the client's
        deadline, if any (the request's deadline is the sooner of it and --request-timeout-s)."""
        try:
            request = self._register(inp, timeout_s)
        except GatewayError as exc:
            self._observer.on_reject(exc.code.value)
            raise
        self._observer.on_start(request.request_id, len(request.prompt_ids))
        return RequestHandle(self, request)

    def _register(self, inp: GenerateInput, timeout_s: float | None) -> _Request:
        if len(inp.request_id) > MAX_REQUEST_ID_CHARS:
            raise ValidationError("request_id", f"is {len(inp.request_id)} characters long; at most "
                                                f"{MAX_REQUEST_ID_CHARS}")
        prompt_ids = self._prompt_ids(inp, timeout_s)
        params = validate_sampling(inp.sampling, self.limits)
        params = replace(params, max_new_tokens=effective_max_new_tokens(
            len(prompt_ids), params.max_new_tokens, self.limits))
        timeout = self._config.request_timeout_s if timeout_s is None else min(timeout_s,
                                                                               self._config.request_timeout_s)
        request_id = inp.request_id or self.new_request_id()
        request = _Request(request_id, prompt_ids, params, time.monotonic() + timeout)
        with self._idle:
            if not self._accepting:
                raise GatewayError(StatusCode.UNAVAILABLE, "the gateway is shutting down")
            # A client that cancelled a stream and at once reuses its id can arrive before the
            # cancellation has reached this manager: give the old request a moment to leave.
            self._idle.wait_for(lambda: request_id not in self._requests, timeout=REUSE_GRACE_S)
            if request_id in self._requests:
                raise GatewayError(StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running")
            if len(self._requests) >= self._config.max_concurrent_requests:
                raise GatewayError(StatusCode.RESOURCE_EXHAUSTED,
                                   f"{len(self._requests)} requests are running, the gateway's limit "
                                   f"(--max-concurrent-requests); retry later")
            self._requests[request_id] = request
        return request

    def _prompt_ids(self, inp: GenerateInput, timeout_s: float | None = None) -> list[int]:
        if (inp.text is None) == (inp.token_ids is None):
            raise ValidationError("input", "set exactly one of text and token_ids")
        if inp.text is not None:
            if not inp.text:
                raise ValidationError("text", "the prompt is empty")
            ids = self._prompts.encode(inp.text, timeout_s)   # limits; long prompts off this thread
            validate_prompt("text", ids, self.limits)
        else:
            ids = list(inp.token_ids or ())
            validate_prompt("token_ids", ids, self.limits)
        return ids

    def abort(self, request_id: str) -> bool:
        """Aborts a running request (at its worker too); False when no such request runs."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is None:
            return False
        self._stop(request, ABORTED, wait=True)
        return True

    def close(self) -> None:
        """Stops the tokenizer processes (after the last request)."""
        self._prompts.close()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request runs; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._requests, timeout=timeout_s)

    def abort_all(self) -> int:
        """Aborts every running request (shutdown); returns how many."""
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            self._stop(request, SHUTDOWN, wait=False)
        return len(requests)

    def _stop(self, request: _Request, reason: str, wait: bool) -> None:
        with request.lock:
            if request.done or request.stop_reason is not None:
                return
            request.stop_reason = reason
            worker, stream, started = request.worker, request.stream, request.started
            if not started and reason == CANCELLED:
                request.done = True          # outputs() will never run
        if not started and reason == CANCELLED:
            self._unregister(request)
            self._observer.on_finish(request.request_id, FinishReason.ABORT, Usage(len(request.prompt_ids), 0),
                                     None, "CANCELLED")
            return
        if worker is not None and stream is not None:
            if wait:
                worker.abort(request.worker_request_id)
            else:
                worker.abort_nowait(request.worker_request_id)
            stream.cancel()

    def _unregister(self, request: _Request) -> None:
        self._router.release(request.request_id)
        with self._idle:
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]
            self._idle.notify_all()

    def _run(self, request: _Request) -> Iterator[GenerateOutput]:
        with request.lock:
            if request.done or request.started:
                return
            request.started = True
        finish: FinishReason | None = None
        error: GatewayError | None = None
        processor = OutputProcessor(self._tokenizer, request.params.stop)
        try:
            for output in self._stream(request, processor):
                finish = output.finish_reason
                yield output
        except GatewayError as exc:
            error = exc
            raise
        except GeneratorExit:  # the consumer stopped iterating: free the request at its worker
            self._stop(request, CANCELLED, wait=False)
            raise
        finally:
            with request.lock:
                request.done = True
            self._unregister(request)
            if finish is None and error is None:
                finish = FinishReason.ABORT
            code = (error.code.value if error is not None
                    else "CANCELLED" if request.stop_reason == CANCELLED else "OK")
            self._observer.on_finish(request.request_id, finish,
                                     Usage(len(request.prompt_ids), len(processor.completion_ids)),
                                     error.message if error is not None else None, code)

    def _final(self, request: _Request, processor: OutputProcessor, text: str, token_ids: tuple[int, ...],
               reason: FinishReason, matched_stop: str = "", logprobs: tuple[TokenLogprob, ...] = (),
               matched_stop_token: int | None = None) -> GenerateOutput:
        return GenerateOutput(request.request_id, text, token_ids, finished=True, finish_reason=reason,
                              usage=Usage(len(request.prompt_ids), len(processor.completion_ids)),
                              matched_stop=matched_stop, matched_stop_token=matched_stop_token, logprobs=logprobs)

    def _stream(self, request: _Request, processor: OutputProcessor) -> Iterator[GenerateOutput]:
        request_id, params = request.request_id, request.params
        lost: list[str] = []        # workers this request lost (at most --max-retries + 1)
        full: list[str] = []        # workers that refused it with RESOURCE_EXHAUSTED
        failed: list[str] = []      # workers that failed it (INTERNAL): with ``lost``, the poison-request guard
        while True:
            if request.stop_reason is not None:
                if request.stop_reason != CANCELLED:
                    yield self._final(request, processor, processor.finish().text, (), FinishReason.ABORT)
                return
            remaining_s = request.deadline - time.monotonic()
            if remaining_s <= 0:
                raise GatewayError(StatusCode.DEADLINE_EXCEEDED, f"request {request_id} passed its deadline")
            generated = processor.completion_ids
            worker_request = WorkerRequest(
                request.worker_request_id, tuple(request.prompt_ids + generated),
                replace(params, max_new_tokens=params.max_new_tokens - len(generated)), len(generated))
            candidates = [a for a in self._workers.reachable() if a not in lost and a not in full and a not in failed]
            address = self._router.route(request_id, candidates, len(worker_request.prompt_ids)
                                         + worker_request.sampling.max_new_tokens)
            if address is None:
                if full:
                    raise GatewayError(StatusCode.RESOURCE_EXHAUSTED, f"every attention worker is full "
                                       f"({', '.join(full)}); retry later or lower max_new_tokens")
                detail = f"; lost during this request: {', '.join(lost)}" if lost else ""
                raise GatewayError(StatusCode.UNAVAILABLE, f"no attention worker is available{detail}")
            if lost:
                logger.info("request %s: re-submitting to %s with %d tokens generated", request_id, address,
                            len(generated))
            worker = self._workers.client(address)
            try:
                stream = worker.generate(worker_request, timeout_s=remaining_s)
                if not request.attach(worker, stream):
                    worker.abort_nowait(worker_request.request_id)
                    stream.cancel()
                    continue  # the loop's top sends the ABORT message
                yield from self._relay(request, processor, worker, stream)
                return
            except StreamCancelled:
                if request.stop_reason is None:  # not ours after all: treat as a lost worker
                    raise GatewayError(StatusCode.INTERNAL, f"stream from {address} cancelled unexpectedly")
                continue
            except WorkerLost as exc:
                request.detach()
                worker.abort_nowait(worker_request.request_id)  # in case it still runs there
                self._workers.mark_lost(address, str(exc))
                lost.append(address)
                self._check_poison(request_id, lost, failed, exc)
                if len(lost) > self._config.max_retries:
                    raise GatewayError(StatusCode.UNAVAILABLE, f"request {request_id} lost its attention worker "
                                       f"{len(lost)} times ({', '.join(lost)}); giving up") from exc
                logger.warning("request %s: attention worker %s lost after %d tokens: %s",
                               request_id, address, len(processor.completion_ids), exc)
                self._observer.on_retry(request_id, address)
            except WorkerTimeout as exc:
                worker.abort_nowait(worker_request.request_id)
                raise GatewayError(StatusCode.DEADLINE_EXCEEDED,
                                   f"request {request_id} passed its deadline waiting on {address}") from exc
            except WorkerFailed as exc:
                request.detach()
                if exc.code == StatusCode.RESOURCE_EXHAUSTED:
                    logger.info("request %s: attention worker %s is full: %s", request_id, address, exc.message)
                    full.append(address)
                    continue
                if exc.code == StatusCode.INVALID_ARGUMENT:      # bad input is bad on every worker: no retry
                    raise GatewayError(StatusCode.INVALID_ARGUMENT, exc.message) from exc
                if exc.code == StatusCode.ALREADY_EXISTS and request.worker_request_id == request_id:
                    # the worker still ends the previous request of this id (a stop or cancel a moment
                    # ago): this one runs under an id of its own there
                    request.worker_request_id = f"{request_id}~{uuid.uuid4().hex[:8]}"
                    continue
                failed.append(address)
                logger.warning("request %s: attention worker %s failed it: %s", request_id, address, exc)
                self._check_poison(request_id, lost, failed, exc)
                self._observer.on_retry(request_id, address)

    def _check_poison(self, request_id: str, lost: list[str], failed: list[str], exc: Exception) -> None:
        """The poison-request guard: a request that broke --max-worker-failures workers (their stream
        cut, or failed with INTERNAL) is not sent to another one."""
        broken = list(dict.fromkeys(lost + failed))
        if len(broken) >= self._config.max_worker_failures:
            raise GatewayError(StatusCode.INTERNAL, f"request {request_id} failed on {len(broken)} attention workers "
                               f"({', '.join(broken)}); not retried on another (--max-worker-failures): "
                               f"{str(exc)[:300]}") from exc

    def _relay(self, request: _Request, processor: OutputProcessor, worker: WorkerClient,
               stream: WorkerStream) -> Iterator[GenerateOutput]:
        """Streams one worker's steps to the client until the request finishes. Raises what the
        worker stream raises; ending without a finished step means the worker was lost."""
        request_id, worker_request_id = request.request_id, request.worker_request_id
        for step in stream:
            if step.token_ids:
                self._router.consume(request_id, len(step.token_ids))
                self._observer.on_tokens(request_id, len(step.token_ids))
            processed = processor.add(step.token_ids)
            if processed.matched_stop is not None:      # ids past the one completing it are not the client's
                worker.abort_nowait(worker_request_id)
                stream.cancel()
                yield self._final(request, processor, processed.text, step.token_ids[:processed.consumed],
                                  FinishReason.STOP, processed.matched_stop, step.logprobs[:processed.consumed])
                return
            overran = len(processor.completion_ids) >= request.params.max_new_tokens and not step.finished
            if step.finished or overran:
                if overran:  # the worker should have finished: do it here
                    worker.abort_nowait(worker_request_id)
                    stream.cancel()
                tail = processor.finish()
                stop_token = None
                if tail.matched_stop is not None:
                    reason, matched = FinishReason.STOP, tail.matched_stop
                elif overran:
                    reason, matched = FinishReason.LENGTH, ""
                else:
                    reason, matched, stop_token = step.finish_reason or FinishReason.STOP, "", step.matched_stop_token
                yield self._final(request, processor, processed.text + tail.text, step.token_ids, reason, matched,
                                  step.logprobs, stop_token)
                return
            if processed.text or step.token_ids:
                yield GenerateOutput(request_id, processed.text, step.token_ids, logprobs=step.logprobs)
        raise WorkerLost(f"the stream from {worker.address} ended without a final message")
