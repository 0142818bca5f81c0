"""Markdown markup is removed from what the voice reads, and nothing else is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming_tts.text.markdown import CodeBlocks, in_html_tag, reads_nothing, speakable

MARKUP = "#>-*+_~`|[]()!<&"


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
    # Inline HTML, as Markdown shows it (LLMs put <br> in table cells; captions carry <i>).
    ("<i>Narrator:</i> Hello", "Narrator: Hello"),
    ("| one<br>two | three<br/>four |", "one two three four"),
    ('<span class="x">hi</span>, <a href="https://x.com">the link</a>.', "hi, the link."),
    ("a &amp; b &gt;&gt; c&nbsp;d &#39;e&#x27;", "a & b >> c d 'e'"),
    ("10<sup>6</sup> cells", "10^6 cells"),
    ('<img src="cat.png" alt="A cat"> sleeps', "A cat sleeps"),
    # In code, as Markdown shows it: as written (the backticks themselves are not read).
    ("Use the `<br>` tag; `Option<Span>`, `&amp;`.", "Use the <br> tag; Option<Span>, &amp;."),
    ("```html\n<p>Hi &amp; bye</p>\n```", "<p>Hi &amp; bye</p>"),
    # Named references only as HTML names them (html.unescape reads "&copyright;" "©right;").
    ("&copyright; &notes; &ltb; &amp", "&copyright; &notes; &ltb; &amp"),
    # Not tags or references: comparisons, a heart, a name, entities that are none.
    ("a < b and c > d, if a<b and c>d, <3, AT&T, &nope; <script>", "a < b and c > d, if a<b and c>d, <3, AT&T, &nope; <script>"),
])
def test_markup_is_removed_and_the_words_stay(text: str, spoken: str) -> None:
    assert " ".join(speakable(text).split()) == spoken


@given(st.text())
def test_only_markup_or_link_targets_go(text: str) -> None:
    out = speakable(text)
    assert len(out) <= len(text)
    if not any(c in MARKUP for c in text):
        assert out == text
    # What is left is the text's own characters, in order (a pipe becomes a space; an HTML
    # tag may leave a space or a "^", a character reference its character).
    rest = iter(text.replace("|", " "))
    assert all(c in rest for c in out) or "<" in text or "&" in text


@given(st.text(alphabet=st.characters(blacklist_characters=MARKUP + "\n")))
def test_text_without_markup_is_read_as_it_is(text: str) -> None:
    assert speakable(text) == text


@given(st.text(alphabet=MARKUP + " \na1"))
def test_reads_nothing_is_a_blank_speakable(text: str) -> None:
    assert reads_nothing(text) == (not speakable(text).strip())


@given(st.text(alphabet="<>/&;#x1 =\"'bripsuamgt"))
def test_html_like_text_never_grows_and_reads_nothing_agrees(text: str) -> None:
    out = speakable(text)
    assert len(out) <= len(text)
    assert reads_nothing(text) == (not out.strip())


# --------------------------------------------------------------------------- fenced code blocks

REPLY = ("Sure! Here is how:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
         "Call `add(2, 3)`. Or in a shell:\n\n~~~sh\necho $((2 + 3))\n~~~\nThat's all.")


def unread(text: str) -> str:
    """The words of `text` that are not in a code block, the whole text blanked at once."""
    return " ".join(CodeBlocks().blank(text).split())


@pytest.mark.parametrize(("text", "spoken"), [
    (REPLY, "Sure! Here is how: Call `add(2, 3)`. Or in a shell: That's all."),
    # Closed only by a fence of its own character, at least as long, alone on its line.
    ("```\na\n~~~\nb\n``` c\nd\n```\nafter", "after"),
    ("````\na\n```\nb\n````\nafter", "after"),
    # Indented (in a list item), and never closed.
    ("1. Run:\n   ```sh\n   make\n   ```\n2. Done", "1. Run: 2. Done"),
    ("Text\n```\ncode to the end", "Text"),
    # Not fences: not at the start of a line; a backtick in a backtick fence's info string.
    ("Use ``` here", "Use ``` here"),
    ("```a`b\nnot code", "```a`b not code"),
])
def test_code_blocks_are_blanked(text: str, spoken: str) -> None:
    assert unread(text) == spoken
    assert len(CodeBlocks().blank(text)) == len(text)   # character for character


def _cuts(text: str, points: list[int]) -> list[str]:
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@given(st.lists(st.integers(min_value=0), max_size=12),
       st.text(alphabet="`~ a\n", max_size=40))
def test_any_cut_of_a_text_leaves_the_same_words_unread(points: list[int], tail: str) -> None:
    # Phrases can be cut anywhere (a flush in the middle of a fence line too): what is read
    # is what the whole text would give, up to the fence marks of a line cut in two (a cut
    # "``" is read before the "`" that makes it a fence comes; the voice does not read
    # backticks and tildes anyway).
    text = REPLY + tail
    blocks = CodeBlocks()
    pieces = "".join(blocks.blank(p) for p in _cuts(text, points))
    assert len(pieces) == len(text)

    def words(s: str) -> list[str]:
        return s.replace("`", " ").replace("~", " ").split()

    assert words(pieces) == words(CodeBlocks().blank(text))


@pytest.mark.parametrize(("text", "after", "inside"), [
    ('See <img alt="A cat. It sits"> here.', "A cat.", True),       # a whole tag
    ('See <img alt="A cat. It sits"> here.', "here.", False),
    ('Note <span title="Note: x">y</span>.', "Note:", True),
    ('See <img alt="A cat. It', "A cat.", None),                    # the text ends in it
    ("Hi <", "Hi", False),                                           # before the "<"
    ("a < b. Then", "b.", False),                                    # no tag: a space after "<"
    ("x <foo bar=1> y. Z", "y.", False),                             # not an HTML element's
    ('x <foo title="a. b', "a.", False),
    ("if a<b and c>d. Then", "c>d.", False),                         # attributes need values
])
def test_where_the_splitter_finds_itself_inside_a_tag(text: str, after: str,
                                                      inside: bool | None) -> None:
    pos = text.index(after) + len(after)
    assert in_html_tag(text, 0, pos) is inside
