"""Samples every completing sequence of a step at once on the device (``kernels/sampling.py``).

Legend: B' sequences sampled this step, A of them asking for logprobs, N top logprobs, R device
rows, V vocab.

Per step: the sequences' parameters go to the device in one copy per dtype, the batched sampler
draws all tokens (greedy rows by argmax; the others with temperature, top-k/top-p/min-p and the
repetition penalty, each from a counter-based random stream keyed by the request's seed and the
token's position, so a seeded request draws the same tokens whatever else shares the batch), and
the token ids come back in one device-to-host copy — the step's only synchronisation.

Logprobs (``return_logprob``, sampler.py says what they are): only for a step where a sequence
asked, on the device — the asking rows' logits, penalised (``seen``, before this step's tokens are
marked) and divided by the temperature, log-softmax in float32, the sampled token's value and the
top N — packed after the token ids into the same one device-to-host copy (float64: token ids are
exact). A step where no sequence asked runs exactly as without the feature.

The repetition penalty needs the tokens a sequence has seen: ``seen [R + 1, V]`` (allocated the
first time a request asks for a penalty) holds them per device row, filled with the prompt when
such a sequence is admitted and with each token it samples.
"""

from __future__ import annotations

import torch

from epserve.attention_worker.sampler import SampledTokens
from epserve.sampling import TokenLogprob
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

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """logits [B', V] float32 (row i belongs to seqs[i]) → one token id per sequence (and the
        logprobs of those that asked)."""
        tokens, sampled = self.sample_on_device(logits, seqs)
        return sampled if sampled is not None else SampledTokens(tokens.tolist())

    def sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, SampledTokens | None]:
        """logits [B', V] float32 → (tokens [B'] int64 on the device, None), with nothing waited for; when a
        sequence asked for logprobs, the second item is the finished result (its one copy to the host waits
        for the step). Each token is drawn at position ``seq.num_tokens`` of its sequence."""
        if not seqs:
            return torch.zeros(0, dtype=torch.int64, device=logits.device), SampledTokens([])
        params = [seq.params for seq in seqs]
        asking = [i for i, p in enumerate(params) if p.return_logprob]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            tokens = torch.argmax(logits, dim=-1)
            return tokens, self._with_logprobs(logits, tokens, seqs, asking) if asking else None
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
        sampled = self._with_logprobs(logits, tokens, seqs, asking) if asking else None
        if penalised:
            self.seen[rows, tokens] = True      # after the logprobs: they see the tokens before this one
        return tokens, sampled

    def _with_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence],
                       asking: list[int]) -> SampledTokens:
        """tokens [B'] on the device → the tokens and the asking rows' logprobs, in one device-to-host
        copy of ``[tokens B' | logprob A | top ids A*N | top logprobs A*N]`` (float64)."""
        params = [seqs[i].params for i in asking]
        n = max(p.top_logprobs_num for p in params)
        host = torch.tensor([asking, [p.repetition_penalty for p in params], [p.logprob_temperature for p in params],
                             [seqs[i].row for i in asking]], dtype=torch.float64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        index, penalty, temperature, rows = host.to(self.device, non_blocking=True)           # [A] each
        index = index.long()
        x = logits[index].float()                                                             # [A, V]
        if self.seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            penalty = penalty.float()[:, None]
            x = torch.where(self.seen[rows.long()], torch.where(x > 0, x / penalty, x * penalty), x)
        if any(p.logprob_temperature != 1.0 for p in params):
            x = x / temperature.float()[:, None]
        logprobs = torch.log_softmax(x, dim=-1)                                               # [A, V]
        parts = [tokens.double(), logprobs.gather(1, tokens[index][:, None]).view(-1).double()]
        if n:
            top = torch.topk(logprobs, min(n, logprobs.shape[1]), dim=-1)                      # [A, N]
            parts += [top.indices.view(-1).double(), top.values.view(-1).double()]
        packed = torch.cat(parts).tolist()
        num_tokens, num_asking = len(seqs), len(asking)
        n = min(n, logprobs.shape[1])
        token_ids = [int(t) for t in packed[:num_tokens]]
        chosen = packed[num_tokens:num_tokens + num_asking]
        top_ids = packed[num_tokens + num_asking:num_tokens + num_asking * (1 + n)]
        top_values = packed[num_tokens + num_asking * (1 + n):]
        result: list[TokenLogprob | None] = [None] * num_tokens
        for a, (i, p) in enumerate(zip(asking, params)):
            k = p.top_logprobs_num
            result[i] = TokenLogprob(chosen[a], tuple(int(t) for t in top_ids[a * n:a * n + k]),
                                      tuple(top_values[a * n:a * n + k]))
        return SampledTokens(token_ids, result)
