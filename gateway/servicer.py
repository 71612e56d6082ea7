"""The public ``epserve.v1.Generation`` servicer: proto <-> gateway dataclasses, errors -> status
codes; all logic is in RequestManager. A Generate stream is cancelled at the worker when the
client goes away (gRPC's termination callback).

Tracing: Generate runs inside a ``gateway.request`` span (child of the RPC's SERVER span from
the interceptor); the worker call is made inside it, so the attention worker's spans are its
children, and the observer adds the request's outcome to it."""

from __future__ import annotations

from opentelemetry import trace

from epserve.grpc_server import abort_with
from epserve.telemetry import Tracing

from epserve.gateway.errors import GatewayError
from epserve.status_error import StatusCode
from epserve.gateway.request_manager import RequestManager
from epserve.gateway.request_types import GenerateInput, GenerateOutput, SamplingRequest
from epserve.gateway.worker_pool import WorkerPool
from epserve.model_config import ModelSpec
from epserve.protos import generation_pb2, generation_pb2_grpc
from epserve.sampling import logprob_to_proto


SERVER_ERRORS = (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.INTERNAL)  # span status ERROR


def sampling_from_proto(proto: generation_pb2.SamplingParams) -> SamplingRequest:
    def get(name: str):
        return getattr(proto, name) if proto.HasField(name) else None

    return SamplingRequest(
        temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"), min_p=get("min_p"),
        repetition_penalty=get("repetition_penalty"), seed=get("seed"), max_new_tokens=get("max_new_tokens"),
        stop=tuple(proto.stop), stop_token_ids=tuple(proto.stop_token_ids), ignore_eos=proto.ignore_eos,
        return_logprob=proto.return_logprob, top_logprobs_num=proto.top_logprobs_num)


def input_from_proto(request: generation_pb2.GenerateRequest, request_id: str) -> GenerateInput:
    which = request.WhichOneof("input")
    return GenerateInput(
        request_id=request_id,
        text=request.text if which == "text" else None,
        token_ids=tuple(request.token_ids.ids) if which == "token_ids" else None,
        sampling=sampling_from_proto(request.sampling))


def output_to_proto(output: GenerateOutput) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(
        request_id=output.request_id, text=output.text, token_ids=list(output.token_ids),
        finished=output.finished, matched_stop=output.matched_stop, matched_stop_token=output.matched_stop_token,
        logprobs=[logprob_to_proto(lp) for lp in output.logprobs])
    if output.finish_reason is not None:
        response.finish_reason = int(output.finish_reason)
    if output.usage is not None:
        response.usage.prompt_tokens = output.usage.prompt_tokens
        response.usage.completion_tokens = output.usage.completion_tokens
    return response


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, manager: RequestManager, spec: ModelSpec, pool: WorkerPool, tracing: Tracing) -> None:
        self._manager = manager
        self._spec = spec
        self._pool = pool
        self._tracing = tracing

    def Generate(self, request, context):
        request_id = request.request_id or self._manager.new_request_id()
        error: GatewayError | None = None
        with self._tracing.span("gateway.request", attributes={"epserve.request_id": request_id}) as span:
            try:
                handle = self._manager.submit(input_from_proto(request, request_id),
                                              timeout_s=context.time_remaining())
                context.add_callback(handle.cancel)
                for output in handle.outputs():
                    yield output_to_proto(output)
            except GatewayError as exc:
                error = exc
                if exc.code in SERVER_ERRORS:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{exc.code.value}: {exc.message}"))
        if error is not None:
            abort_with(context, error)

    def Abort(self, request, context):
        return generation_pb2.AbortResponse(found=self._manager.abort(request.request_id))

    def GetModelInfo(self, request, context):
        info = self._spec
        return generation_pb2.ModelInfo(
            model_path=info.model_path, architecture=info.architecture, vocab_size=info.vocab_size,
            max_context_length=info.max_position_embeddings, num_moe_layers=info.num_moe_layers,
            num_experts=info.num_experts, num_experts_per_tok=info.num_experts_per_tok,
            num_attention_workers=len(self._pool.known()),
            num_expert_workers=self._pool.num_expert_workers or 0,
            eos_token_ids=list(info.eos_token_ids))
