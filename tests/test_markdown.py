"""Markdown markup is removed from what the voice reads, and nothing else is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming_tts.text.markdown import speakable

MARKUP = "#>-*+_~`|[]()!"


@pytest.mark.parametrize(("text", "spoken"), [
    ("## Title", "Title"),
    ("Here is **bold**, *italic*, __strong__ and `code()`.", "Here is bold, italic, strong and code()."),
    ("- one\n* two\n+ three\n1. four", "one two three 1. four"),
    ("> quoted **text**", "quoted text"),
    ("See [the docs](https://example.com/a_b) now.", "See the docs now."),
    ("![a chart](chart.png)", "a chart"),
    ("| a | b |\n|---|:--:|\nx", "a b x"),
    ("```python\nprint(1)\n```", "print(1)"),
    ("~~gone~~ here", "gone here"),
    ("* * *", ""),
    ("---", ""),
    # Not markup: arithmetic, identifiers, a lone asterisk, hashtags, numbers.
    ("5*3=15, snake_case, a * b, #1, x^2, 50% off, Dr. Smith", "5*3=15, snake_case, a * b, #1, x^2, 50% off, Dr. Smith"),
])
def test_markup_is_removed_and_the_words_stay(text: str, spoken: str) -> None:
    assert " ".join(speakable(text).split()) == spoken


@given(st.text())
def test_only_markup_or_link_targets_go(text: str) -> None:
    out = speakable(text)
    assert len(out) <= len(text)
    if not any(c in MARKUP for c in text):
        assert out == text
    # What is left is the text's own characters, in order (a pipe becomes a space).
    rest = iter(text.replace("|", " "))
    assert all(c in rest for c in out)


@given(st.text(alphabet=st.characters(blacklist_characters=MARKUP + "\n")))
def test_text_without_markup_is_read_as_it_is(text: str) -> None:
    assert speakable(text) == text
