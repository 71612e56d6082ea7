"""Samples every completing sequence of a step at once on the device (``kernels/sampling.py``).

Legend: B' sequences sampled this step, R device rows, V vocab.

Per step: the sequences' parameters go to the device in one copy per dtype, the batched sampler
draws all tokens (greedy rows by argmax; the others with temperature, top-k/top-p/min-p and the
repetition penalty, each from a counter-based random stream keyed by the request's seed and the
token's position, so a seeded request draws the same tokens whatever else shares the batch), and
the token ids come back in one device-to-host copy — the step's only synchronisation.

The repetition penalty needs the tokens a sequence has seen: ``seen [R + 1, V]`` (allocated the
first time a request asks for a penalty) holds them per device row, filled with the prompt when
such a sequence is admitted and with each token it samples.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.sequence import Sequence


class GpuSampler:
    def __init__(self, device: torch.device, num_rows: int, vocab_size: int) -> None:
        from epserve.kernels.sampling import SamplingTensors, sample

        self._tensors, self._sample = SamplingTensors, sample
        self.device, self.num_rows, self.vocab_size = device, num_rows, vocab_size
        self.seen: torch.Tensor | None = None            # [R + 1, V] bool, on first use

    def admit(self, seq: Sequence) -> None:
        """A sequence got device row ``seq.row``: record its prompt if it asks for a penalty."""
        if seq.params.repetition_penalty == 1.0:
            return
        if self.seen is None:
            self.seen = torch.zeros(self.num_rows + 1, self.vocab_size, dtype=torch.bool, device=self.device)
        self.seen[seq.row].zero_()
        self.seen[seq.row, torch.tensor(seq.token_ids, dtype=torch.int64).to(self.device)] = True

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [B', V] float32 (row i belongs to seqs[i]) → one token id per sequence."""
        if not seqs:
            return []
        params = [seq.params for seq in seqs]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            return torch.argmax(logits, dim=-1).tolist()
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params],
                               [p.min_p for p in params], [p.repetition_penalty for p in params]],
                              dtype=torch.float32)
        ints = torch.tensor([[p.top_k for p in params], [seq.seed for seq in seqs],
                             [seq.num_tokens for seq in seqs], [seq.row for seq in seqs]], dtype=torch.int64)
        if self.device.type == "cuda":
            floats, ints = floats.pin_memory(), ints.pin_memory()
        floats, ints = floats.to(self.device, non_blocking=True), ints.to(self.device, non_blocking=True)
        temperature, top_p, min_p, penalty = floats
        top_k, seed, position, rows = ints
        tensors = self._tensors(temperature=temperature, top_k=top_k.to(torch.int32), top_p=top_p, min_p=min_p,
                                repetition_penalty=penalty, seed=seed, position=position)
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        seen = self.seen[rows] if penalised else None
        filters = any(p.top_k > 1 or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
        tokens = self._sample(logits, tensors, seen, use_filters=filters)             # [B'] int64
        if penalised:
            self.seen[rows, tokens] = True
        return tokens.tolist()
