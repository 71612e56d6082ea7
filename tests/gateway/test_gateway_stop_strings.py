"""Stop strings: matched across chunks, held back while undecided, never returned."""

from __future__ import annotations

from epserve.gateway.stop_strings import StopStringMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], str | None, str]:
    matcher = StopStringMatcher(stops)
    out: list[str] = []
    for chunk in chunks:
        text, matched = matcher.add(chunk)
        out.append(text)
        if matched is not None:
            return out, matched, ""
    return out, None, matcher.flush()


def test_no_stop_strings_passes_text_through() -> None:
    assert run([], ["ab", "cd"]) == (["ab", "cd"], None, "")


def test_stop_string_split_across_chunks_is_held_back_then_dropped() -> None:
    out, matched, _ = run(["STOP"], ["hello S", "T", "OP and more"])
    assert out == ["hello ", "", ""]
    assert matched == "STOP"


def test_held_prefix_released_when_it_does_not_become_a_stop() -> None:
    out, matched, tail = run(["STOP"], ["a ST", "ay here"])
    assert out == ["a ", "STay here"]
    assert matched is None and tail == ""


def test_held_text_flushed_at_end_of_stream() -> None:
    out, matched, tail = run(["</s>"], ["end </"])
    assert out == ["end "] and matched is None and tail == "</"


def test_earliest_stop_wins_and_text_after_it_is_dropped() -> None:
    out, matched, _ = run(["world", "lo"], ["hello world"])
    assert out == ["hel"] and matched == "lo"


def test_stop_string_inside_one_chunk_and_multibyte() -> None:
    out, matched, _ = run(["。"], ["日本語", "です。東京"])
    assert "".join(out) == "日本語です" and matched == "。"


def test_overlapping_prefixes_hold_the_longest_candidate() -> None:
    matcher = StopStringMatcher(["abc", "bcd"])
    assert matcher.add("xab") == ("x", None)    # "ab" could start "abc"
    assert matcher.add("cd") == ("", "abc")
