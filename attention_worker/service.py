"""gRPC servicer of ``epserve.v1.AttentionWorker``: proto ↔ engine requests at the edge.

A Generate call submits to the ``EngineLoop`` and streams that request's outputs; when the
call ends for any reason (client cancel, deadline, gateway gone) the request is aborted so
its KV blocks are freed. Bad fields → INVALID_ARGUMENT naming the field; a request the
engine cannot hold → RESOURCE_EXHAUSTED; an id already running here → ALREADY_EXISTS; not
ready → UNAVAILABLE.

DumpExpertDistribution writes the engine's expert-load recorder to a file (``expert_dump.py``)
on its gRPC thread; the engine keeps stepping meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections.abc import Callable, Iterator

import grpc

from epserve.attention_worker.engine import StepOutput
from epserve.attention_worker.engine_loop import EngineLoop
from epserve.attention_worker.expert_dump import DumpRejected, dump_expert_distribution
from epserve.grpc_server import abort_with
from epserve.protos import generation_pb2, worker_pb2, worker_pb2_grpc
from epserve.sampling import logprob_to_proto, sampling_from_proto
from epserve.status_error import StatusError

logger = logging.getLogger(__name__)

class AttentionWorkerService(worker_pb2_grpc.AttentionWorkerServicer):
    """``trace_context``: the current span's context (``Tracing.current_trace_context``), taken
    when Generate adds a request so the engine can trace it under the RPC's SERVER span."""

    def __init__(self, worker_id: str, vocab_size: int, loop_provider: Callable[[], EngineLoop | None],
                 trace_context: Callable[[], bytes] = lambda: b"", stream_interval: int = 1) -> None:
        self.worker_id = worker_id
        self.vocab_size = vocab_size
        self._loop = loop_provider
        self._trace_context = trace_context
        self.stream_interval = stream_interval

    def _ready_loop(self, context: grpc.ServicerContext) -> EngineLoop:
        loop = self._loop()
        if loop is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "attention worker is not ready (waiting for the expert map)")
        return loop

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[worker_pb2.WorkerGenerateResponse]:
        loop = self._ready_loop(context)
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt_ids holds ids outside [0, {self.vocab_size}): {bad[:5]}")
        try:
            params = sampling_from_proto(request.sampling)
            stream = loop.submit(request.request_id, list(request.prompt_ids), params,
                                 request.num_generated_before, self._trace_context())
        except StatusError as exc:      # RequestRejected: RESOURCE_EXHAUSTED; DuplicateRequest: ALREADY_EXISTS
            abort_with(context, exc)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context.add_callback(lambda: loop.abort(request.request_id))
        while True:
            output = self._next_message(stream, context)
            if output is None:
                return
            if output.error:    # this request failed while served; the engine goes on with the others
                context.abort(grpc.StatusCode.INTERNAL, f"the attention worker failed this request: {output.error}")
            yield self._response(output)
            if output.finished:
                return

    def _next_message(self, stream: queue.SimpleQueue[StepOutput], context: grpc.ServicerContext
                      ) -> StepOutput | None:
        """The engine's next outputs for one request, merged into one message: at least
        ``stream_interval`` tokens (or the end), and whatever else is already waiting — a stream that
        fell behind catches up in one message instead of one per token. None: the call ended."""
        merged: StepOutput | None = None
        while True:
            wait = merged is None or len(merged.new_token_ids) < self.stream_interval
            try:
                output = stream.get(timeout=1.0) if wait else stream.get_nowait()
            except queue.Empty:
                if not wait:
                    return merged
                if not context.is_active():
                    return None
                continue
            if output.error:
                return output
            merged = output if merged is None else merge_outputs(merged, output)
            if merged.finished:
                return merged

    @staticmethod
    def _response(output: StepOutput) -> worker_pb2.WorkerGenerateResponse:
        return worker_pb2.WorkerGenerateResponse(
            token_ids=output.new_token_ids, finished=output.finished,
            finish_reason=output.finish_reason or generation_pb2.FINISH_REASON_UNSPECIFIED,
            prompt_tokens=output.num_prompt_tokens, completion_tokens=output.num_generated,
            matched_stop_token=output.matched_stop_token,
            logprobs=[logprob_to_proto(lp) for lp in output.logprobs or ()])

    def Abort(self, request: generation_pb2.AbortRequest, context: grpc.ServicerContext
              ) -> generation_pb2.AbortResponse:
        loop = self._ready_loop(context)
        return generation_pb2.AbortResponse(found=loop.abort(request.request_id))

    def GetLoad(self, request: worker_pb2.GetLoadRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerLoad:
        loop = self._loop()
        if loop is None:
            return worker_pb2.WorkerLoad(worker_id=self.worker_id)
        load = loop.engine.load()
        return worker_pb2.WorkerLoad(worker_id=self.worker_id, map_version=loop.engine.expert_map.version, **load)

    def DumpExpertDistribution(self, request: worker_pb2.DumpExpertDistributionRequest, context: grpc.ServicerContext
                               ) -> worker_pb2.DumpExpertDistributionResponse:
        loop = self._ready_loop(context)
        engine = loop.engine
        if engine.recorder is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine has no expert-load recorder")
        try:
            result = dump_expert_distribution(engine.recorder, request.directory, self.worker_id, engine.expert_map)
        except DumpRejected as exc:
            abort_with(context, exc)
        logger.info("expert distribution dumped to %s (%s, %d passes, %d token records)", result.path, result.mode,
                    result.num_passes, result.num_token_records)
        return worker_pb2.DumpExpertDistributionResponse(
            worker_id=self.worker_id, path=result.path, mode=result.mode, num_passes=result.num_passes,
            num_token_records=result.num_token_records)


def merge_outputs(first: StepOutput, then: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one: the tokens (and logprobs) of both, the rest of the later."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = list(first.logprobs or ()) + list(then.logprobs or ())
    return dataclasses.replace(then, new_token_ids=first.new_token_ids + then.new_token_ids, logprobs=logprobs)
