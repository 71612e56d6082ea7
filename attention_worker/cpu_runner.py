"""Runs a step's forward pass and sampling on the host: the CPU path and the parity reference.

Legend: T tokens in a micro-batch, B sequences, V vocab.

``run`` splits the scheduled chunks into micro-batches by token count (contiguous, so logits stay
in chunk order), builds one ``ForwardBatch`` per micro-batch from Python lists, drives the model's
``forward_steps`` generators through the MoE executor in ping-pong (``run_micro_batches``) and
samples each completing sequence on its own ``torch.Generator`` (and, when it asked, computes its
logprobs: ``sampler.token_logprobs``). A GPU uses ``gpu_runner.py``.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.model_family import model_family
from epserve.attention_worker.kv_cache import PagedKVCache
from epserve.attention_worker.moe_executor import MoEExecutor, run_micro_batches
from epserve.attention_worker.sampler import SampledTokens, sample_one, token_logprobs
from epserve.sampling import TokenLogprob
from epserve.attention_worker.scheduler import ScheduledChunk
from epserve.attention_worker.sequence import Sequence
from epserve.expert_map import ExpertMap
from epserve.models.decoder import ForwardBatch
from epserve.models.qwen3_moe import Qwen3MoeAttentionSide

NO_TOKENS = torch.empty(0, dtype=torch.int64)


class CpuStepRunner:
    def __init__(self, model: Qwen3MoeAttentionSide, executor: MoEExecutor, kv_cache: PagedKVCache,
                 num_micro_batches: int) -> None:
        self.model, self.executor, self.kv_cache = model, executor, kv_cache
        self.attention = model_family(model.spec).make_cpu_attention(kv_cache, model.spec)
        self.num_micro_batches = num_micro_batches

    def run(self, chunks: list[ScheduledChunk], expert_map: ExpertMap) -> SampledTokens:
        """The sampled token of each completing chunk, in chunk order (and its logprobs if asked)."""
        self.executor.prepare(expert_map, self.model.device)    # device routing (torch_native on a GPU)
        groups = self._split(chunks)
        generators = [self.model.forward_steps(self._batch(group), self.attention) for group in groups]
        logits = torch.cat(run_micro_batches(generators, self.executor, expert_map))     # [B', V]
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for chunk in chunks:
            if not chunk.completes:
                continue
            seq = chunk.seq
            row = logits[len(tokens)]
            seen = torch.as_tensor(seq.token_ids) if seq.params.repetition_penalty != 1.0 else NO_TOKENS
            tokens.append(sample_one(row, seq.params, seen, seq.generator))
            logprobs.append(token_logprobs(row, seq.params, seen, tokens[-1]) if seq.params.return_logprob else None)
        return SampledTokens(tokens, logprobs if any(lp is not None for lp in logprobs) else None)

    def warmup(self, expert_map: ExpertMap) -> None:
        """Nothing to prepare on the host."""

    def release(self, seq: Sequence) -> None:
        """The sequence left the engine (nothing is held per sequence here)."""

    def _split(self, chunks: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
        n = min(self.num_micro_batches, len(chunks))
        if n <= 1:
            return [chunks]
        total = sum(c.num_tokens for c in chunks)
        groups: list[list[ScheduledChunk]] = [[]]
        acc = 0
        for chunk in chunks:          # contiguous split by token count keeps logits in chunk order
            if acc >= total * len(groups) / n and len(groups) < n and groups[-1]:
                groups.append([])
            groups[-1].append(chunk)
            acc += chunk.num_tokens
        return groups

    def _batch(self, chunks: list[ScheduledChunk]) -> ForwardBatch:
        device = self.model.device
        block_size = self.kv_cache.block_size
        ids, positions, slots, logits_rows = [], [], [], []
        for chunk in chunks:
            seq = chunk.seq
            start, end = seq.num_cached, seq.num_cached + chunk.num_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
            if chunk.completes:
                logits_rows.append(len(ids) - 1)
        as_long = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return ForwardBatch(
            input_ids=as_long(ids), positions=as_long(positions),
            seq_lens=[c.num_tokens for c in chunks],
            context_lens=[c.seq.num_cached + c.num_tokens for c in chunks],
            block_tables=[c.seq.block_table for c in chunks], slot_mapping=as_long(slots),
            logits_rows=as_long(logits_rows))
