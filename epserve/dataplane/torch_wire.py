"""Wire format of the ``torch`` data plane: a fixed header, one payload buffer, tags.

Legend: n tokens in one exchange, D hidden, K top-k.

Messages of one exchange (attention rank a ↔ expert rank e, sequence number ``seq`` counted
per (a, e) link by the attention side):

- request, on the link's *request* group, a → e:
  1. header: int64 [HEADER_WORDS], tag ``TAG_HEADER`` (a FIFO stream: one sender thread,
     one receiver thread, so headers arrive in order);
  2. payload: uint8 [RequestLayout.total] = hidden [n, D] | local slot ids [n, K] int64 |
     weights [n, K], each section 64-byte aligned, tag ``tag_for(seq)``.
- reply, on the link's *reply* group, e → a: one uint8 buffer = header (512 bytes) | out
  [n, D] in the request's hidden dtype, tag ``tag_for(seq)``. The attention side posts
  this receive in ``dispatch`` (it knows n and D), so a reply lands without a handshake.
  A reply is always full size (zeros after the header when the status is not OK): gloo
  aborts the process when a message's size differs from the posted receive.
- close, a → e on the request group, tag ``TAG_HEADER``: a header with ``Kind.CLOSE``.

Tag scheme: ``tag_for(seq) = TAG_FIRST_EXCHANGE + seq mod 2**30``. Every exchange in flight
on a link has its own tag, so replies may come back in any order (two micro-batches, or a
batch that mixes layers) and a late reply can only land in its own buffer. ``TAG_CLOSE_LINK``
is never sent; ``torch_group.close_group`` waits on it to break a link.

Header words (int64): magic, kind, seq, map_version, layer, micro_batch, num_tokens (n of
this exchange), K, D, hidden dtype code, weights dtype code, status, trace-context length,
8 words of trace context (≤ 64 bytes), number of held versions, 8 held versions, error
length, 33 words of UTF-8 error text (≤ 256 bytes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from epserve.dataplane.base import MAX_TRACE_CONTEXT_BYTES, BatchHeader

MAGIC = int.from_bytes(b"EPSERVE1", "big")
HEADER_WORDS = 64
HEADER_BYTES = HEADER_WORDS * 8
TAG_HEADER = 1
TAG_CLOSE_LINK = 2
TAG_FIRST_EXCHANGE = 16
MAX_HELD_VERSIONS = 8
MAX_ERROR_BYTES = 256
_ALIGN = 64

_TRACE_AT, _HELD_COUNT_AT, _HELD_AT, _ERROR_LEN_AT, _ERROR_AT = 13, 21, 22, 30, 31

DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    CLOSE = 3


class Status(enum.IntEnum):
    OK = 0
    STALE_VERSION = 1
    ERROR = 2


class ProtocolError(RuntimeError):
    """A message that is not ours (bad magic, unknown kind or dtype): the link is unusable."""


@dataclass(frozen=True)
class WireHeader:
    kind: Kind
    seq: int
    batch: BatchHeader             # num_tokens is this exchange's n
    top_k: int = 0
    hidden_size: int = 0
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    status: Status = Status.OK
    held_versions: tuple[int, ...] = ()
    error: str = ""


def tag_for(seq: int) -> int:
    return TAG_FIRST_EXCHANGE + seq % (1 << 30)


def _bytes_to_words(data: bytes, num_words: int) -> list[int]:
    data = data.ljust(num_words * 8, b"\0")
    return [int.from_bytes(data[i:i + 8], "little", signed=True) for i in range(0, num_words * 8, 8)]


def _words_to_bytes(words: list[int], length: int) -> bytes:
    return b"".join(w.to_bytes(8, "little", signed=True) for w in words)[:length]


def encode_header(h: WireHeader) -> torch.Tensor:
    """→ int64 [HEADER_WORDS] on the CPU."""
    b = h.batch
    held = h.held_versions[-MAX_HELD_VERSIONS:]
    error = h.error.encode("utf-8")[:MAX_ERROR_BYTES]
    words = [MAGIC, int(h.kind), h.seq, b.map_version, b.layer, b.micro_batch, b.num_tokens, h.top_k,
             h.hidden_size, DTYPE_CODES[h.dtype], DTYPE_CODES[h.weight_dtype], int(h.status),
             len(b.trace_context)]
    words += _bytes_to_words(b.trace_context, MAX_TRACE_CONTEXT_BYTES // 8)
    words += [len(held), *held, *[0] * (MAX_HELD_VERSIONS - len(held))]
    words += [len(error)] + _bytes_to_words(error, HEADER_WORDS - _ERROR_AT)
    assert len(words) == HEADER_WORDS
    return torch.tensor(words, dtype=torch.int64)


def decode_header(words: list[int]) -> WireHeader:
    """words: HEADER_WORDS ints (``header_tensor.tolist()``)."""
    if len(words) != HEADER_WORDS or words[0] != MAGIC:
        raise ProtocolError(f"not an epserve data-plane header (magic {words[0]:#x})")
    try:
        kind, status = Kind(words[1]), Status(words[11])
        dtype, weight_dtype = _DTYPES[words[9]], _DTYPES[words[10]]
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"bad data-plane header: {exc}") from exc
    trace = _words_to_bytes(words[_TRACE_AT:_HELD_COUNT_AT], words[12])
    held = tuple(words[_HELD_AT:_HELD_AT + words[_HELD_COUNT_AT]])
    error = _words_to_bytes(words[_ERROR_AT:], words[_ERROR_LEN_AT]).decode("utf-8", "replace")
    batch = BatchHeader(map_version=words[3], layer=words[4], micro_batch=words[5], num_tokens=words[6],
                        trace_context=trace)
    return WireHeader(kind, words[2], batch, words[7], words[8], dtype, weight_dtype, status, held, error)


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class RequestLayout:
    """Byte offsets of the sections of a request payload."""

    num_tokens: int
    hidden_size: int
    top_k: int
    dtype: torch.dtype
    weight_dtype: torch.dtype

    @property
    def ids_offset(self) -> int:
        return _aligned(self.num_tokens * self.hidden_size * self.dtype.itemsize)

    @property
    def weights_offset(self) -> int:
        return self.ids_offset + _aligned(self.num_tokens * self.top_k * 8)

    @property
    def total(self) -> int:
        return self.weights_offset + _aligned(self.num_tokens * self.top_k * self.weight_dtype.itemsize)

    def views(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 payload → hidden [n, D], local slot ids [n, K] int64, weights [n, K] (views)."""
        n, d, k = self.num_tokens, self.hidden_size, self.top_k
        hidden = payload[:n * d * self.dtype.itemsize].view(self.dtype).view(n, d)
        ids = payload[self.ids_offset:self.ids_offset + n * k * 8].view(torch.int64).view(n, k)
        end = self.weights_offset + n * k * self.weight_dtype.itemsize
        weights = payload[self.weights_offset:end].view(self.weight_dtype).view(n, k)
        return hidden, ids, weights


def layout_of(h: WireHeader) -> RequestLayout:
    return RequestLayout(h.batch.num_tokens, h.hidden_size, h.top_k, h.dtype, h.weight_dtype)


def reply_nbytes(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    return HEADER_BYTES + num_tokens * hidden_size * dtype.itemsize


def reply_views(buf: torch.Tensor, num_tokens: int, hidden_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 reply buffer → (header int64 [HEADER_WORDS], out [n, D]) views."""
    return buf[:HEADER_BYTES].view(torch.int64), buf[HEADER_BYTES:].view(dtype).view(num_tokens, hidden_size)
