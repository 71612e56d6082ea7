"""Runs a step on a GPU: batch metadata on the device, CUDA graphs for decode steps, GPU sampling.

Legend: T tokens in the step, B sequences in it, B' of them sampled, R device rows (one per
running sequence, ``max_num_seqs``), M block-table width (blocks of the longest context), V vocab.

Threads: everything runs on the engine thread.

Device state, kept across steps so a step copies only what changed:
- every running sequence owns a row of ``block_table_pool [R + 1, M]`` (row R: padding) for as
  long as it is in the engine (``release`` frees it); a step appends only the blocks a sequence
  gained since the last step (``_block_table_updates``), so host work per step does not grow with
  context length;
- ``GpuSampler`` keeps, per row, which tokens a sequence has seen (repetition penalty only).

A step (``run``): route with the current expert map (``executor.prepare``: device copies, in
place) → pack the step's integers (token ids, positions, cache slots, rows, context lengths,
block-table updates) into one pinned buffer and copy it to the device once → a decode step of at
most ``cuda_graph_max_bs`` sequences replays the captured graph of the smallest batch-size bucket
that fits (``cuda_graphs.DecodeGraphs``); any other step (prefill chunks, mixed, larger) runs the
same forward eagerly → ``GpuSampler`` samples every completing sequence at once → one
device-to-host copy of the token ids. ``launch`` returns once all of that is queued (``PendingTokens``:
the tokens on the device, and their copy on its way); ``run`` also waits for the copy. The engine's
overlap schedule launches the next decode step before the copy has arrived: a placeholder token id
``-(j + 1)`` then stands for token j of the step launched before (``resolve_placeholders``, on the
device). An exchange announced per step (the cuda_ipc step path,
``step_experts.py``) gets ``begin_step`` before the launches and ``end_step`` after them, whose check
``PendingTokens.result`` runs once the tokens are on the host; a map version an expert worker does
not hold yet makes ``run`` launch the step again (the engine's overlap schedule: ``Engine._redo``).

On a CPU device (tests, with the Triton interpreter) the same code runs without pinned memory or
graphs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.gpu_sampling import GpuSampler
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.attention_worker.mla_kv_cache import MlaKVCache
from epserve.attention_worker.model_family import model_family
from epserve.attention_worker.moe_executor import MoEExecutor, run_micro_batches
from epserve.attention_worker.sampler import SampledTokens
from epserve.attention_worker.scheduler import ScheduledChunk
from epserve.attention_worker.sequence import Sequence
from epserve.dataplane.base import DataPlaneTimeout, PeerLost, StaleMapVersion
from epserve.expert_map import ExpertMap
from epserve.models.decoder import ForwardBatch
from epserve.models.qwen3_moe import Qwen3MoeAttentionSide

logger = logging.getLogger(__name__)

STALE_RETRY_S = 0.05            # an expert worker still loading the step's map version: wait, redo
STALE_RETRY_TIMEOUT_S = 30.0


class GpuStepRunner:
    def __init__(self, model: Qwen3MoeAttentionSide, executor: MoEExecutor, kv_cache: PagedKVCache | MlaKVCache,
                 limits, max_context: int) -> None:
        self.model, self.executor, self.kv_cache = model, executor, kv_cache
        self.device = model.device
        # the family's Triton backend: TritonPagedAttention (GQA) or TritonMlaAttention (MLA)
        self.attention = model_family(model.spec).make_gpu_attention(kv_cache, model.spec)
        self.block_size = kv_cache.block_size
        self.max_blocks = -(-max_context // self.block_size)
        self.num_rows = limits.max_num_seqs
        self.block_table_pool = torch.zeros(self.num_rows + 1, self.max_blocks, dtype=torch.int32,
                                            device=self.device)
        self._free_rows = list(range(self.num_rows - 1, -1, -1))
        self._synced: dict[int, list[int]] = {}          # row -> the block ids its device row holds
        self.sampler = GpuSampler(self.device, self.num_rows, model.spec.vocab_size)
        num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                   if self.device.type == "cuda" else 1)
        self.num_splits = lambda batch: self.attention.decode_num_splits(batch, max_context, num_sms)
        self.graphs = None
        self._split_logged = False
        self._previous: PendingTokens | None = None     # set while ``launch`` runs
        if not executor.capturable and not limits.disable_cuda_graph:
            logger.info("the experts wait on the host (%s): decode steps run without CUDA graphs",
                        type(getattr(executor, "dispatcher", getattr(executor, "runner", executor))).__name__)
        elif self.device.type == "cuda" and not limits.disable_cuda_graph and limits.cuda_graph_max_bs > 0:
            from epserve.attention_worker.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self, min(limits.cuda_graph_max_bs, self.num_rows))

    # -- the step ------------------------------------------------------------------------
    def run(self, chunks: list[ScheduledChunk], expert_map: ExpertMap) -> SampledTokens:
        """The sampled token of each completing chunk, in chunk order (and its logprobs if asked). A step an
        expert worker could not serve yet (``StaleMapVersion``: it is still loading this map) runs again, and
        so does one that lost an expert worker when the executor recovers (elastic EP: under the map placement
        re-placed the lost worker's experts with; ``executor.recover`` raises when nothing does)."""
        deadline = time.monotonic() + STALE_RETRY_TIMEOUT_S
        while True:
            try:
                return self.launch(chunks, expert_map).result()
            except StaleMapVersion:
                if time.monotonic() + STALE_RETRY_S > deadline:
                    raise
                time.sleep(STALE_RETRY_S)
            except (PeerLost, DataPlaneTimeout) as exc:     # elastic EP: the map placement re-placed experts with
                expert_map = self.executor.recover(exc, expert_map)              # raises exc if none recovers it
            self.forget_sampled(chunks)

    def forget_sampled(self, chunks: list[ScheduledChunk]) -> None:
        """Before a step runs again: the sampler's record of the tokens these sequences have seen is rebuilt
        from their ``token_ids`` (the dropped run marked its tokens)."""
        for chunk in chunks:
            if chunk.seq.row is not None:
                self.sampler.admit(chunk.seq)

    def launch(self, chunks: list[ScheduledChunk], expert_map: ExpertMap,
               previous: PendingTokens | None = None) -> PendingTokens:
        """``run`` without waiting for the tokens: the step's kernels are queued on the device and its tokens
        start on their way to the host. ``previous``: the step launched just before this one, whose tokens
        the host may not have yet; a token id ``-(j + 1)`` in a sequence's ``token_ids`` (a placeholder the
        engine appended when it launched this step ahead) stands for ``previous.device[j]``."""
        self._previous = previous
        try:
            return self._launch(chunks, expert_map)
        finally:
            self._previous = None

    def _launch(self, chunks: list[ScheduledChunk], expert_map: ExpertMap) -> PendingTokens:
        self.executor.prepare(expert_map, self.device)
        for chunk in chunks:
            if chunk.seq.row is None:
                self._admit(chunk.seq)
        self._apply_block_table_updates(self._block_table_updates(chunks))
        decode = all(chunk.num_tokens == 1 for chunk in chunks)
        graphed = decode and self.graphs is not None and self.graphs.captured and len(chunks) <= self.graphs.max_bs
        workers = self.executor.step_workers(expert_map)
        if graphed and self.graphs.workers != workers:
            self._capture_again(expert_map, workers)
        if graphed:
            logits = self.graphs.replay(chunks, expert_map)                           # [B, V]
        else:
            batch = self.eager_batch(chunks, decode)
            sizes = self.micro_batch_sizes(batch.num_tokens, decode and all(c.completes for c in chunks))
            self.executor.begin_step(sizes, expert_map)
            logits = self.forward(batch, expert_map, sizes)                           # [B', V]
        check = self.executor.end_step()
        completing = [chunk.seq for chunk in chunks if chunk.completes]
        return PendingTokens(*self.sampler.sample_on_device(logits, completing), check=check)

    def _capture_again(self, expert_map: ExpertMap, workers: tuple[int, ...] | None) -> None:
        """The decode graphs hold the expert workers they were captured with: after elastic EP left a lost one
        out, capture them again (seconds; the step waits). Never with a step in flight (its check would
        read statuses the capture's warm-up steps replaced): a step launched ahead fails to launch instead."""
        from epserve.attention_worker.cuda_graphs import DecodeGraphs

        if self._previous is not None:
            raise RuntimeError(f"the step's expert workers changed ({self.graphs.workers} -> {workers}) while a "
                               f"step was in flight: not launched ahead")
        logger.warning("the expert workers of a step changed (%s -> %s): capturing the decode graphs again",
                       self.graphs.workers, workers)
        self.graphs = DecodeGraphs(self, self.graphs.max_bs)
        self.graphs.capture(expert_map)

    def warmup(self, expert_map: ExpertMap) -> None:
        """Capture the decode graphs (start-up: seconds, so no request waits for it)."""
        if self.graphs is not None and not self.graphs.captured:
            self.graphs.capture(expert_map)

    def micro_batch_sizes(self, num_tokens: int, splittable: bool) -> list[int]:
        """The tokens of each micro-batch a step runs as: two halves of a decode step whose rows all sample
        when the executor overlaps two (``step_micro_batches``), else one."""
        if splittable and self.executor.step_micro_batches == 2 and num_tokens >= 2:
            first = (num_tokens + 1) // 2
            return [first, num_tokens - first]
        return [num_tokens]

    def forward(self, batch: ForwardBatch, expert_map: ExpertMap, sizes: list[int] | None = None) -> torch.Tensor:
        """The step through the model and the in-process or remote experts → logits; ``sizes`` (two
        entries): a decode step as two micro-batches interleaved layer by layer (``run_micro_batches``),
        logits in row order."""
        if sizes is None or len(sizes) == 1:
            return run_micro_batches([self.model.forward_steps(batch, self.attention)], self.executor,
                                     expert_map)[0]
        if not self._split_logged:
            self._split_logged = True
            logger.info("two micro-batches in flight: a decode step of %d sequences runs as halves of %s",
                        batch.num_tokens, sizes)
        halves = split_decode_batch(batch, sizes[0], self.num_splits)
        logits = run_micro_batches([self.model.forward_steps(half, self.attention) for half in halves],
                                   self.executor, expert_map)
        return torch.cat(logits)

    def release(self, seq: Sequence) -> None:
        if seq.row is not None:
            self._synced.pop(seq.row, None)
            self._free_rows.append(seq.row)
            seq.row = None

    def _admit(self, seq: Sequence) -> None:
        assert self._free_rows, "more running sequences than --max-running-requests rows"
        seq.row = self._free_rows.pop()
        self._synced[seq.row] = []
        self.sampler.admit(seq)

    # -- device metadata -----------------------------------------------------------------
    def _block_table_updates(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Flat indexes into block_table_pool followed by the block ids to write there, for the
        blocks each sequence gained since its row was last written (all of them after a
        preemption gave the sequence new blocks)."""
        index: list[int] = []
        value: list[int] = []
        for chunk in chunks:
            seq = chunk.seq
            table, synced = seq.block_table, self._synced[seq.row]
            if len(table) > self.max_blocks:
                raise ValueError(f"sequence {seq.request_id} needs {len(table)} KV blocks; rows hold "
                                 f"{self.max_blocks} (the context limit)")
            start = len(synced)
            if start > len(table) or table[:start] != synced:
                start = 0                       # preempted and re-admitted: new blocks from the start
            if start == len(table):
                continue
            base = seq.row * self.max_blocks
            index.extend(range(base + start, base + len(table)))
            value.extend(table[start:])
            self._synced[seq.row] = list(table)
        return index + value

    def _apply_block_table_updates(self, packed: list[int]) -> None:
        if not packed:
            return
        device = self.to_device(packed, torch.int64)
        half = len(packed) // 2
        self.block_table_pool.view(-1)[device[:half]] = device[half:].to(torch.int32)

    def resolve_placeholders(self, ids: torch.Tensor, host_ids) -> None:
        """ids [T] int64 on the device, ``host_ids`` the values it was copied from: each placeholder
        ``-(j + 1)`` among them becomes token j of the step launched before this one (``launch``)."""
        dst = [i for i, token in enumerate(host_ids) if token < 0]
        if not dst:
            return
        assert self._previous is not None, "a placeholder token id, and no step launched before to read it from"
        src = [-int(host_ids[i]) - 1 for i in dst]
        if dst == src and dst[-1] == len(dst) - 1:      # the usual case: the same sequences in the same order
            ids[:len(dst)].copy_(self._previous.device[:len(dst)])
            return
        index = self.to_device(dst + src, torch.int64)
        ids[index[:len(dst)]] = self._previous.device[index[len(dst):]]

    def to_device(self, values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        """One host-to-device copy (from pinned memory on a GPU, so it does not stall the host)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def eager_batch(self, chunks: list[ScheduledChunk], decode: bool) -> ForwardBatch:
        """The step as device tensors, from one packed copy: [ids T | positions T | slots T |
        rows B | context B | query starts B+1 | logits rows B']."""
        block_size = self.block_size
        ids, positions, slots, rows, context, starts, logits_rows = [], [], [], [], [], [0], []
        for chunk in chunks:
            seq = chunk.seq
            begin, end = seq.num_cached, seq.num_cached + chunk.num_tokens
            ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(begin, end))
            rows.append(seq.row)
            context.append(end)
            starts.append(starts[-1] + chunk.num_tokens)
            if chunk.completes:
                logits_rows.append(len(ids) - 1)
        num_tokens, num_seqs = len(ids), len(chunks)
        packed = self.to_device(ids + positions + slots + rows + context + starts + logits_rows, torch.int64)
        fields = packed.split([num_tokens] * 3 + [num_seqs, num_seqs, num_seqs + 1, len(logits_rows)])
        ids_t, positions_t, slots_t, rows_t, context_t, starts_t, logits_rows_t = fields
        self.resolve_placeholders(ids_t, ids)
        meta = GpuAttentionMetadata(
            block_tables=self.block_table_pool[rows_t], context_lens=context_t.to(torch.int32),
            query_start_loc=starts_t.to(torch.int32), max_query_len=max(c.num_tokens for c in chunks),
            decode=decode, num_splits=self.num_splits(num_seqs) if decode else 1)
        return ForwardBatch(ids_t, positions_t, [c.num_tokens for c in chunks], context,
                            [], slots_t, logits_rows=logits_rows_t, device=meta)


class PendingTokens:
    """A launched step's sampled tokens: ``device [B']`` on the device (what the next step's placeholders
    read), and a copy on its way to pinned host memory that ``result()`` waits for (once).
    ``sampled``: the finished result, when sampling already waited for it (logprobs). ``check``: the
    executor's check of the step (``end_step``), run by ``result()`` once the tokens are there; it raises
    what the expert side reported (``StaleMapVersion``: the step must run again)."""

    def __init__(self, device_tokens: torch.Tensor, sampled: SampledTokens | None = None,
                 check: Callable[[], None] | None = None) -> None:
        self.device = device_tokens
        self._sampled, self._check = sampled, check
        self._host, self._event = device_tokens, None
        if sampled is None and device_tokens.is_cuda:
            self._host = torch.empty(device_tokens.shape, dtype=device_tokens.dtype, pin_memory=True)
            self._host.copy_(device_tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampledTokens:
        if self._sampled is None:
            if self._event is not None:
                self._event.synchronize()
            self._sampled = SampledTokens(self._host.tolist())
        if self._check is not None:
            check, self._check = self._check, None
            check()
        return self._sampled


def split_decode_batch(batch: ForwardBatch, first: int, num_splits) -> tuple[ForwardBatch, ForwardBatch]:
    """A decode step (one token per sequence, every row sampled) as two micro-batches: rows [0, first)
    and [first, B), views of the step's device tensors (nothing copied: a graph captures it as it is).
    ``num_splits(b)``: the split-KV count a decode of b sequences runs with."""
    meta: GpuAttentionMetadata = batch.device
    assert meta.decode and 0 < first < batch.num_tokens, "two micro-batches split decode steps of 2+ rows"
    assert batch.logits_rows is None or batch.logits_rows.numel() == batch.num_tokens, "every row must sample"
    halves = []
    for rows in (slice(0, first), slice(first, batch.num_tokens)):
        size = rows.stop - rows.start
        half_meta = GpuAttentionMetadata(block_tables=meta.block_tables[rows], context_lens=meta.context_lens[rows],
                                         query_start_loc=None, max_query_len=1, decode=True,
                                         num_splits=num_splits(size))
        halves.append(ForwardBatch(batch.input_ids[rows], batch.positions[rows], batch.seq_lens[rows],
                                   batch.context_lens[rows], batch.block_tables[rows], batch.slot_mapping[rows],
                                   logits_rows=None,
                                   padding_rows=None if batch.padding_rows is None else batch.padding_rows[rows],
                                   device=half_meta))
    return halves[0], halves[1]
