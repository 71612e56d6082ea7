"""Turns a text prompt into token ids within the gateway's limits, without stalling other streams.

Limits, cheapest first:
  bytes    a prompt over --max-prompt-bytes (UTF-8) is refused RESOURCE_EXHAUSTED before anything
           else (its length in characters already tells when it is far over);
  queue    more than --max-pending-prompts prompts tokenizing or waiting for it: RESOURCE_EXHAUSTED;
  tokens   a long prompt is counted piece by piece (``encode_limited``): once the pieces hold more
           tokens than the context allows, tokenizing stops and the prompt is refused
           (INVALID_ARGUMENT, as any prompt longer than the context) without tokenizing the rest.

Threads and processes: the ``tokenizers`` library holds the GIL while it encodes (about 0.7 s per
MB of text on one core), which would stall every thread streaming other requests' tokens. So a
prompt longer than INLINE_CHARS is encoded in a helper process (``--tokenizer-processes``, spawned
on first use; 0 = encode on the request's thread); short prompts (a millisecond or two) are
encoded in place. A helper process that dies is replaced; its request fails INTERNAL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from epserve.gateway.errors import GatewayError, ValidationError
from epserve.process import start_daemon_thread
from epserve.status_error import StatusCode
from epserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INLINE_CHARS = 4096          # shorter prompts are encoded on the request's thread (~2 ms at most)
PIECE_CHARS = 65536          # a long prompt is counted in pieces of about this many characters

_process_tokenizer: Tokenizer | None = None     # the helper process's own tokenizer (set by _start_helper)


def encode_limited(tokenizer: Tokenizer, text: str, max_tokens: int) -> tuple[list[int] | None, int]:
    """(ids, len(ids)) of ``text``; or (None, n) with n > max_tokens counted in a prefix, when the text
    is surely longer than ``max_tokens`` tokens. Pieces are cut before a space (where the pre-tokenizer
    splits anyway); a cut may still shift a count by one, so a prefix is judged too long only past
    ``max_tokens`` plus one token per piece, and the exact check is the caller's on the whole text."""
    if len(text) > PIECE_CHARS:
        counted, pieces, start = 0, 0, 0
        while start < len(text):
            end = min(start + PIECE_CHARS, len(text))
            if end < len(text):
                cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
                end = cut if cut > start else end
            counted += len(tokenizer.encode(text[start:end]))
            pieces += 1
            if counted > max_tokens + pieces:
                return None, counted
            start = end
    ids = tokenizer.encode(text)
    return ids, len(ids)


def _start_helper(model_path: str) -> None:
    """Runs first in a helper process: its tokenizer, and an exit when the gateway is gone (a gateway
    killed with SIGKILL would otherwise leave it behind, blocked on its task queue)."""
    global _process_tokenizer
    _process_tokenizer = Tokenizer.from_dir(model_path)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    start_daemon_thread(exit_with_parent, "exit-with-gateway")


def _encode_in_helper(text: str, max_tokens: int) -> tuple[list[int] | None, int]:
    assert _process_tokenizer is not None, "helper process started without its tokenizer"
    return encode_limited(_process_tokenizer, text, max_tokens)


class PromptTokenizer:
    """``max_tokens``: the most tokens a prompt may have (the context length minus one)."""

    def __init__(self, model_path: str, tokenizer: Tokenizer, max_tokens: int, max_prompt_bytes: int,
                 max_pending: int, num_processes: int) -> None:
        self._model_path, self._tokenizer = model_path, tokenizer
        self.max_tokens, self.max_prompt_bytes = max_tokens, max_prompt_bytes
        self._max_pending, self._num_processes = max_pending, num_processes
        self._lock = threading.Lock()
        self._pending = 0
        self._pool: ProcessPoolExecutor | None = None

    def encode(self, text: str, timeout_s: float | None = None) -> list[int]:
        """Raises GatewayError: RESOURCE_EXHAUSTED (bytes, queue), INVALID_ARGUMENT (surely too many
        tokens), DEADLINE_EXCEEDED (``timeout_s`` passed), INTERNAL (the helper process died)."""
        self._check_bytes(text)
        with self._lock:
            if self._pending >= self._max_pending:
                raise GatewayError(StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._pending} prompts are being tokenized, the gateway's limit "
                                   "(--max-pending-prompts); retry later")
            self._pending += 1
        try:
            if len(text) <= INLINE_CHARS or self._num_processes == 0:
                ids, counted = encode_limited(self._tokenizer, text, self.max_tokens)
            else:
                ids, counted = self._encode_elsewhere(text, timeout_s)
        finally:
            with self._lock:
                self._pending -= 1
        if ids is None:
            raise ValidationError("text", f"the prompt has more than {counted} tokens; the model's context is "
                                          f"{self.max_tokens + 1} tokens and the prompt must be shorter")
        return ids

    def _check_bytes(self, text: str) -> None:
        if len(text) > self.max_prompt_bytes:       # at least one byte per character: no need to encode it
            raise GatewayError(StatusCode.RESOURCE_EXHAUSTED, f"the prompt has {len(text)} characters, more than "
                               f"the gateway's limit of {self.max_prompt_bytes} bytes (--max-prompt-bytes)")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise GatewayError(StatusCode.RESOURCE_EXHAUSTED, f"the prompt is {size} bytes (UTF-8), more than the "
                               f"gateway's limit of {self.max_prompt_bytes} (--max-prompt-bytes)")

    def _encode_elsewhere(self, text: str, timeout_s: float | None) -> tuple[list[int] | None, int]:
        pool = self._helper_pool()
        future = pool.submit(_encode_in_helper, text, self.max_tokens)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            raise GatewayError(StatusCode.DEADLINE_EXCEEDED, "the request passed its deadline while its prompt "
                               "was being tokenized") from None
        except BrokenProcessPool:
            logger.error("a tokenizer process died; starting another")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise GatewayError(StatusCode.INTERNAL, "the tokenizer process died while tokenizing this prompt") from None

    def _helper_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: forking a process with gRPC's threads running is unsafe
                self._pool = ProcessPoolExecutor(self._num_processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_helper, initargs=(self._model_path,))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
