"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step serves all running sequences (1 token for a decode, a chunk of the prompt for a
prefill) and admits waiting ones while the token budget (``max_num_batched_tokens``), the
sequence budget (``max_num_seqs``) and free KV blocks allow. Requests join and leave between
steps. When a decode needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from epserve.attention_worker.kv_cache import BlockAllocator
from epserve.attention_worker.sequence import Sequence


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int                      # tokens [seq.num_cached, seq.num_cached + num_tokens)
    completes: bool = field(init=False)  # reaches the sequence's last token (as scheduled): a token is sampled

    def __post_init__(self) -> None:     # read several times per step by the runner and the engine
        self.completes = self.seq.num_cached + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.allocator = allocator
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its KV blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: set[int] = set()            # ids: a membership test per sequence stays O(1)
        for seq in list(self.running):
            if id(seq) in preempted:
                continue                       # preempted below by an earlier iteration
            n = min(seq.num_uncached, budget)
            if n == 0:
                break
            while not self._reserve(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(id(victim))
                if victim is seq:
                    break
            if id(seq) not in preempted:
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncached, budget)
            if not self._reserve(seq, n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        need = self.allocator.blocks_needed(seq.num_cached + num_new, len(seq.block_table))
        if need == 0:                          # most decode steps: the last block has room
            return True
        if need > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """``seq`` is the most recently admitted running sequence (the list's last)."""
        assert self.running[-1] is seq
        self.running.pop()
        self._release(seq)
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
