"""Markdown markup out of the text a voice reads, so "**bold**" is not read "asterisk asterisk".

An LLM's replies are Markdown, and espeak-ng reads every symbol it is given: "## Title" as
"hash hash title", "* * *" as three asterisks. `speakable` removes the markup and leaves the
words as they are written ("**bold**," becomes "bold,", so word timings name "bold,"):

- at the start of a line (or of a phrase): heading marks (`#`..`######` and a space), block
  quote marks (`>`), list bullets (`-`, `*`, `+` and a space); numbered items stay ("1." reads
  "one"); a line of only `-`, `*` or `_` (a rule); a code fence and its language tag;
- inline: backticks; `*`, `**`, `_`, `__`, `~~` runs that open or close emphasis (next to a
  word on one side, a space, punctuation or the end on the other), so `5*3`, `snake_case` and a
  lone ` * ` stay as written; link and image syntax (`[text](url)` reads "text"); table pipes
  (a space each) and table rules;
- inline HTML, as Markdown shows it: tags of HTML's own elements are not read (`<i>`, `<sup>`,
  `<span class="x">`; one that breaks a line, `<br>`, `<p>`, `<li>`..., leaves a space, so the
  words on either side stay apart; `<sup>` a "^"), and character references are read as the character they
  stand for (`&amp;` "&", `&gt;`, `&nbsp;`, `&#39;`; named ones only as HTML names them), an
  image's `alt` read as `![alt](src)` is; in code (a backtick span, a fenced block within the
  text at hand) both stay as written. "a < b", "<3" and "AT&T" stay.

Only what Markdown would not show is removed: text that is not Markdown comes through as is,
apart from those symbols, which espeak would only spell out.
"""

from __future__ import annotations

import html
import html.entities
import re

_LINE = re.compile(r"^[ \t]*+(?:```.*|~~~.*|[-*_][ \t]*(?:[-*_][ \t]*){2,}$|#{1,6}(?=[ \t]|$)|"
                   r"(?:>[ \t]?)+|[-*+](?=[ \t])|\|?(?:[ \t]*:?-+:?[ \t]*\|)+(?:[ \t]*:?-+:?)?[ \t]*$)",
                   re.MULTILINE)
_EMPHASIS = re.compile(r"(?<![\w*_~])(?:\*{1,3}|_{1,3}|~~)(?=[^\s*_~])"
                       r"|(?<=[^\s*_~])(?:\*{1,3}|_{1,3}|~~)(?![\w*_~])")
_LINK = re.compile(r"!?\[([^\]\[\n]*)\]\([^)\s]*(?:\s+\"[^\"\n]*\")?\)")


# An HTML tag (CommonMark's open and closing tags), kept only where it names an element of HTML.
# Attributes with values only: "if a<b and c>d" is no tag to a reader (CommonMark's would be).
_ATTRIBUTE = r"""\s+[A-Za-z_:][-\w:.]*\s*=\s*(?:"[^"\n]*"|'[^'\n]*'|[^\s"'=<>`]+)"""
_HTML_TAG = re.compile(rf"<(?:([A-Za-z][A-Za-z0-9]*)(?:{_ATTRIBUTE})*\s*/?|/([A-Za-z][A-Za-z0-9]*)\s*)>")
_HTML_ELEMENTS = frozenset("""
    a abbr b bdi bdo big blockquote br center cite code dd del details dfn div dl dt em font
    h1 h2 h3 h4 h5 h6 hr i img ins kbd li mark ol p pre q s samp small span strike strong sub
    summary sup table tbody td tfoot th thead tr tt u ul var wbr
""".split())
# ... of which these end a line or a cell where Markdown shows them: a space in their place.
_HTML_BREAKS = frozenset("""
    br blockquote dd div dl dt h1 h2 h3 h4 h5 h6 hr li ol p pre table td th tr ul
""".split())
# The start of such a tag, as far as it has come: the text ends inside it (in a quoted value).
_HTML_TAG_START = re.compile(
    rf"""<(?:/[A-Za-z0-9]*\s*|([A-Za-z][A-Za-z0-9]*)(?:{_ATTRIBUTE})*"""
    r"""(?:\s+[A-Za-z_:][-\w:.]*(?:\s*=\s*(?:"[^"\n]*|'[^'\n]*|[^\s"'=<>`]*))?)?\s*/?)?""")
# Where a tag may start: "<" and a letter or "/", or "<" at the end ("a < b", "<3" start none).
_TAG_OPENER = re.compile(r"<(?=[A-Za-z/]|\Z)")
# Longer than this, a "tag" is text with a "<" in it (and no scan runs further).
_HTML_TAG_MAX = 400
# A character reference up to its ";" ("&amp", "&#39", "&#x27"): the splitter knows it too.
REFERENCE = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31})"
_ENTITY = re.compile(REFERENCE + ";")
_IMG_ALT = re.compile(r"""\salt\s*=\s*(?:"([^"\n]*)"|'([^'\n]*)')""")
# Code, where Markdown shows tags and references as written: a backtick span on one line, and
# a fenced block as far as it lies in the text at hand.
_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)|^[ \t]*(```|~~~).*?(?:^[ \t]*\2[`~]*[ \t]*$|\Z)",
                   re.MULTILINE | re.DOTALL)

_MARKUP_CHARS = frozenset("#>-*+_~`|[]()!<&")   # text without any of them is left as it is


def reads_nothing(text: str) -> bool:
    """Whether `speakable(text)` is blank: markup alone (a rule, a table's |---| row)."""
    if _MARKUP_CHARS.isdisjoint(text):
        return not text.strip()
    return not speakable(text).strip()


def speakable(text: str) -> str:
    """`text` without its Markdown markup: what a voice should read of it."""
    drop = [False] * len(text)
    put: dict[int, str] = {}   # what is read in the place of a removed span starting here
    for m in _LINE.finditer(text):
        _mark(drop, m.start(), m.end())
    for m in _LINK.finditer(text):
        _mark(drop, m.start(), m.start(1))    # "![" or "["
        _mark(drop, m.end(1), m.end())        # "](url)"
    for m in _EMPHASIS.finditer(text):
        _mark(drop, m.start(), m.end())
    if "<" in text or "&" in text:
        _html(text, drop, put)
    return "".join(put.get(i, "") if gone else " " if c == "|" else "" if c == "`" else c
                   for i, (c, gone) in enumerate(zip(text, drop)))


def html_tags(text: str, start: int, stop: int) -> list[tuple[int, int]]:
    """The tags of HTML elements that start in `text[start:stop]`, as (start, end) spans; one
    that `text` ends in before its ">" (more text may close it) ends at len(text) + 1. For the
    phrase splitter, which must not cut a tag in two (`<img alt="A cat. It sits">`): neither
    half would be a tag, and both would be read."""
    spans = []
    if text.find("<", start, stop) < 0:   # most text: one scan, no copy
        return spans
    for lt in _TAG_OPENER.finditer(text, start, stop):
        i = lt.start()
        end = min(len(text), i + _HTML_TAG_MAX)
        if (m := _HTML_TAG.match(text, i, end)) is not None:
            if (m.group(1) or m.group(2)).lower() in _HTML_ELEMENTS:
                spans.append((i, m.end()))
        elif end == len(text) and (m := _HTML_TAG_START.fullmatch(text, i)) is not None:
            name = (m.group(1) or "").lower()
            if m.group(1) is None or name in _HTML_ELEMENTS or (   # "<", "</", "</sp"
                    m.end(1) == len(text) and any(e.startswith(name) for e in _HTML_ELEMENTS)):
                spans.append((i, len(text) + 1))                   # "<sp": the name goes on
    return spans


def in_html_tag(text: str, floor: int, pos: int) -> bool | None:
    """Whether `pos` lies inside a tag of an HTML element (after its "<", before its ">")
    that starts at or after `floor`: True inside a whole tag, None inside one that `text` ends
    in (see html_tags), False elsewhere."""
    inside: bool | None = False
    for start, end in html_tags(text, max(floor, pos - _HTML_TAG_MAX), pos):
        if pos < end:
            if end <= len(text):
                return True
            inside = None
    return inside


def _mark(flags: list[bool], start: int, end: int) -> None:
    flags[start:end] = [True] * (end - start)


def _html(text: str, drop: list[bool], put: dict[int, str]) -> None:
    """Mark inline HTML in `drop` and what is read in its place in `put` (see the module's
    docstring), outside code, where it is shown as written."""
    code = [False] * len(text)
    for m in _CODE.finditer(text):
        _mark(code, m.start(), m.end())

    def take(m: re.Match[str], instead: str) -> None:
        _mark(drop, m.start(), m.end())
        if instead:
            put[m.start()] = instead

    for m in _HTML_TAG.finditer(text):
        name = (m.group(1) or m.group(2)).lower()
        if name in _HTML_ELEMENTS and not code[m.start()]:
            alt = _IMG_ALT.search(m.group()) if name == "img" else None
            take(m, " " if name in _HTML_BREAKS else "^" if name == "sup" and m.group(1)
                 else f" {alt.group(1) or alt.group(2)} " if alt else "")
    for m in _ENTITY.finditer(text):
        ref = m.group()
        # Named ones only where HTML names them, semicolon and all ("&copyright;" is none;
        # html.unescape would read it as "©right;").
        if code[m.start()] or any(drop[m.start():m.end()]) or (
                ref[1] != "#" and ref[1:] not in html.entities.html5):
            continue
        if (char := html.unescape(ref)) != ref:
            take(m, " " if char == "\xa0" else char)


# A fence line: any indentation (LLMs indent code inside list items), then three or more
# backticks or tildes; an opening backtick fence's info string ("python") has no backtick.
_OPENING_FENCE = re.compile(r"[ \t]*(`{3,}(?=[^`]*$)|~{3,})")
_CLOSING_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})[ \t]*")
_LINE_KEPT = 1000   # of a line that runs on over several phrases, what fence checks look at


class CodeBlocks:
    """Keeps fenced code blocks (```...``` and ~~~...~~~) out of what a voice reads, phrase by
    phrase as a stream's text is cut.

    A block opened in one phrase can close several phrases later, and a fence counts only as a
    line of its own, which a cut can split: so the state and the current line so far are kept
    across phrases, and each piece of a line is judged by the whole line up to it. As in
    CommonMark, a block ends at a fence of its own character at least as long as the one that
    opened it, or with the text.
    """

    def __init__(self) -> None:
        self._open: str | None = None        # the fence of the block we are in, after the line so far
        self._line = ""                      # the current line, as far as it has come
        self._open_before_line: str | None = None   # ... and the block it started in

    def blank(self, text: str) -> str:
        """`text`, the stream's next phrase with its leading whitespace, with every character
        of a code block (its fence lines too) replaced by a space."""
        out = []
        pieces = text.split("\n")   # all but the last end their line
        for i, piece in enumerate(pieces):
            line = (self._line + piece)[:_LINE_KEPT] if i == 0 else piece[:_LINE_KEPT]
            before = self._open_before_line if i == 0 else self._open
            if before is None:
                fence = _OPENING_FENCE.match(line)
                self._open = None if fence is None else fence.group(1)
                code = fence is not None
            else:
                close = _CLOSING_FENCE.fullmatch(line)
                closes = (close is not None and close.group(1)[0] == before[0]
                          and len(close.group(1)) >= len(before))
                self._open = None if closes else before
                code = True
            end = "\n" if i < len(pieces) - 1 else ""
            out.append((" " * len(piece) if code else piece) + end)
            if end:
                self._line, self._open_before_line = "", self._open
            else:
                self._line, self._open_before_line = line, before
        return "".join(out)
