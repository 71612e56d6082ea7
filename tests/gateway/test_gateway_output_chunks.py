"""Several token ids in one worker message (--stream-interval, or a stream catching up) give the text
and stop-string decisions of one id at a time, and say which id completed a stop string."""

from __future__ import annotations

from epserve.gateway.output_processor import OutputProcessor
from epserve.tokenizer import Tokenizer


def run(tokenizer, ids, stops, chunk):
    processor = OutputProcessor(tokenizer, stops)
    text, sent = [], []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        processed = processor.add(piece)
        text.append(processed.text)
        if processed.matched_stop is not None:
            sent += piece[:processed.consumed]
            return "".join(text), processed.matched_stop, sent
        sent += piece
    return "".join(text) + processor.finish().text, None, sent


def test_chunks_give_the_text_and_stop_of_single_ids(tiny_model):
    tokenizer = Tokenizer.from_dir(tiny_model)
    ids = tokenizer.encode("The colour of the sea is deep blue, and the sky above it is pale grey today.")
    whole = tokenizer.decode(ids)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop and whole.find(stop) == len(whole) // 2
    one = run(tokenizer, ids, [stop], 1)
    assert one[0] == whole[:whole.find(stop)] and one[1] == stop
    for chunk in (2, 3, 4, 7, len(ids)):
        assert run(tokenizer, ids, [stop], chunk) == one, chunk          # same text, stop and ids up to it
    assert run(tokenizer, ids, [], 5) == (whole, None, ids)
