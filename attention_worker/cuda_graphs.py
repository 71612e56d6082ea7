"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

Legend: b a bucket's batch size, B the step's sequences (B <= b), R device rows, V vocab.

A decode step (one new token per sequence) is the same sequence of kernels whatever the
sequences are: only the data differs. ``capture`` records the whole forward pass — embedding,
every layer's attention and MoE (in-process experts, or the data-plane hand-offs), the logits —
once per bucket, largest first, into one shared memory pool. Its inputs live in one static
device buffer laid out per bucket as ``[ids b | positions b | cache slots b | rows b | context b]``
(int64); the captured region itself derives what the kernels read (``block_table_pool[rows]``,
int32 context lengths). ``replay`` copies the step's packed integers into that buffer (one copy),
pads the bucket with rows that store nothing and attend to nothing (slot -1, context 0, the
padding row), replays, and returns the first B rows of the logits. Every graph writes its logits
into one buffer ``[max_bs, V]`` allocated outside the graphs' pool, so the pool holds one
bucket's intermediates at a time rather than every bucket's outputs.

With two micro-batches (the cuda_ipc step path, ``--num-micro-batches 2``) a bucket's graph would hold the
two halves' layers interleaved (``GpuStepRunner.forward``); GPU step paths refuse two for now
(``step_experts.GPU_TWO_MICRO_BATCHES``), so today every graph holds one. Captured once, at start-up: a new expert map
reaches the graphs through the router's device buffers (updated in place), a sequence's new blocks
through ``block_table_pool``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import torch

from epserve.attention_worker.attention_triton import GpuAttentionMetadata
from epserve.attention_worker.scheduler import ScheduledChunk
from epserve.expert_map import ExpertMap
from epserve.models.decoder import ForwardBatch

logger = logging.getLogger(__name__)

NUM_FIELDS = 5      # ids, positions, slots, rows, context


@contextlib.contextmanager
def no_garbage_collection():
    """No cyclic garbage collected inside a capture: freeing an object there (an engine that was dropped,
    a pinned buffer a copy used) can record an event on another stream and invalidate the capture
    (``cudaErrorStreamCaptureInvalidated``). A capture was invalidated so on an H100 when a test built
    engines back to back (the same test alone passed); that this was the cause is our reading, not
    proven. ``torch.cuda.graph`` collects before it begins."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def batch_size_buckets(max_bs: int) -> list[int]:
    """SGLang's spacing: 1, 2, 4, 8, then every 8 to 256, then every 16; always ends at max_bs."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max_bs + 1, 16))
    return [b for b in sizes if b < max_bs] + [max_bs]


class DecodeGraphs:
    def __init__(self, runner, max_bs: int) -> None:
        self.runner = runner
        self.max_bs = max_bs
        self.buckets = batch_size_buckets(max_bs)
        self.inputs = torch.zeros(NUM_FIELDS * max_bs, dtype=torch.int64, device=runner.device)
        # Two pinned staging buffers, used in turn: the engine may launch a step before the one before it has
        # finished, and a buffer is written again only once the step that last copied from it has finished.
        self._hosts = [torch.zeros(NUM_FIELDS * max_bs, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._num_replays = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.workers: tuple[int, ...] | None = None        # the expert workers the graphs exchange with (step path)
        self.logits = torch.empty(max_bs, runner.model.spec.vocab_size, dtype=torch.float32, device=runner.device)

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _fields(self, bucket: int) -> list[torch.Tensor]:
        return list(self.inputs[:NUM_FIELDS * bucket].view(NUM_FIELDS, bucket))

    def _batch(self, bucket: int) -> ForwardBatch:
        ids, positions, slots, rows, context = self._fields(bucket)
        meta = GpuAttentionMetadata(block_tables=self.runner.block_table_pool[rows],
                                    context_lens=context.to(torch.int32), query_start_loc=None,
                                    max_query_len=1, decode=True, num_splits=self.runner.num_splits(bucket))
        # A bucket above 1 may hold padding rows: marked, they route to no expert.
        padding = (slots < 0).unsqueeze(1) if bucket > 1 else None
        return ForwardBatch(ids, positions, [], [], [], slots, logits_rows=None, padding_rows=padding, device=meta)

    def _pad(self, bucket: int) -> None:
        ids, positions, slots, rows, context = self._fields(bucket)
        ids.zero_(), positions.zero_(), context.zero_()
        slots.fill_(-1)
        rows.fill_(self.runner.num_rows)          # the padding row of block_table_pool (all zeros)

    def capture(self, expert_map: ExpertMap) -> None:
        """Warm up and capture every bucket (largest first, so smaller ones reuse its memory)."""
        start = time.perf_counter()
        self.runner.executor.prepare(expert_map, self.runner.device)
        self.workers = self.runner.executor.step_workers(expert_map)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for bucket in reversed(self.buckets):
            self._pad(bucket)
            stream.wait_stream(torch.cuda.current_stream())
            executor = self.runner.executor
            sizes = self.runner.micro_batch_sizes(bucket, splittable=True)
            with torch.cuda.stream(stream):               # compile and autotune outside the capture
                for _ in range(2):
                    executor.begin_step(sizes, expert_map)
                    self.runner.forward(self._batch(bucket), expert_map, sizes)
                    executor.finish_step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            executor.expect_step(sizes)
            with no_garbage_collection(), torch.cuda.graph(graph, pool=pool, stream=stream,
                                                           capture_error_mode="thread_local"):
                self.logits[:bucket].copy_(self.runner.forward(self._batch(bucket), expert_map, sizes))
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.buckets),
                    f"{self.buckets[0]}..{self.buckets[-1]}", time.perf_counter() - start)

    def replay(self, chunks: list[ScheduledChunk], expert_map: ExpertMap) -> torch.Tensor:
        """A decode step of len(chunks) <= max_bs sequences → logits [B, V] (the executor's
        ``finish_step`` is the caller's)."""
        num_seqs = len(chunks)
        bucket = next(b for b in self.buckets if b >= num_seqs)
        staging = self._hosts[self._num_replays % 2][:NUM_FIELDS * bucket]
        self._num_replays += 1
        host = staging.view(NUM_FIELDS, bucket)
        ids, positions, slots, rows, context = host.numpy()
        block_size = self.runner.block_size
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            position = seq.num_cached
            ids[i] = seq.token_ids[position]
            positions[i] = position
            slots[i] = seq.block_table[position // block_size] * block_size + position % block_size
            rows[i] = seq.row
            context[i] = position + 1
        ids[num_seqs:] = 0
        positions[num_seqs:] = 0
        slots[num_seqs:] = -1
        rows[num_seqs:] = self.runner.num_rows
        context[num_seqs:] = 0
        self.inputs[:NUM_FIELDS * bucket].copy_(staging, non_blocking=True)
        self.runner.resolve_placeholders(self.inputs[:num_seqs], ids[:num_seqs].tolist())
        self.runner.executor.begin_step(self.runner.micro_batch_sizes(bucket, splittable=True), expert_map)
        self.graphs[bucket].replay()
        return self.logits[:num_seqs]
