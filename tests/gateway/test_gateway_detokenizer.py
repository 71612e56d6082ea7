"""Incremental detokenization on a byte-level BPE whose tokens split multi-byte characters."""

from __future__ import annotations

import random

from epserve.gateway.detokenizer import IncrementalDetokenizer
from epserve.gateway.output_processor import OutputProcessor

TEXT = "Hello wörld! 日本語のテキスト 😀🎉 café 5 € naïve"


def stream(tokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*pieces, detokenizer.flush()]


def test_tokens_split_multibyte_characters(gateway_tokenizer) -> None:
    ids = gateway_tokenizer.encode(TEXT)
    partial = [gateway_tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in partial), "the test needs tokens that split a character"


def test_streamed_text_equals_full_decode_without_partial_characters(gateway_tokenizer) -> None:
    ids = gateway_tokenizer.encode(TEXT)
    for chunk in (1, 2, 3, 7):
        pieces = stream(gateway_tokenizer, ids, chunk)
        assert "".join(pieces) == gateway_tokenizer.decode(ids) == TEXT
        assert not any("\ufffd" in piece for piece in pieces)
        for piece in pieces:
            piece.encode("utf-8")  # every piece is whole characters


def test_special_tokens_are_skipped(gateway_tokenizer) -> None:
    eot = gateway_tokenizer._tokenizer.token_to_id("<|endoftext|>")
    im_start = gateway_tokenizer._tokenizer.token_to_id("<|im_start|>")
    ids = [im_start, *gateway_tokenizer.encode("日本 😀"), eot, *gateway_tokenizer.encode(" café"), eot]
    pieces = stream(gateway_tokenizer, ids)
    assert "".join(pieces) == "日本 😀 café" == gateway_tokenizer.decode(ids, skip_special_tokens=True)


def test_random_token_sequences_match_full_decode(gateway_tokenizer) -> None:
    rng = random.Random(0)
    vocab = gateway_tokenizer.vocab_size
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(gateway_tokenizer, ids)) == gateway_tokenizer.decode(ids)


def test_incomplete_character_at_the_end_is_flushed(gateway_tokenizer) -> None:
    ids = gateway_tokenizer.encode("ab 😀")
    truncated = ids[:-1]
    assert gateway_tokenizer.decode(truncated).endswith("\ufffd")
    pieces = stream(gateway_tokenizer, truncated)
    assert not any("\ufffd" in p for p in pieces[:-1])
    assert "".join(pieces) == gateway_tokenizer.decode(truncated)


def test_output_processor_stop_string_across_tokens(gateway_tokenizer) -> None:
    ids = gateway_tokenizer.encode("Hello wörld! 日本語のテキスト")
    processor = OutputProcessor(gateway_tokenizer, ["日本語"])
    text, matched = "", None
    for token in ids:
        out = processor.add([token])
        text += out.text
        if out.matched_stop is not None:
            matched = out.matched_stop
            break
    assert matched == "日本語"
    assert text == "Hello wörld! "
