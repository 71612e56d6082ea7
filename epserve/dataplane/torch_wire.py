"""Wire format of the ``torch`` data plane: a fixed header, one payload buffer, tags.

Legend: n tokens in one exchange, D hidden, K top-k.

Messages of one exchange (attention rank a ↔ expert rank e, sequence number ``seq`` counted
per (a, e) link by the attention side):

- request, on the link's *request* group, a → e, tag ``TAG_HEADER`` (a FIFO stream: one
  sender thread, one receiver thread, so requests arrive in order). The expert keeps a
  receive of ``capacity`` bytes posted (``request_capacity``):
  - small requests (header + payload ≤ capacity): ONE message, header (512 bytes) then the
    payload, flag ``INLINE``. gloo's TCP transport accepts a message shorter than the posted
    receive (checked: it enforces length ≤ posted size), and the header says how long the
    payload is. One message instead of two saves a round of handshakes and two thread
    wake-ups per exchange — what dominates latency at small T.
  - larger requests (and NCCL, which needs equal sizes: capacity = the header alone): the
    header message alone, then the payload as a second message with tag ``tag_for(seq)``.
  payload = hidden [n, D] | local slot ids [n, K] int64 | weights [n, K], each section
  64-byte aligned (``RequestLayout``).
- reply, on the link's *reply* group, e → a: one uint8 buffer = header (512 bytes) | out
  [n, D] in the request's hidden dtype, tag ``tag_for(seq)``. The attention side posts
  this receive in ``dispatch`` (it knows n and D), so a reply lands without a handshake.
  A reply is always full size (zeros after the header when the status is not OK).
- close, a → e on the request group: a header with ``Kind.CLOSE``.

Tag scheme: ``tag_for(seq) = TAG_FIRST_EXCHANGE + seq mod 2**30``. Every exchange in flight
on a link has its own tag, so replies may come back in any order (two micro-batches, or a
batch that mixes layers) and a late reply can only land in its own buffer. ``TAG_CLOSE_LINK``
is never sent; ``torch_group.close_group`` waits on it to break a link.

Header words (int64): magic, kind, seq, map_version, layer, micro_batch, num_tokens (n of
this exchange), K, D, hidden dtype code, weights dtype code, status, trace-context length,
flags, attempt (the sender's id of this try of the layer: a reply carries its request's),
8 words of trace context (≤ 64 bytes), number of held versions, 8 held versions, error
length, 31 words of UTF-8 error text (≤ 248 bytes).
"""

from __future__ import annotations

import enum
import struct
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
MAX_ERROR_BYTES = 248
INLINE_CAPACITY = 256 * 1024   # bytes of a request the expert side receives in one message (gloo)
FLAG_INLINE = 1                 # the payload follows the header in the same message
_ALIGN = 64

_FIXED_WORDS = 15
# positions in the unpacked tuple: 15 fixed words, trace bytes, held count, held versions, error length, error
_TRACE, _HELD_COUNT, _HELD, _ERROR_LEN, _ERROR = 15, 16, 17, 17 + MAX_HELD_VERSIONS, 18 + MAX_HELD_VERSIONS
_HEADER_FORMAT = f"<{_FIXED_WORDS}q{MAX_TRACE_CONTEXT_BYTES}sq{MAX_HELD_VERSIONS}qq{MAX_ERROR_BYTES}s"
assert struct.calcsize(_HEADER_FORMAT) == 512

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
    flags: int = 0


def tag_for(seq: int) -> int:
    return TAG_FIRST_EXCHANGE + seq % (1 << 30)


def encode_header(h: WireHeader) -> torch.Tensor:
    """→ int64 [HEADER_WORDS] on the CPU."""
    b = h.batch
    held = h.held_versions[-MAX_HELD_VERSIONS:]
    error = h.error.encode("utf-8")[:MAX_ERROR_BYTES]
    data = struct.pack(_HEADER_FORMAT, MAGIC, int(h.kind), h.seq, b.map_version, b.layer, b.micro_batch,
                       b.num_tokens, h.top_k, h.hidden_size, DTYPE_CODES[h.dtype], DTYPE_CODES[h.weight_dtype],
                       int(h.status), len(b.trace_context), h.flags, b.attempt, b.trace_context, len(held),
                       *held, *[0] * (MAX_HELD_VERSIONS - len(held)), len(error), error)
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


def decode_header(words: torch.Tensor) -> WireHeader:
    """words: int64 [HEADER_WORDS] on the CPU."""
    if words.numel() != HEADER_WORDS:
        raise ProtocolError(f"a data-plane header has {HEADER_WORDS} words, got {words.numel()}")
    fields = struct.unpack(_HEADER_FORMAT, words.numpy().tobytes())
    if fields[0] != MAGIC:
        raise ProtocolError(f"not an epserve data-plane header (magic {fields[0]:#x})")
    try:
        kind, status = Kind(fields[1]), Status(fields[11])
        dtype, weight_dtype = _DTYPES[fields[9]], _DTYPES[fields[10]]
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"bad data-plane header: {exc}") from exc
    trace = fields[_TRACE][:fields[12]]
    held = fields[_HELD:_HELD + fields[_HELD_COUNT]]
    error = fields[_ERROR][:fields[_ERROR_LEN]]
    batch = BatchHeader(map_version=fields[3], layer=fields[4], micro_batch=fields[5], num_tokens=fields[6],
                        trace_context=trace, attempt=fields[14])
    return WireHeader(kind, fields[2], batch, fields[7], fields[8], dtype, weight_dtype, status, tuple(held),
                      error.decode("utf-8", "replace"), fields[13])


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


def request_capacity(device: torch.device) -> int:
    """Bytes the expert side posts for the next request: INLINE_CAPACITY on gloo; the header
    alone on NCCL, whose receives must match the sent size exactly."""
    return HEADER_BYTES if device.type == "cuda" else INLINE_CAPACITY


def reply_nbytes(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    return HEADER_BYTES + num_tokens * hidden_size * dtype.itemsize


def reply_views(buf: torch.Tensor, num_tokens: int, hidden_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 reply buffer → (header int64 [HEADER_WORDS], out [n, D]) views."""
    return buf[:HEADER_BYTES].view(torch.int64), buf[HEADER_BYTES:].view(dtype).view(num_tokens, hidden_size)
