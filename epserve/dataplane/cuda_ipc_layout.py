"""Layout of one ``cuda_ipc`` channel: control words (host shared) and data regions (host or GPU).

Legend: Tmax the most tokens a channel holds, D hidden, K top-k, n tokens of one exchange,
W expert ranks, M micro-batch slots.

A channel is the fixed meeting point of one attention rank a, one expert rank e and one
micro-batch slot m (c = w * M + m in a's segment, w = e's worker index). Its memory:

- control words, int64 [CTRL_WORDS], always in host shared memory (both hosts read them
  without a device sync):
  - request header (a writes, e reads): REQ_SEQ | map version, layer, micro-batch, n, dtypes,
    trace context. REQ_SEQ is written last; the expert serves every REQ_SEQ it has not served.
  - reply header (e writes, a reads): RSP_SEQ | status, held versions, error text. RSP_SEQ is
    written last, equal to the REQ_SEQ it answers; a waits for ``RSP_SEQ == its seq``, so a
    late reply (an earlier seq) or a repeated one is never taken for the current one.
  - step announcements (a writes once per step, the graph-capturable path, ``cuda_ipc_step``), a
    ring of STEP_RING, step s in entry s % STEP_RING: STEP_SEQ | bucket size T, map version, number
    of MoE layers, slots per worker, trace, and the group: the attention step's number (0: none) and
    how many slots it announced together (the micro-batches of one step; the expert side serves them
    whole, ``cuda_ipc_step_server``). The ring lets step s + 1 be announced before step s's status is
    read (the attention worker's overlap schedule); step s + 2 waits for step s's status.
  - step statuses (e writes), the same ring: STEP_STATUS_SEQ | status, held versions, error text.
  - lifecycle: ATTENTION_STATE (closed), EXPERT_STATE (serving, stopped).
- data (``ChannelShape.data_bytes``, 256-byte aligned sections): hidden [Tmax, D] | local slot
  ids [Tmax, K] int64 | weights [Tmax, K] in 8-byte cells (any float dtype up to 8 bytes,
  named per message) | partial [Tmax, D] | flags: 4 int64 words 128 bytes apart (REQUEST,
  REPLY, STEP_IN, STEP_OUT), written and awaited by the device-flag readiness.

Writes of the control words go through numpy views of the shared mapping: one plain 8-byte
store each. The protocol relies on stores becoming visible in program order (x86-64's TSO; an
aarch64 host would need a fence before each sequence number — not handled).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from epserve.dataplane.base import MAX_TRACE_CONTEXT_BYTES

CTRL_WORDS = 512
CTRL_BYTES = CTRL_WORDS * 8
MAX_HELD_VERSIONS = 8
MAX_ERROR_BYTES = 256
_TRACE_WORDS = MAX_TRACE_CONTEXT_BYTES // 8
_ERROR_WORDS = MAX_ERROR_BYTES // 8
_ALIGN = 256
FLAG_STRIDE_BYTES = 128

# request header (attention → expert)
REQ_SEQ, REQ_MAP_VERSION, REQ_LAYER, REQ_MICRO_BATCH, REQ_NUM_TOKENS, REQ_DTYPE, REQ_WEIGHT_DTYPE = range(7)
REQ_TRACE = 8                                   # trace length, then _TRACE_WORDS words
# reply header (expert → attention): seq, then a status block
RSP_SEQ, RSP_STATUS = 32, 33                    # status block: status, held count, held, error length, error
_STATUS_BLOCK_WORDS = 3 + MAX_HELD_VERSIONS + _ERROR_WORDS
# The step path's rings: STEP_RING step announcements (attention → expert) and as many step statuses
# (expert → attention); step s uses entry s % STEP_RING of each (``Channel.step_header``/``step_status``),
# so the attention side may announce step s + 1 before it reads step s's status (the overlap schedule).
STEP_RING = 2
# words of one announcement, from its start
STEP_SEQ, STEP_NUM_TOKENS, STEP_MAP_VERSION, STEP_NUM_LAYERS, STEP_SLOTS_PER_WORKER = range(5)
STEP_DTYPE, STEP_WEIGHT_DTYPE, STEP_GROUP, STEP_GROUP_SIZE = range(5, 9)
STEP_TRACE = 9                                  # trace length, then _TRACE_WORDS words
STEP_HEADER_WORDS = STEP_TRACE + 1 + _TRACE_WORDS
# words of one step status, from its start
STEP_STATUS_SEQ, STEP_STATUS = 0, 1
STEP_STATUS_WORDS = STEP_STATUS + _STATUS_BLOCK_WORDS
STEP_HEADERS_AT = 96
STEP_STATUSES_AT = STEP_HEADERS_AT + STEP_RING * STEP_HEADER_WORDS
# lifecycle
ATTENTION_STATE, EXPERT_STATE = 480, 481
assert RSP_STATUS + _STATUS_BLOCK_WORDS <= STEP_HEADERS_AT
assert STEP_STATUSES_AT + STEP_RING * STEP_STATUS_WORDS <= ATTENTION_STATE < EXPERT_STATE < CTRL_WORDS

DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Status(enum.IntEnum):
    OK = 0
    STALE_VERSION = 1
    ERROR = 2


class AttentionState(enum.IntEnum):
    OPEN = 0
    CLOSED = 1


class ExpertState(enum.IntEnum):
    JOINING = 0
    SERVING = 1
    STOPPED = 2


class Flag(enum.IntEnum):
    """The device flags of a channel (index of the word, FLAG_STRIDE_BYTES apart)."""

    REQUEST = 0     # attention's data of request seq is in place
    REPLY = 1       # expert's partial of reply seq is in place
    STEP_IN = 2     # attention's data of (step, layer) is in place
    STEP_OUT = 3    # expert's partial of (step, layer) is in place


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class ChannelShape:
    """What every channel of one attention rank holds: Tmax tokens of D hidden, K choices, ``dtype``."""

    max_tokens: int
    hidden_size: int
    top_k: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.hidden_size < 1 or self.top_k < 1:
            raise ValueError(f"a cuda_ipc channel needs max_tokens, hidden_size and top_k >= 1; got {self}")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"cuda_ipc channels carry {list(DTYPE_CODES)}, not {self.dtype}")

    @property
    def hidden_bytes(self) -> int:
        return _aligned(self.max_tokens * self.hidden_size * self.dtype.itemsize)

    @property
    def choice_bytes(self) -> int:
        """Bytes of the slot-id section and of the weight section (8 bytes per choice)."""
        return _aligned(self.max_tokens * self.top_k * 8)

    @property
    def data_bytes(self) -> int:
        return 2 * self.hidden_bytes + 2 * self.choice_bytes + len(Flag) * FLAG_STRIDE_BYTES

    def to_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "hidden_size": self.hidden_size, "top_k": self.top_k,
                "dtype": DTYPE_CODES[self.dtype]}

    @classmethod
    def from_dict(cls, d: dict) -> ChannelShape:
        return cls(int(d["max_tokens"]), int(d["hidden_size"]), int(d["top_k"]), DTYPES[int(d["dtype"])])


class Channel:
    """Views of one channel: ``words`` (numpy int64 [CTRL_WORDS], host shared) and the data tensors.

    ``ctrl``: uint8 [CTRL_BYTES] host-shared; ``data``: uint8 [shape.data_bytes] on the transport's
    device. Nothing is copied: every view aliases the shared memory.
    """

    def __init__(self, attention_rank: int, worker: int, slot: int, shape: ChannelShape, ctrl: torch.Tensor,
                 data: torch.Tensor) -> None:
        assert ctrl.dtype == torch.uint8 and ctrl.numel() == CTRL_BYTES and ctrl.device.type == "cpu"
        assert data.dtype == torch.uint8 and data.numel() == shape.data_bytes
        self.attention_rank, self.worker, self.slot, self.shape = attention_rank, worker, slot, shape
        self.words: np.ndarray = ctrl.view(torch.int64).numpy()
        t, d, k = shape.max_tokens, shape.hidden_size, shape.top_k
        hb, cb = shape.hidden_bytes, shape.choice_bytes
        self.device = data.device
        self.hidden = data[:t * d * shape.dtype.itemsize].view(shape.dtype).view(t, d)              # [Tmax, D]
        self.slot_ids = data[hb:hb + t * k * 8].view(torch.int64).view(t, k)                       # [Tmax, K]
        self._weights = data[hb + cb:hb + cb + t * k * 8]                                           # 8-byte cells
        self.partial = data[hb + 2 * cb:hb + 2 * cb + t * d * shape.dtype.itemsize].view(shape.dtype).view(t, d)
        flags_at = 2 * hb + 2 * cb
        self._flags = data[flags_at:flags_at + len(Flag) * FLAG_STRIDE_BYTES].view(torch.int64)
        self.events: dict[Flag, object] = {}       # readiness 'events': Flag.REQUEST/REPLY → torch.cuda.Event
        # expert side: the last request and step announced before this process mapped the channel (a restarted
        # expert worker serves only what comes after: ``cuda_ipc_join.join_expert``)
        self.joined_at: tuple[int, int] = (0, 0)

    def mark_joined(self) -> None:
        """Expert side, at the join: what is already in the channel is not for this process."""
        last_step = max(int(self.step_header(i)[STEP_SEQ]) for i in range(STEP_RING))
        self.joined_at = (int(self.words[REQ_SEQ]), last_step)

    def weights(self, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """The weight section as [n, K] of ``dtype`` (itemsize <= 8)."""
        k = self.shape.top_k
        return self._weights[:num_tokens * k * dtype.itemsize].view(dtype).view(num_tokens, k)

    def step_header(self, step: int) -> np.ndarray:
        """The announcement words of step ``step`` (its ring entry; STEP_SEQ, STEP_NUM_TOKENS... index it)."""
        at = STEP_HEADERS_AT + step % STEP_RING * STEP_HEADER_WORDS
        return self.words[at:at + STEP_HEADER_WORDS]

    def step_status(self, step: int) -> np.ndarray:
        """The status words of step ``step`` (its ring entry; STEP_STATUS_SEQ, STEP_STATUS index it)."""
        at = STEP_STATUSES_AT + step % STEP_RING * STEP_STATUS_WORDS
        return self.words[at:at + STEP_STATUS_WORDS]

    def flag(self, which: Flag) -> torch.Tensor:
        """int64 [1] view of one device flag."""
        at = int(which) * FLAG_STRIDE_BYTES // 8
        return self._flags[at:at + 1]

    def __repr__(self) -> str:
        return f"Channel(attention {self.attention_rank}, worker {self.worker}, slot {self.slot})"


def write_trace(words: np.ndarray, at: int, trace: bytes) -> None:
    assert len(trace) <= MAX_TRACE_CONTEXT_BYTES
    padded = trace.ljust(MAX_TRACE_CONTEXT_BYTES, b"\0")
    words[at] = len(trace)
    words[at + 1:at + 1 + _TRACE_WORDS] = np.frombuffer(padded, dtype=np.int64)


def read_trace(words: np.ndarray, at: int) -> bytes:
    length = int(words[at])
    if not 0 <= length <= MAX_TRACE_CONTEXT_BYTES:
        return b""
    return words[at + 1:at + 1 + _TRACE_WORDS].tobytes()[:length]


def write_status(words: np.ndarray, at: int, status: Status, held_versions: tuple[int, ...] = (),
                 error: str = "") -> None:
    """The status block at word ``at``: status, held count, held versions, error length, error text."""
    held = held_versions[-MAX_HELD_VERSIONS:]
    text = error.encode("utf-8")[:MAX_ERROR_BYTES]
    words[at] = int(status)
    words[at + 1] = len(held)
    words[at + 2:at + 2 + len(held)] = held
    words[at + 2 + MAX_HELD_VERSIONS] = len(text)
    error_at = at + 3 + MAX_HELD_VERSIONS
    words[error_at:error_at + _ERROR_WORDS] = np.frombuffer(text.ljust(MAX_ERROR_BYTES, b"\0"), dtype=np.int64)


def read_status(words: np.ndarray, at: int) -> tuple[Status, tuple[int, ...], str]:
    """→ (status, held versions, error text); an unknown status reads as ERROR."""
    try:
        status = Status(int(words[at]))
    except ValueError:
        return Status.ERROR, (), f"unknown status code {int(words[at])}"
    count = min(max(int(words[at + 1]), 0), MAX_HELD_VERSIONS)
    held = tuple(int(v) for v in words[at + 2:at + 2 + count])
    length = min(max(int(words[at + 2 + MAX_HELD_VERSIONS]), 0), MAX_ERROR_BYTES)
    error_at = at + 3 + MAX_HELD_VERSIONS
    error = words[error_at:error_at + _ERROR_WORDS].tobytes()[:length].decode("utf-8", "replace")
    return status, held, error
