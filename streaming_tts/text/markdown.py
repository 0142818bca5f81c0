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
  (a space each) and table rules.

Only what Markdown would not show is removed: text that is not Markdown comes through as is,
apart from those symbols, which espeak would only spell out.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^[ \t]*+(?:```.*|~~~.*|[-*_][ \t]*(?:[-*_][ \t]*){2,}$|#{1,6}(?=[ \t]|$)|"
                   r"(?:>[ \t]?)+|[-*+](?=[ \t])|\|?(?:[ \t]*:?-+:?[ \t]*\|)+(?:[ \t]*:?-+:?)?[ \t]*$)",
                   re.MULTILINE)
_EMPHASIS = re.compile(r"(?<![\w*_~])(?:\*{1,3}|_{1,3}|~~)(?=[^\s*_~])"
                       r"|(?<=[^\s*_~])(?:\*{1,3}|_{1,3}|~~)(?![\w*_~])")
_LINK = re.compile(r"!?\[([^\]\[\n]*)\]\([^)\s]*(?:\s+\"[^\"\n]*\")?\)")


def speakable(text: str) -> str:
    """`text` without its Markdown markup: what a voice should read of it."""
    drop = [False] * len(text)

    def remove(start: int, end: int) -> None:
        drop[start:end] = [True] * (end - start)

    for m in _LINE.finditer(text):
        remove(m.start(), m.end())
    for m in _LINK.finditer(text):
        remove(m.start(), m.start(1))         # "![" or "["
        remove(m.end(1), m.end())             # "](url)"
    for m in _EMPHASIS.finditer(text):
        remove(m.start(), m.end())
    return "".join(" " if c == "|" else "" if gone or c == "`" else c
                   for c, gone in zip(text, drop))
