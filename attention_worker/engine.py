"""The attention worker's engine: scheduler + KV cache + a step runner (model, MoE executor, sampler).

Threads: ``step()`` runs on one engine thread only (the worker's loop, or the caller in the
colocated ``epserve generate``). ``add_request``/``abort`` may be called from any thread:
they only enqueue; the engine thread applies them at the next step boundary, which is also
where a new expert map is picked up (``set_expert_map``), so a step never mixes versions.

Flow of a step: apply queued adds/aborts → ``Scheduler.schedule`` → the step runner runs the
forward pass and samples a token for each sequence whose chunk reached its end
(``cpu_runner.py``: per micro-batch ``ForwardBatch``es driven through the MoE executor in
ping-pong, host sampling; ``gpu_runner.py``: device metadata, CUDA graphs for decode steps,
batched GPU sampling, one device-to-host copy) → emit ``StepOutput``s and free finished
sequences' KV blocks.

Telemetry (both optional, off by default): a sampled step (``StepSampler``) runs inside an
``attention.step`` span linked to the traced requests it serves (a child of the first), whose
context the executor puts in the data-plane header; a traced request gets ``queue``,
``prefill`` and ``decode`` spans (``request_spans.py``) when it leaves the engine. Metrics:
step duration, tokens per step, preemptions and (``--enable-expert-distribution-metrics``) tokens
per expert worker, fed once per step. A ``HeatmapCollector`` (optional) gets each pass's
per-slot counts ``[L, P]`` and the map the pass used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from epserve.attention_worker.expert_heatmap import HeatmapCollector
from epserve.attention_worker.expert_recorder import ExpertLoadRecorder, RecorderMode
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.attention_worker.model_family import model_family
from epserve.attention_worker.moe_executor import MoEExecutor
from epserve.attention_worker.request_spans import record_request_spans
from epserve.sampling import FinishReason, SamplingParams, TokenLogprob
from epserve.attention_worker.scheduler import ScheduledChunk, Scheduler
from epserve.attention_worker.sequence import Sequence
from epserve.attention_worker.step_guard import run_guarded
from epserve.expert_map import ExpertMap
from epserve.models.qwen3_moe import Qwen3MoeAttentionSide
from epserve.status_error import StatusCode, StatusError
from epserve.telemetry import NO_SPAN, AttentionWorkerMetrics, StepSampler, Tracing, setup_tracing

logger = logging.getLogger(__name__)


ATTENTION_BACKENDS = ("auto", "triton", "torch_native", "flashinfer")


@dataclass(frozen=True)
class EngineLimits:
    """The engine's sizes and its step path (SGLang's flag names where SGLang has them)."""

    num_kv_blocks: int = 512
    kv_block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    num_micro_batches: int | None = None   # None: 2 on the CPU runner, 1 on the GPU step path
    cuda_graph_max_bs: int = 256         # GPU: decode steps of up to this many sequences replay a graph
    disable_cuda_graph: bool = False     # GPU: run every step eagerly
    attention_backend: str = "auto"      # auto: triton on CUDA, torch_native elsewhere

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.attention_backend == "flashinfer":
            raise ValueError("--attention-backend flashinfer is not built in epserve yet; use triton (the default "
                             "on CUDA) or torch_native")
        if self.cuda_graph_max_bs < 0:
            raise ValueError(f"--cuda-graph-max-bs must be >= 0, got {self.cuda_graph_max_bs}")


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_generated: int
    matched_stop_token: int | None = None
    logprobs: list[TokenLogprob] | None = None   # one per new token when the request asked (return_logprob)
    error: str = ""                     # the request failed while served (finish_reason ABORT): why


class RequestRejected(StatusError, ValueError):
    """The request cannot be served by this engine (too long for the KV cache, the worker full)."""
    code = StatusCode.RESOURCE_EXHAUSTED


class DuplicateRequest(RequestRejected):
    """A request of this id is already running here."""
    code = StatusCode.ALREADY_EXISTS


class Engine:
    def __init__(self, model: Qwen3MoeAttentionSide, executor: MoEExecutor, expert_map: ExpertMap,
                 limits: EngineLimits, max_context: int, recorder: ExpertLoadRecorder | None = None,
                 tracing: Tracing | None = None, step_sampler: StepSampler | None = None,
                 metrics: AttentionWorkerMetrics | None = None, heatmap: HeatmapCollector | None = None) -> None:
        spec = model.spec
        self.recorder = recorder
        self.heatmap = heatmap
        self.tracing = tracing if tracing is not None else setup_tracing("epserve-attention-worker", None)
        self.step_sampler = step_sampler if step_sampler is not None else StepSampler()
        self.metrics = metrics
        self.model, self.executor, self.limits, self.max_context = model, executor, limits, max_context
        self.kv_cache = model_family(spec).make_kv_cache(spec, limits.num_kv_blocks, limits.kv_block_size,
                                                         model.dtype, model.embed.device)
        self.scheduler = Scheduler(self.kv_cache.allocator, limits.max_num_batched_tokens, limits.max_num_seqs)
        if recorder is not None and recorder.mode is RecorderMode.PER_TOKEN and not limits.disable_cuda_graph \
                and model.device.type == "cuda":
            logger.warning("--expert-distribution-recorder-mode per_token copies every token's expert slots to the "
                           "host each layer: CUDA graphs are off")
            limits = dataclasses.replace(limits, disable_cuda_graph=True)
        self.limits = limits
        self.runner = make_step_runner(model, executor, self.kv_cache, limits, max_context)
        self.runner.warmup(expert_map)
        if recorder is not None:
            recorder.discard_device_counts()        # the warm-up passes routed padding, not requests
        self.eos_token_ids = set(spec.eos_token_ids)
        self._expert_map = expert_map
        self._pending_map: tuple[ExpertMap, Callable[[ExpertMap], None] | None] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sequences: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self.num_steps = 0
        self._num_preemptions_reported = 0
        if metrics is not None:
            self._bind_gauges(metrics)

    # -- any thread --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    num_generated_before: int = 0, trace_context: bytes = b"") -> None:
        """prompt_ids: the prompt, plus on a retry the ``num_generated_before`` tokens already
        streamed; ``params.max_new_tokens`` is then what is left to generate. ``trace_context``:
        the request's span (``Tracing.current_trace_context()`` where the RPC adds it)."""
        if not prompt_ids:
            raise RequestRejected("prompt_ids is empty")
        if len(prompt_ids) >= self.max_context:
            raise RequestRejected(f"prompt has {len(prompt_ids)} tokens; the context limit is {self.max_context}")
        blocks = self.kv_cache.allocator.blocks_needed(min(len(prompt_ids) + params.max_new_tokens,
                                                           self.max_context), 0)
        if blocks > self.limits.num_kv_blocks:
            raise RequestRejected(f"request needs {blocks} KV blocks, the cache has {self.limits.num_kv_blocks}; "
                                  "lower max_new_tokens or raise --num-kv-blocks")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids) - num_generated_before, params, seed,
                       torch.Generator().manual_seed(seed), trace_context=trace_context,
                       submit_ns=time.time_ns() if trace_context else 0)
        with self._lock:
            if request_id in self._sequences:
                raise DuplicateRequest(f"request_id {request_id!r} is already running")
            self._sequences[request_id] = seq
        self._inbox.put(("add", seq))

    def abort(self, request_id: str) -> bool:
        with self._lock:
            found = request_id in self._sequences
        if found:
            self._inbox.put(("abort", request_id))
        return found

    def set_expert_map(self, expert_map: ExpertMap,
                       on_applied: Callable[[ExpertMap], None] | None = None) -> None:
        """Switch maps at the next step boundary; ``on_applied(map)`` runs on the engine thread once
        no step uses the old map any more (placement may then retire it)."""
        self._pending_map = (expert_map, on_applied)

    @property
    def expert_map(self) -> ExpertMap:
        return self._expert_map

    @property
    def has_work(self) -> bool:
        return (self.scheduler.num_unfinished > 0 or not self._inbox.empty()
                or self._pending_map is not None)

    def load(self) -> dict[str, int]:
        outstanding = 0
        with self._lock:
            for seq in self._sequences.values():
                outstanding += seq.num_uncached + seq.params.max_new_tokens - seq.num_generated
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "outstanding_tokens": max(outstanding, 0), "kv_blocks_free": self.kv_cache.allocator.num_free,
                "kv_blocks_total": self.limits.num_kv_blocks}

    # -- engine thread -----------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs = self._apply_inbox()
        if self._pending_map is not None:
            (self._expert_map, on_applied), self._pending_map = self._pending_map, None
            if self.recorder is not None:
                self.recorder.switch_map(self._expert_map.version, self._expert_map.num_physical_slots)
            if on_applied is not None:
                on_applied(self._expert_map)
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        start = time.perf_counter()
        traced = self.tracing.enabled
        if traced:
            now_ns = time.time_ns()
            for chunk in chunks:
                if chunk.seq.trace_context and not chunk.seq.scheduled_ns:
                    chunk.seq.scheduled_ns = now_ns
        with self._step_span(chunks) if traced else NO_SPAN:
            completes = [chunk.completes for chunk in chunks]
            guarded = run_guarded(self.runner, chunks, self._expert_map)   # a failing request fails alone
            for i, (chunk, complete) in enumerate(zip(chunks, completes)):
                seq = chunk.seq
                if i in guarded.errors:
                    outputs.append(self._fail(seq, guarded.errors[i]))
                    continue
                seq.num_cached += chunk.num_tokens
                if not complete:
                    continue
                token, token_logprobs = guarded.tokens[i], guarded.logprobs.get(i)
                seq.token_ids.append(token)
                seq.num_generated += 1
                if seq.trace_context and not seq.first_token_ns:
                    seq.first_token_ns = time.time_ns()
                self._check_finished(seq, token)
                outputs.append(self._output(seq, [token], [token_logprobs] if token_logprobs is not None else None))
                if seq.finished:
                    self._retire(seq)
        pass_counts = None
        if self.recorder is not None:
            pass_counts = self.recorder.end_pass(self._expert_map.version, self._expert_map.num_physical_slots)
        if self.heatmap is not None and pass_counts is not None:
            self.heatmap.add_pass(pass_counts, self._expert_map)
        if self.metrics is not None:
            self._record_step(chunks, pass_counts, time.perf_counter() - start)
        self.num_steps += 1
        return outputs

    def _step_span(self, chunks: list[ScheduledChunk]):
        if not self.step_sampler.sample(self.num_steps):
            return NO_SPAN
        return self.tracing.linked_span("attention.step", [c.seq.trace_context for c in chunks], attributes={
            "epserve.step": self.num_steps, "epserve.num_seqs": len(chunks),
            "epserve.num_tokens": sum(c.num_tokens for c in chunks), "epserve.map_version": self._expert_map.version})

    def _record_step(self, chunks: list[ScheduledChunk], pass_counts: torch.Tensor | None, duration_s: float) -> None:
        """pass_counts: [L, P] token-expert choices per slot this step (None: not tracked)."""
        metrics = self.metrics
        metrics.step_duration.observe(duration_s)
        metrics.tokens_per_step.observe(sum(c.num_tokens for c in chunks))
        preemptions = self.scheduler.num_preemptions
        if preemptions != self._num_preemptions_reported:
            metrics.preemptions.inc(preemptions - self._num_preemptions_reported)
            self._num_preemptions_reported = preemptions
        owners = self._expert_map.slot_owners
        if (metrics.expert_distribution and pass_counts is not None and owners
                and pass_counts.shape[1] == self._expert_map.num_physical_slots):
            per_worker = pass_counts.sum(0).view(len(owners), -1).sum(1).tolist()
            metrics.record_expert_load(dict(zip(owners, per_worker)))

    def _bind_gauges(self, metrics: AttentionWorkerMetrics) -> None:
        """Gauges read at scrape time (the scrape thread reads plain ints and lengths)."""
        metrics.requests_waiting.set_function(lambda: len(self.scheduler.waiting))
        metrics.requests_running.set_function(lambda: len(self.scheduler.running))
        allocator = self.kv_cache.allocator
        metrics.kv_cache_blocks_total.set(allocator.num_blocks)
        metrics.kv_cache_blocks_used.set_function(lambda: allocator.num_blocks - allocator.num_free)
        metrics.map_version.set_function(lambda: self._expert_map.version)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish_reason, seq.matched_stop_token = FinishReason.STOP, token
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason, seq.matched_stop_token = FinishReason.STOP, token
        elif seq.num_generated >= params.max_new_tokens or seq.num_tokens >= self.max_context:
            seq.finish_reason = FinishReason.LENGTH

    def _apply_inbox(self) -> list[StepOutput]:
        outputs = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add":
                self.scheduler.add(item)
                continue
            with self._lock:
                seq = self._sequences.get(item)
            if seq is not None and not seq.finished:
                seq.finish_reason = FinishReason.ABORT
                outputs.append(self._output(seq, []))
                self._retire(seq)
        return outputs

    def _fail(self, seq: Sequence, error: str) -> StepOutput:
        """The request failed while served (``step_guard``): it leaves, the engine goes on."""
        seq.finish_reason = FinishReason.ABORT
        self._retire(seq)
        return dataclasses.replace(self._output(seq, []), error=error)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.runner.release(seq)
        with self._lock:
            self._sequences.pop(seq.request_id, None)
        if seq.trace_context:
            record_request_spans(self.tracing, seq, time.time_ns())

    @staticmethod
    def _output(seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> StepOutput:
        return StepOutput(seq.request_id, tokens, seq.finished, seq.finish_reason, seq.num_prompt_tokens,
                          seq.num_generated, seq.matched_stop_token, logprobs)


def resolved_attention_backend(limits: EngineLimits, device: torch.device | str) -> str:
    """``--attention-backend`` with ``auto`` resolved: triton on CUDA devices, torch_native elsewhere."""
    if limits.attention_backend != "auto":
        return limits.attention_backend
    return "triton" if torch.device(device).type == "cuda" else "torch_native"


def make_step_runner(model: Qwen3MoeAttentionSide, executor: MoEExecutor, kv_cache: PagedKVCache,
                     limits: EngineLimits, max_context: int):
    """``--attention-backend``: ``triton`` → the batched GPU runner (on a CPU device only under the
    Triton interpreter, for tests), ``torch_native`` → the host runner; ``auto`` picks triton on
    CUDA devices. ``torch_native`` on a GPU works but launches per sequence and layer: slow."""
    backend = resolved_attention_backend(limits, model.device)
    if backend == "triton":
        if model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"--attention-backend triton needs a CUDA device (got {model.device}); use "
                             "torch_native, or TRITON_INTERPRET=1 for the Triton interpreter")
        from epserve.attention_worker.gpu_runner import GpuStepRunner
        return GpuStepRunner(model, executor, kv_cache, limits, max_context)
    from epserve.attention_worker.cpu_runner import CpuStepRunner
    return CpuStepRunner(model, executor, kv_cache, limits.num_micro_batches or 2)
