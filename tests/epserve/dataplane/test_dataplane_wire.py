"""The torch backend's header and payload layout round-trip."""

from __future__ import annotations

import pytest
import torch

from epserve.dataplane import BatchHeader
from epserve.dataplane.torch_wire import (HEADER_WORDS, MAX_ERROR_BYTES, Kind, ProtocolError, RequestLayout, Status,
                                          WireHeader, decode_header, encode_header, reply_nbytes, reply_views)


def test_header_round_trip_keeps_every_field() -> None:
    trace = bytes(range(64))
    wire = WireHeader(Kind.REPLY, 2**40 + 3, BatchHeader(17, 47, 1, 12345, trace), 8, 7168, torch.bfloat16,
                      torch.float32, Status.STALE_VERSION, (3, 4, 5), "ünïcode " * 10, flags=1)
    words = encode_header(wire)
    assert words.shape == (HEADER_WORDS,) and words.dtype == torch.int64
    assert decode_header(words) == wire


def test_long_errors_are_truncated_and_garbage_is_refused() -> None:
    wire = WireHeader(Kind.REPLY, 0, BatchHeader(1, 0, 0, 1), status=Status.ERROR, error="é" * 500,
                      held_versions=tuple(range(20)))
    back = decode_header(encode_header(wire))
    assert len(back.error.encode()) <= MAX_ERROR_BYTES and back.error.startswith("éé")
    assert back.held_versions == tuple(range(12, 20))           # the newest 8
    with pytest.raises(ProtocolError):
        decode_header(torch.zeros(HEADER_WORDS, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_payload_sections_are_aligned_views(dtype: torch.dtype) -> None:
    layout = RequestLayout(3, 5, 2, dtype, torch.float32)      # odd sizes
    payload = torch.zeros(layout.total, dtype=torch.uint8)
    hidden, ids, weights = layout.views(payload)
    hidden.copy_(torch.arange(15).view(3, 5).to(dtype))
    ids.copy_(torch.tensor([[0, -1], [1, 2], [-1, 3]]))
    weights.fill_(0.5)
    again = layout.views(payload.clone())
    assert torch.equal(again[0], hidden) and torch.equal(again[1], ids) and torch.equal(again[2], weights)
    buf = torch.zeros(reply_nbytes(3, 5, dtype), dtype=torch.uint8)
    words, out = reply_views(buf, 3, 5, dtype)
    assert words.shape == (HEADER_WORDS,) and out.shape == (3, 5) and out.dtype == dtype
