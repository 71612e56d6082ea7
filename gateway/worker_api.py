"""What the request manager needs from an attention worker, without gRPC: plain request/step
dataclasses, the errors a worker stream raises, and small Protocols implemented over gRPC by
worker_client.py / worker_pool.py and by fakes in tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from epserve.sampling import FinishReason, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class WorkerRequest:
    request_id: str
    prompt_ids: tuple[int, ...]        # the prompt, plus the tokens already streamed on a retry
    sampling: SamplingParams           # max_new_tokens = what is left; stop strings stay in the gateway
    num_generated_before: int = 0      # how many of prompt_ids were generated (retry)


@dataclass(frozen=True)
class WorkerStep:
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop_token: int | None = None   # the stop token (EOS or stop_token_ids) that ended it
    logprobs: tuple[TokenLogprob, ...] = ()   # return_logprob: one per token_ids entry


@dataclass(frozen=True)
class WorkerLoad:
    num_running: int
    num_waiting: int
    outstanding_tokens: int | None     # None: the worker does not report load
    kv_blocks_free: int | None = None
    kv_blocks_total: int | None = None


class WorkerLost(Exception):
    """The worker went away (UNAVAILABLE, its stream cut): the request may run elsewhere."""


class WorkerSlow(WorkerLost):
    """A probe got no answer in time: the worker may only be starved of CPU for a moment."""


class WorkerTimeout(Exception):
    """The request's deadline passed while waiting on the worker."""


class StreamCancelled(Exception):
    """The gateway itself cancelled the stream (abort, client gone, stop string, shutdown)."""


class WorkerFailed(Exception):
    """The worker rejected or failed the request; retrying elsewhere would not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WorkerStream(Protocol):
    def __iter__(self) -> Iterator[WorkerStep]:
        """Steps until the finished one; raises WorkerLost / WorkerTimeout / StreamCancelled /
        WorkerFailed. Ending without a finished step also means the worker was lost."""
        ...

    def cancel(self) -> None: ...


class WorkerClient(Protocol):
    address: str

    def generate(self, request: WorkerRequest, timeout_s: float) -> WorkerStream: ...

    def abort(self, request_id: str) -> bool:
        """Aborts at the worker, waiting at most the RPC deadline; False if not found or failed."""
        ...

    def abort_nowait(self, request_id: str) -> None:
        """Sends an abort without waiting for the answer."""
        ...


class WorkerDirectory(Protocol):
    """The workers the request manager may route to."""

    def reachable(self) -> Sequence[str]: ...

    def client(self, address: str) -> WorkerClient: ...

    def mark_lost(self, address: str, reason: str) -> None: ...
