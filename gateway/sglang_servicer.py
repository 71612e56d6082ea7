"""SGLang's ``sglang.grpc.scheduler.SglangScheduler`` served by the gateway, so SGLang's model gateway
(SMG, ``smg launch --worker-urls grpc://GATEWAY``) can front epserve with its OpenAI-compatible
HTTP API. Thin: proto <-> dataclasses in sglang_convert.py, requests through the same
RequestManager as epserve.v1 (validation, routing, retries, abort), n > 1 in parallel_samples.py.

RPCs:
  Generate        token ids in; streaming (``stream``): a chunk per worker step with the new token
                  ids, cumulative counts and their logprobs, then a complete per sample;
                  otherwise one complete per sample with all its tokens. n > 1: ``index`` tells
                  the samples apart. Errors as status codes (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
                  UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL). The client cancelling the stream
                  aborts the request at its attention worker.
  Abort           by SMG's request id (all its samples); false when none runs.
  HealthCheck     healthy while the gateway serves and an attention worker answers.
  GetModelInfo    served_model_name (the model directory's name), tokenizer/model path, context,
                  vocabulary, EOS ids, architectures.
  GetServerInfo, GetLoads (the attention workers' load summed: epserve's gateway is one SMG
                  worker and balances its attention workers itself), GetTokenizer (a zip of the
                  tokenizer files), ListLoadedLoRAAdapters (none), FlushCache (no prefix cache:
                  nothing to flush).
  UNIMPLEMENTED, naming what is missing: Embed, LoRA loading, profiling, KV-cache events.

Threads: gRPC's pool; an n > 1 request adds one thread per sample (parallel_samples.py). One lock
guards the table of running SMG request ids.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from epserve.gateway.errors import GatewayError
from epserve.grpc_server import abort_with
from epserve.gateway.parallel_samples import ParallelSamples
from epserve.gateway.request_manager import RequestManager
from epserve.sampling import TokenLogprob
from epserve.gateway.sglang_convert import SglangRequest, chunk_response, complete_response, request_from_proto
from epserve.gateway.tokenizer_archive import TokenizerArchive, build_tokenizer_archive
from epserve.gateway.worker_api import WorkerLoad
from epserve.model_config import ModelSpec
from epserve.protos import sglang_scheduler_pb2 as sglang_pb2, sglang_scheduler_pb2_grpc, smg_common_pb2

SERVICE_NAME = sglang_pb2.DESCRIPTOR.services_by_name["SglangScheduler"].full_name


class _Sample:
    """What a sample has produced so far (non-streaming answers send it all at the end)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []


class SglangSchedulerServicer(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):
    """``is_serving``: the gateway is up and an attention worker answers. ``loads``: the latest
    probe of each attention worker (None: it did not answer). ``default_seed``: the seed of
    requests that bring none (``--sglang-default-seed``; None: random)."""

    def __init__(self, manager: RequestManager, spec: ModelSpec, is_serving: Callable[[], bool],
                 loads: Callable[[], dict[str, WorkerLoad | None]], server_args: dict[str, object],
                 default_seed: int | None = None) -> None:
        self._manager = manager
        self._spec = spec
        self._is_serving = is_serving
        self._loads = loads
        self._server_args = server_args
        self._default_seed = default_seed
        self._start = time.time()
        self._lock = threading.Lock()
        self._running: dict[str, ParallelSamples] = {}
        self._archive: TokenizerArchive | None = None

    # -- generation ----------------------------------------------------------------------------
    def Generate(self, request, context):
        try:
            sglang_request = request_from_proto(request)
            samples = ParallelSamples(self._manager, sglang_request.sample_inputs(self._default_seed),
                                      timeout_s=context.time_remaining())
        except GatewayError as exc:
            abort_with(context, exc)
        with self._lock:
            self._running[request.request_id] = samples
        context.add_callback(samples.cancel)
        error: GatewayError | None = None
        try:
            yield from self._responses(sglang_request, samples)
        except GatewayError as exc:
            error = exc
        finally:
            with self._lock:
                if self._running.get(request.request_id) is samples:
                    del self._running[request.request_id]
        if error is not None:
            abort_with(context, error)

    def _responses(self, request: SglangRequest, samples: ParallelSamples):
        prompt_tokens = len(request.input_ids)
        stops = request.sampling.stop
        progress = [_Sample() for _ in range(request.n)]
        finished: dict[int, sglang_pb2.GenerateResponse] = {}
        next_index = 0          # without streaming, samples end in index order (a client may number by order)
        for index, output in samples.outputs():
            sample = progress[index]
            sample.token_ids.extend(output.token_ids)
            sample.logprobs.extend(output.logprobs)
            completion_tokens = len(sample.token_ids)
            if request.stream and output.token_ids:
                yield chunk_response(request.request_id, index, output.token_ids, output.logprobs, prompt_tokens,
                                     completion_tokens)
            if output.finished:
                assert output.finish_reason is not None
                output_ids, logprobs = ((), ()) if request.stream else (sample.token_ids, sample.logprobs)
                complete = complete_response(request.request_id, index, output_ids, logprobs, output.finish_reason,
                                             output.matched_stop, output.matched_stop_token, stops, prompt_tokens,
                                             completion_tokens)
                if request.stream:
                    yield complete
                    continue
                finished[index] = complete
                while next_index in finished:
                    yield finished.pop(next_index)
                    next_index += 1

    def Abort(self, request, context):
        with self._lock:
            samples = self._running.get(request.request_id)
        found = samples.abort() if samples is not None else self._manager.abort(request.request_id)
        return sglang_pb2.AbortResponse(success=found, message="aborted" if found else
                                        f"no request {request.request_id!r} is running")

    def Embed(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "embeddings are not supported by epserve (generation only)")

    # -- health, model, server, load ---------------------------------------------------------
    def HealthCheck(self, request, context):
        if self._is_serving():
            return sglang_pb2.HealthCheckResponse(healthy=True, message="serving")
        return sglang_pb2.HealthCheckResponse(healthy=False, message="no attention worker answers, or shutting down")

    def GetModelInfo(self, request, context):
        info = self._spec
        return sglang_pb2.GetModelInfoResponse(
            model_path=info.model_path, tokenizer_path=info.model_path, is_generation=True,
            served_model_name=Path(info.model_path).name, max_context_length=info.max_position_embeddings,
            vocab_size=info.vocab_size, supports_vision=False, model_type=info.model_type,
            eos_token_ids=list(info.eos_token_ids), bos_token_id=_int_or_zero(info.bos_token_id),
            pad_token_id=_int_or_zero(info.pad_token_id), max_req_input_len=info.max_position_embeddings - 1,
            architectures=[info.architecture])

    def GetServerInfo(self, request, context):
        server_args, scheduler_info = Struct(), Struct()
        server_args.update(self._server_args)
        loads = [load for load in self._loads().values() if load is not None]
        scheduler_info.update({"num_attention_workers": len(self._loads()),
                               "num_attention_workers_reachable": len(loads),
                               "architecture": self._spec.architecture})
        start = Timestamp()
        start.FromSeconds(int(self._start))
        return sglang_pb2.GetServerInfoResponse(
            server_args=server_args, scheduler_info=scheduler_info, active_requests=self._manager.num_running,
            is_paused=False, uptime_seconds=time.time() - self._start, server_type="grpc", start_time=start,
            max_total_num_tokens=0)

    def GetLoads(self, request, context):
        loads = [load for load in self._loads().values() if load is not None]
        running = sum(load.num_running for load in loads)
        waiting = sum(load.num_waiting for load in loads)
        total = sum(load.kv_blocks_total or 0 for load in loads)
        used = total - sum(load.kv_blocks_free or 0 for load in loads)
        usage = used / total if total else 0.0
        load = sglang_pb2.SchedulerLoad(dp_rank=0, num_running_reqs=running, num_waiting_reqs=waiting,
                                        num_total_reqs=running + waiting, token_usage=usage, utilization=usage)
        aggregate = sglang_pb2.AggregateMetrics(total_running_reqs=running, total_waiting_reqs=waiting,
                                                total_reqs=running + waiting, avg_token_usage=usage,
                                                avg_utilization=usage)
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return sglang_pb2.GetLoadsResponse(timestamp=timestamp, dp_rank_count=1, loads=[load], aggregate=aggregate)

    def GetTokenizer(self, request, context):
        if self._archive is None:
            try:
                self._archive = build_tokenizer_archive(self._spec.model_path)
            except ValueError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        chunks = self._archive.chunks()
        for i, data in enumerate(chunks):
            yield smg_common_pb2.GetTokenizerChunk(data=data, sha256=self._archive.sha256 if i == len(chunks) - 1 else "")

    def FlushCache(self, request, context):
        return smg_common_pb2.FlushCacheResponse(success=True, message="epserve keeps no prefix cache: nothing to flush")

    def ListLoadedLoRAAdapters(self, request, context):
        return sglang_pb2.ListLoadedLoRAAdaptersResponse()

    def LoadLoRAAdapter(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "LoRA adapters are not supported by epserve")

    def UnloadLoRAAdapter(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "LoRA adapters are not supported by epserve")

    def StartProfile(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling through SMG is not supported by epserve")

    def StopProfile(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling through SMG is not supported by epserve")

    def SubscribeKvEvents(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV-cache events are not published by epserve (no prefix "
                                                     "cache); poll GetLoads")


def _int_or_zero(value: object) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else 0


def sglang_registration(manager: RequestManager, spec: ModelSpec, pool, config,
                        is_serving: Callable[[], bool]) -> tuple[Callable, SglangSchedulerServicer, str]:
    """The (add_to_server, servicer, service name) triple serve_grpc takes, from the gateway's parts
    (``pool``: the WorkerPool, ``config``: the GatewayConfig; secrets stay out of GetServerInfo)."""
    server_args = {name: value for name, value in dataclasses.asdict(config).items()
                   if isinstance(value, (str, int, float, bool)) and "token" not in name and "key" not in name}
    servicer = SglangSchedulerServicer(manager, spec, is_serving, pool.loads, server_args,
                                       default_seed=config.sglang_default_seed)
    return sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server, servicer, SERVICE_NAME
