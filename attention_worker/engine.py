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

The overlap schedule (SGLang's; ``--disable-overlap-schedule`` turns it off): with the GPU runner and
experts in this process or on the cuda_ipc step path (``executor.overlappable``), a step is launched
(queued on the device, its tokens on their way to the host) and, when the next step is a plain
continuation of it (every running sequence decoding, nobody to admit), that next step is launched too
before the first one's tokens are read: its input tokens are read on the device (placeholders in
``token_ids``, ``_launch_ahead``). The host's work between steps then runs while the device computes.
At most one step is in flight when ``step()`` returns; ``has_work`` stays true until it has finished.
A step whose expert workers turn out not to hold its map version (read with its tokens on the step
path) runs again, and the step launched ahead of it is undone (``_redo``).

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from epserve.attention_worker.step_guard import GuardedStep, collect, describe, run_guarded
from epserve.dataplane.base import DataPlaneTimeout, PeerLost, StaleMapVersion
from epserve.expert_map import ExpertMap
from epserve.models.qwen3_moe import Qwen3MoeAttentionSide
from epserve.status_error import StatusCode, StatusError
from epserve.telemetry import NO_SPAN, AttentionWorkerMetrics, StepSampler, Tracing, setup_tracing

if TYPE_CHECKING:
    from epserve.attention_worker.gpu_runner import PendingTokens

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
    disable_overlap_schedule: bool = False   # GPU: never launch a step before the one before it has finished
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
class LaunchedStep:
    """A step started and not finished yet: its tokens may still be on the device."""

    chunks: list[ScheduledChunk]
    completes: list[bool]               # per chunk, as scheduled: it samples a token
    start: float                        # time.perf_counter() at launch
    pending: PendingTokens | None = None    # queued on the device (GpuStepRunner.launch)
    guarded: GuardedStep | None = None      # or run to the end under the step guard
    placeholders: dict[int, int] = field(default_factory=dict)  # chunk → index of its token's placeholder
    # launched ahead: per sequence, (its chunk's index in the step before, num_cached before, blocks it got)
    undo: list[tuple[Sequence, int, int, list[int]]] = field(default_factory=list)


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
        # the overlap schedule (``_launch_ahead``): a runner that can queue a step without waiting for it, and
        # no expert-load record that must count each pass apart (a step's count would hold the next one's)
        self.overlap = (hasattr(self.runner, "launch") and getattr(executor, "overlappable", False)
                        and not limits.disable_overlap_schedule and (recorder is None or not recorder.exact_passes))
        if hasattr(self.runner, "launch"):
            overlappable = getattr(executor, "overlappable", False)
            why_not = ("--disable-overlap-schedule" if limits.disable_overlap_schedule
                       else "the expert workers answer each layer on the host" if not overlappable
                       else "the expert-load record counts each pass apart" if not self.overlap else "")
            logger.info("overlap schedule: %s", f"off ({why_not})" if why_not else "on")
        self._launched: LaunchedStep | None = None        # started, not finished (at most one)
        self.num_steps_ahead = 0                           # steps launched before the one before them finished
        self._last_finish = 0.0                            # time.perf_counter() when the last step finished
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
                or self._pending_map is not None or self._launched is not None)

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
        """Finish one step (and start the next one first, where the overlap schedule can): the outputs of
        the requests it served, and of those aborted since."""
        outputs = self._apply_inbox()
        if self._pending_map is not None:
            outputs += self._finish_launched()          # no launched step may still use the old map
            (self._expert_map, on_applied), self._pending_map = self._pending_map, None
            if self.recorder is not None:
                self.recorder.switch_map(self._expert_map.version, self._expert_map.num_physical_slots)
            if on_applied is not None:
                on_applied(self._expert_map)
        if self._launched is None:
            chunks = self.scheduler.schedule()
            if not chunks:
                return outputs
            self._launched = self._launch(chunks)
        current = self._launched
        self._launched = self._launch_ahead(current)
        return outputs + self._finish(current)

    def _launch(self, chunks: list[ScheduledChunk]) -> LaunchedStep:
        """Start a scheduled step: queued on the device (the overlap schedule's runners), or run to the end."""
        launched = LaunchedStep(chunks, [chunk.completes for chunk in chunks], time.perf_counter())
        span = NO_SPAN
        if self.tracing.enabled:
            now_ns = time.time_ns()
            for chunk in chunks:
                if chunk.seq.trace_context and not chunk.seq.scheduled_ns:
                    chunk.seq.scheduled_ns = now_ns
            span = self._step_span(chunks)
        if self.overlap and span is NO_SPAN:
            try:
                launched.pending = self.runner.launch(chunks, self._expert_map)
                return launched
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - run again under the guard, which finds the request to fail
                logger.warning("launching a step of %d sequence(s) failed (%s); running it under the step guard",
                               len(chunks), describe(exc))
        with span:
            launched.guarded = run_guarded(self.runner, chunks, self._expert_map)   # a failing request fails alone
        return launched

    def _launch_ahead(self, current: LaunchedStep) -> LaunchedStep | None:
        """The overlap schedule (SGLang's): the next decode step, queued on the device before ``current``'s
        tokens reach the host, so the host's work between steps (the token copy's wait, outputs, scheduling,
        the next launch) hides behind the device's. Each sequence's token from ``current`` is a placeholder
        ``-(j + 1)`` in its ``token_ids`` (j: its index among current's sampled tokens) that the runner reads
        on the device and ``_finish`` replaces; its chunk counts as cached already.

        Only when the step after ``current`` would be exactly this anyway: every running sequence decodes
        in ``current`` and none waiting could be admitted, nothing is queued for the engine (requests,
        aborts, a map), no one asks for logprobs, the step is not traced, and the KV cache has the blocks
        without preempting anyone. A sequence that surely finishes with ``current``'s token (its length
        limit) is left out; one that stops on a stop token or EOS has its step-ahead token dropped."""
        if current.pending is None or not self._inbox.empty() or self._pending_map is not None:
            return None
        scheduler = self.scheduler
        if scheduler.waiting and len(scheduler.running) < scheduler.max_num_seqs:
            return None
        if not all(current.completes) or not {id(s) for s in scheduler.running} <= {id(c.seq) for c in current.chunks}:
            return None
        if self.tracing.enabled and self.step_sampler.sample(self.num_steps + 1):
            return None
        ahead = [i for i, chunk in enumerate(current.chunks) if not chunk.seq.finished
                 and chunk.seq.num_generated + 1 < chunk.seq.params.max_new_tokens
                 and chunk.seq.num_tokens + 1 < self.max_context]
        if not ahead or any(chunk.seq.params.return_logprob for chunk in current.chunks):
            return None
        allocator = self.kv_cache.allocator
        need = [allocator.blocks_needed(current.chunks[i].seq.num_tokens + 1, len(current.chunks[i].seq.block_table))
                for i in ahead]
        if sum(need) > allocator.num_free:
            return None
        chunks, undo = [], []
        for i, blocks in zip(ahead, need):
            seq = current.chunks[i].seq
            undo.append((seq, i, seq.num_cached, allocator.allocate(blocks)))
            seq.num_cached = seq.num_tokens
            current.placeholders[i] = seq.num_tokens
            seq.token_ids.append(-(i + 1))             # every chunk of current samples: i is its token's index
            seq.block_table.extend(undo[-1][3])
            chunks.append(ScheduledChunk(seq, 1))
        launched = LaunchedStep(chunks, [True] * len(chunks), time.perf_counter(), undo=undo)
        try:
            launched.pending = self.runner.launch(chunks, self._expert_map, previous=current.pending)
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - these sequences are scheduled again once current has finished
            logger.warning("launching a step ahead failed (%s); it runs once the step before it has finished",
                           describe(exc))
            return None
        self.num_steps_ahead += 1
        return launched

    def _finish(self, launched: LaunchedStep) -> list[StepOutput]:
        """Wait for a launched step's tokens; advance its sequences, emit their outputs, retire the finished."""
        outputs: list[StepOutput] = []
        chunks, guarded = launched.chunks, launched.guarded
        if guarded is None:
            try:
                guarded = collect(chunks, launched.pending.result())
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - redone, or the device failed the step: its requests fail
                if self._redoable(exc):
                    guarded = self._redo(launched, exc)
                else:
                    logger.error("step of %d sequence(s) failed: %s", len(chunks), describe(exc), exc_info=exc)
                    guarded = GuardedStep(errors={i: describe(exc) for i in range(len(chunks))})
        for i, (chunk, complete) in enumerate(zip(chunks, launched.completes)):
            seq = chunk.seq
            if seq.finished:
                continue                    # aborted or failed while this step ran: its token is dropped
            if i in guarded.errors:
                outputs.append(self._fail(seq, guarded.errors[i]))
                continue
            placeholder = launched.placeholders.get(i)
            if placeholder is None:
                seq.num_cached += chunk.num_tokens
            if not complete:
                continue
            token, token_logprobs = guarded.tokens[i], guarded.logprobs.get(i)
            if placeholder is None:
                seq.token_ids.append(token)
            else:
                seq.token_ids[placeholder] = token
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
        now = time.perf_counter()
        if self.metrics is not None:        # a step launched ahead is timed from the previous step's end
            self._record_step(chunks, pass_counts, now - max(launched.start, self._last_finish))
        self._last_finish = now
        self.num_steps += 1
        return outputs

    def _redoable(self, exc: Exception) -> bool:
        """A launched step's failure that running it again can cure: an expert worker that does not hold the
        step's map yet, or (elastic EP, ``executor.recover``) one that was lost or late."""
        if isinstance(exc, StaleMapVersion):
            return True
        return isinstance(exc, (PeerLost, DataPlaneTimeout)) and getattr(self.executor, "recovery", None) is not None

    def _redo(self, launched: LaunchedStep, failure: Exception) -> GuardedStep:
        """A step launched without waiting for its expert workers' status (the overlap schedule) that one of
        them could not serve: it does not hold the step's map version yet (loading it, or restarted), or it
        was lost (elastic EP). The step's tokens are not valid, so the step launched ahead of it, which read
        them, is waited out and undone (its placeholders, cached counts and new KV blocks), and this step
        runs again under the step guard; the runner repeats it until the workers hold the map, or under the
        map placement re-placed a lost worker's experts with (``GpuStepRunner.run``)."""
        ahead, self._launched = self._launched, None
        logger.warning("a step of %d sequence(s) failed on the expert side (%s); running it again%s",
                       len(launched.chunks), describe(failure),
                       " (and dropping the step launched ahead of it)" if ahead else "")
        if ahead is not None:
            try:
                if ahead.pending is not None:
                    ahead.pending.result()          # its expert status is read too (the channels keep two)
            except Exception:  # noqa: BLE001 - its results are dropped whatever they are
                pass
            self.num_steps_ahead -= 1
            allocator = self.kv_cache.allocator
            for seq, index, num_cached, blocks in ahead.undo:
                launched.placeholders.pop(index, None)
                if seq.finished:                    # retired (aborted) meanwhile: its blocks went with it
                    continue
                assert seq.token_ids[-1] < 0, "the step launched ahead left no placeholder to undo"
                seq.token_ids.pop()
                seq.num_cached = num_cached
                if blocks:
                    del seq.block_table[-len(blocks):]
                    allocator.free(blocks)
        keep = [i for i, chunk in enumerate(launched.chunks) if not chunk.seq.finished]   # aborted: blocks freed
        chunks = [launched.chunks[i] for i in keep]
        self.runner.forget_sampled(chunks)
        redone = run_guarded(self.runner, chunks, self._expert_map) if chunks else GuardedStep()
        return GuardedStep(tokens={keep[j]: t for j, t in redone.tokens.items()},
                           logprobs={keep[j]: lp for j, lp in redone.logprobs.items()},
                           errors={keep[j]: e for j, e in redone.errors.items()})

    def _finish_launched(self) -> list[StepOutput]:
        launched, self._launched = self._launched, None
        return self._finish(launched) if launched is not None else []

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
