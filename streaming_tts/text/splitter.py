"""Incremental phrase splitter: text fragments in, speakable phrases out (one per stream).

Text arrives split anywhere (LLM tokens: "Dr" + ". Smi" + "th", "3." + "14"). A boundary is
emitted only once the text after it proves it, so fragmentation never changes where sentence
boundaries fall. Early in a stream (little audio buffered ahead of the listener) phrases are cut
short at clause marks or word boundaries to start speaking sooner; later they follow sentences.

Invariants, for any fragmentation and any `buffered_ms` sequence:
  * `"".join(every phrase returned by push/flush) + splitter.pending == "".join(every pushed text)`;
  * every phrase contains a non-whitespace character, and `len(phrase.strip()) <= max_phrase_chars`;
  * whitespace between phrases leads the next phrase (`" He paid."`); callers strip for speech;
  * after `flush()`, `pending` is "" or whitespace only (kept there, never emitted alone, and it
    leads the next phrase if more text comes);
  * in sentence mode (`buffered_ms >= eager_until_buffered_ms` on every push) the phrases
    returned by pushes plus `flush()` do not depend on how the text was fragmented.

Pure Python, no I/O, no clock: the caller passes how much audio is buffered.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .markdown import REFERENCE, html_tags, in_html_tag

logger = logging.getLogger(__name__)

_TERMINALS = ".!?…。！？"  # end a sentence
_CJK_TERMINALS = frozenset("。！？")  # need no following space: CJK puts none
_CLOSERS = "\"'”’»)]}」』】）〕〉》"  # after a terminal, still part of the sentence
_OPENERS = "\"'“‘«([{「『【（〔〈《¿¡"  # skipped when looking at how the next sentence starts
_CLAUSE_MARKS = ",;:–—"  # eager cuts; need a following space ("1,000", "12:30", "a–b")
_CJK_CLAUSE_MARKS = "，、；：。！？"  # eager / cap cuts; no space needed
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana + ideographs
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef"

# English words that lean on the word after them (articles, prepositions, conjunctions,
# auxiliaries, pronouns, determiners): a phrase cut right after one ends on a word the voice
# then lengthens and stresses ("The results of | the study": "of" 267 ms against 128 spoken
# whole) and pauses where no reader would. Early cuts and the buffered-text delay cut before
# them instead, so they lead the next phrase ("The results | of the study").
ENGLISH_FUNCTION_WORDS = frozenset("""
a an the of to in on at by for with from into onto upon over under about as than via per
and or but nor so yet if that because while when whereas although though since unless until
whether this these those my your his her its our their whose which who whom what where
is are was were be been being am have has had do does did will would can could should may might
must shall i you he she it we they me him us them not no very more most some any each every
such i'm it's that's there's he's she's we're you're they're i've we've you've they've i'll
we'll you'll they'll i'd we'd you'd they'd don't doesn't didn't won't can't isn't aren't
wasn't weren't
""".split())


# A number leans on the word after it just as much: a unit, a scale word or a clock suffix
# is read with it ("5 km": five kilometers, "$5 million": five million dollars, "10 am"),
# and alone it is read as written ("km": k m, "million" after "five dollars", "am": the verb).
# Any token that ends in a digit: "$5", "10:30", "1,000", "(3"; not "5," (a mark ends it).
_LEANING_NUMBER = re.compile(r"[^\w\s]*\d(?:[\d.,:/-]*\d)?")


def function_words_for(language: str) -> frozenset[str]:
    """The function words the splitter cuts before, for a voice language ("en_US"); none known
    for other languages (their phrases are cut as before)."""
    return ENGLISH_FUNCTION_WORDS if language.lower().startswith("en") else frozenset()


# The word a phrase cut inside a clause is read on into, never heard (Phonemizer.read_on), per
# language: one that opens with a voiceless stop, whose closure keeps the phrase's last word
# from running into it (the audio sent ends with that word: at -66 dBFS, median, for the
# default voice; benchmarks/cut_reading.py).
READ_ON_WORDS = {"en": "could"}


def read_on_word_for(language: str) -> str:
    """The word a cut phrase is read on into for a voice language ("en_US"); "" where none is
    known (such phrases are read as they are)."""
    return READ_ON_WORDS.get(language.lower()[:2], "")


def ends_in_mark(phrase: str) -> bool:
    """Whether a phrase ends with a punctuation mark, a sentence's or a clause's (closing quotes
    or brackets may follow it): where a reader pauses. A phrase that does not was cut inside a
    clause (early, for first audio, or at a pause in the text)."""
    return bool(_ENDS_IN_MARK.search(phrase.rstrip()))


def ends_sentence(phrase: str) -> bool:
    """Whether a phrase ends with sentence-final punctuation (closing quotes or brackets may
    follow it): after one that does not, more of its sentence is still to come."""
    stripped = phrase.rstrip().rstrip(_CLOSERS)
    return bool(stripped) and stripped[-1] in _TERMINALS


def _cls(chars: str) -> str:
    """Characters escaped for use inside a regex character class."""
    return "".join(re.escape(c) for c in chars)


# Sentence-boundary candidates, scanned left to right: a run of terminals plus closers, or a
# whitespace run (a line break there ends a sentence too: headings, list items).
_CANDIDATE = re.compile(
    rf"(?P<run>[{_cls(_TERMINALS)}]+)(?P<close>[{_cls(_CLOSERS)}]*)|(?P<gap>\s+)"
)
# An ellipsis inside a sentence ("Hmm... let me think") is a clause mark too.
_CLAUSE = re.compile(
    rf"(?:[{_cls(_CLAUSE_MARKS)}]|\.{{3,}}|…+)[{_cls(_CLOSERS)}]*(?=\s)"
    rf"|[{_cls(_CJK_CLAUSE_MARKS)}]+[{_cls(_CLOSERS)}]*"
)
# Anywhere a hard cap may cut, best first: after any punctuation mark (a space following).
_BREAK = re.compile(
    rf"[{_cls(_TERMINALS + _CLAUSE_MARKS)}]+[{_cls(_CLOSERS)}]*(?=\s)"
    rf"|[{_cls(_CJK_CLAUSE_MARKS)}]+[{_cls(_CLOSERS)}]*"
)
# A word: one CJK character (they carry no spaces), or a run of other non-space characters.
_WORD = re.compile(rf"[{_CJK_CHARS}]|[^\s{_CJK_CHARS}{_CJK_PUNCT}]+")
# A token counts as a word where it has a letter or a digit: a heading's "#", a bullet's "-",
# a lone dash or "&" are no words to count ("# A Short" was an early phrase of three "words").
_COUNTS = re.compile(r"[^\W_]")
# What comes before the ";" that ends an HTML character reference ("&amp;"): no clause mark.
_REFERENCE_BEFORE = re.compile(REFERENCE + r"\Z")
# Text that ends in punctuation (a clause or sentence mark, closers after it).
_ENDS_IN_MARK = re.compile(rf"[{_cls(_TERMINALS + _CLAUSE_MARKS + _CJK_CLAUSE_MARKS)}][{_cls(_CLOSERS)}]*$")
_LINE_BREAK = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_SKIP_OPENERS = re.compile(rf"[\s{_cls(_OPENERS)}]*")
_LEADING_SPACE = re.compile(r"\s*")
# Text appended after an undecided candidate that leaves it undecided (see _Wait).
_KEEP_SPACE = _LEADING_SPACE
_KEEP_TERMINAL = re.compile(rf"[{_cls(_TERMINALS)}]*[{_cls(_CLOSERS)}]*")
_KEEP_CLOSERS = re.compile(rf"[{_cls(_CLOSERS)}]*")
_KEEP_OPENING = _SKIP_OPENERS
_KEEP_TAG = re.compile(r"")   # marks a wait for a tag the text ends in (see _scan_sentences)
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")  # "J", "e.g", "U.S", "a.m"
# What may stand before a numbered list item's number on its line: Markdown's heading, quote
# and bullet marks ("## 1. The starter", "> 2. Then").
_LINE_MARKS = re.compile(r"[\s#>*+-]*")


@dataclass(frozen=True)
class SplitterConfig:
    """Where phrases may be cut. Abbreviations are matched lower-case, without the final '.'."""

    first_phrase_min_words: int = 1  # eager: a clause mark cuts only after this many words
    first_phrase_max_words: int = 6  # eager: force a cut at the next word boundary after these
    # Early cuts and flush(hold_function_words=True) cut before these (lower-case); see
    # ENGLISH_FUNCTION_WORDS and function_words_for.
    function_words: frozenset[str] = frozenset()
    eager_until_buffered_ms: float = 1500.0  # at/above this much buffered audio: sentences only
    max_phrase_chars: int = 400  # hard cap on a phrase's stripped length (model input size)
    # Never end a sentence: titles and Latin forms that precede more of the same sentence.
    # A missed boundary only lengthens a phrase; a false one puts a pause inside a name.
    abbreviations: frozenset[str] = frozenset(
        "dr mr mrs ms mx prof st sr jr vs etc inc ltd co corp approx dept est gen gov lt col "
        "capt sgt rev hon mt ft cf al viz ca esp".split()
    )
    # Abbreviations only when a number follows ("No. 5", "Fig. 3"); "No. I won't." still ends.
    number_abbreviations: frozenset[str] = frozenset(
        "no nos vol vols fig figs pp ch sec art op ed jan feb mar apr jun jul aug sep sept "
        "oct nov dec".split()
    )

    def __post_init__(self) -> None:
        if self.first_phrase_min_words < 1:
            raise ValueError("first_phrase_min_words must be >= 1")
        if self.first_phrase_max_words < self.first_phrase_min_words:
            raise ValueError("first_phrase_max_words must be >= first_phrase_min_words")
        if self.max_phrase_chars < 1:
            raise ValueError("max_phrase_chars must be >= 1")


class _Verdict(enum.Enum):
    CUT = enum.auto()  # a boundary, proven by the text after it
    NO = enum.auto()  # not a boundary, ever (decided with enough text)
    WAIT = enum.auto()  # undecidable until more text arrives (or flush)


class _Scan(NamedTuple):  # a NamedTuple: built on every push, so cheaper than a dataclass
    """Outcome of the sentence scan over the current buffer."""

    cut: int | None  # proven sentence boundary, if any
    horizon: int  # eager cuts may not go past here
    waiting: bool  # an undecided candidate blocks later cuts (the cap included)


class _Wait(NamedTuple):
    """The first undecided candidate (at `_scan`) and what keeps it so: while the text appended
    since (from `seen`) fullmatches `keep`, its verdict stays WAIT, so a push need not match
    the candidate's run again. Without this a run that grows at the end (spaces, "....",
    openers after a sentence: a client sending one character per frame) was matched whole on
    every push: quadratic, 30 s of a stalled event loop for 100k characters."""

    seen: int                 # the buffer's length when judged
    keep: re.Pattern[str]
    grows: bool               # a cut would fall at the buffer's end (a terminal run at it),
    # so the run may grow past the cap's window; elsewhere it falls at a fixed place, which
    # stays within the window (the window's start only moves on)


class PhraseSplitter:
    """Splits one stream's text into phrases as fragments arrive; see the module docstring."""

    def __init__(self, config: SplitterConfig | None = None) -> None:
        self._cfg = config or SplitterConfig()
        self._buf = ""  # text received and not yet compacted away
        self._start = 0  # _buf[_start:] is pending; one push may cut many phrases, so no
        # slicing per phrase (that would copy the rest of a big push each time)
        self._scan = 0  # candidates in _buf before this index are decided NO
        self._lead = 0  # _buf[_start:_lead] is known to be whitespace (see _leading_end)
        self._wait: _Wait | None = None  # the undecided candidate at _scan, if any
        self._line_start = True  # _buf[_start] starts a line (the text's start, or a break)

    @property
    def pending(self) -> str:
        """Text received and not yet returned as a phrase."""
        return self._buf[self._start :]

    @property
    def pending_chars(self) -> int:
        """len(pending), without copying it."""
        return len(self._buf) - self._start

    def push(self, text: str, *, buffered_ms: float = 0.0) -> list[str]:
        """Append a fragment; return the phrases it completed, in order.

        `buffered_ms` is how much audio the listener has queued ahead. Below
        `eager_until_buffered_ms` the first phrase of this call may be cut early; the rest of
        the call follows sentences, since text that arrived together is best spoken together.
        """
        self._buf += text
        eager = buffered_ms < self._cfg.eager_until_buffered_ms
        phrases: list[str] = []
        while (cut := self._next_cut(eager and not phrases)) is not None:
            phrases.append(self._take(cut))
        self._compact()
        return phrases

    def flush(self, *, hold_function_words: bool = False, min_words: int = 0) -> list[str]:
        """Return everything pending as phrases (split only at the cap); whitespace-only stays.
        With `hold_function_words`, function words and numbers at the end of the text (and the
        space before them) stay pending to lead the next phrase: "came out of their" gives
        "came out" and keeps " of their", "it is 5" keeps " 5" for its unit ("km"); text of
        such words alone stays pending whole. With
        `min_words`, a last phrase of fewer words that ends in no punctuation stays pending."""
        phrases: list[str] = []
        self._compact()
        if self._leading_end() == len(self._buf):
            return phrases  # whitespace only: it stays pending (and is not scanned again)
        end = len(self._buf.rstrip())  # once: the cuts below leave _buf as it is
        while True:
            cs = self._leading_end()
            limit = cs + self._cfg.max_phrase_chars
            if end <= limit:
                break
            phrases.append(self._take(self._cap_cut(cs, limit)))
        cs = self._leading_end()
        if hold_function_words:
            opened = [start for start, stop in html_tags(self._buf, cs, len(self._buf))
                      if stop > len(self._buf)]
            if opened:   # the text ends in a tag: it waits for its close
                end = min(opened)
                while end > cs and self._buf[end - 1].isspace():
                    end -= 1
            end = self._before_leaning_words(cs, end)
        if min_words and not _ENDS_IN_MARK.search(self._buf, cs, end):
            if self._words_in(cs, end) < min_words:
                end = cs
        if self._buf[self._start : end].strip():
            phrases.append(self._take(end if hold_function_words else len(self._buf)))
        self._compact()
        self._scan, self._wait = 0, None
        return phrases

    def cut_at_word(self) -> list[str]:
        """Everything pending up to its last complete word (whitespace seen after it), as one
        phrase; [] when no word is complete yet. For a listener kept waiting for its first
        phrase by slowly arriving text: speak what has come rather than wait for more words.
        Function words and numbers at its end lead the next phrase; where they are all that has
        come ("The"), [] too: spoken alone, such a word was drawn out and followed by a silence
        of ~350 ms while the next word arrived (sub-word tokens at 15/s), and it waits for that
        word instead (or for the stream's max_buffer_delay_ms, which speaks it as it is)."""
        cs = self._leading_end()
        last, horizon = None, cs + self._cfg.max_phrase_chars
        tags = html_tags(self._buf, cs, horizon)
        for _, end in self._word_ends(cs, horizon):
            if not _inside(tags, end):
                last = end
        if last is None:
            return []
        strong = self._before_leaning_words(cs, last)
        if strong == cs:
            return []
        if not _inside(tags, strong):
            last = strong
        phrase = self._take(last)
        self._compact()
        return [phrase]

    def _take(self, cut: int) -> str:
        phrase, self._start = self._buf[self._start : cut], cut
        self._line_start = bool(_LINE_BREAK.match(phrase[-1:]))
        if cut > self._scan:
            self._scan, self._wait = cut, None
        return phrase

    def _compact(self) -> None:
        if not self._start:
            return
        shift = self._start
        self._buf = self._buf[shift:]
        self._scan -= shift
        self._lead = max(0, self._lead - shift)
        if self._wait is not None:
            self._wait = self._wait._replace(seen=self._wait.seen - shift)
        self._start = 0

    def _leading_end(self) -> int:
        """Where the whitespace at the start of the pending text ends; a run seen before is
        not scanned again (whitespace sent a character at a time stays pending)."""
        self._lead = _run_end(_LEADING_SPACE, self._buf, max(self._start, self._lead))
        return self._lead

    def _next_cut(self, eager: bool) -> int | None:
        """Where the next phrase ends (it is buf[_start:cut]), or None to wait for more text."""
        buf = self._buf
        cs = self._leading_end()  # a cut must lie after this
        if cs == len(buf):
            return None
        limit = cs + self._cfg.max_phrase_chars
        scan = self._scan_sentences(cs, limit)
        if eager:
            early = self._eager_cut(cs, min(scan.horizon, limit))
            if early is not None and (scan.cut is None or early < scan.cut):
                return early
        if scan.cut is not None or scan.waiting:
            return scan.cut
        return self._cap_cut(cs, limit) if len(buf) > limit else None

    def _scan_sentences(self, cs: int, limit: int) -> _Scan:
        """Judge candidates in order; NO verdicts are final, so the scan resumes after them.
        Text with no candidate is passed for good as well: a cap cut follows, and rescanning it
        for each of a long unbroken run's cuts (a URL, base64, CJK without punctuation) would
        make a 100k-character push quadratic (about a second on the event loop)."""
        if (w := self._wait) is not None:
            if w.keep is _KEEP_TAG:   # while the text still ends in that tag (re-read: <= 400)
                still = in_html_tag(self._buf, cs, self._scan) is None
            else:
                still = ((not w.grows or len(self._buf) <= limit)
                         and w.keep.fullmatch(self._buf, w.seen) is not None)
            if still:
                keep = w.keep
                if keep is _KEEP_TERMINAL and self._buf[-1:] in _CLOSERS:
                    keep = _KEEP_CLOSERS   # closers came: no more terminals ("！)" + "!")
                self._wait = w._replace(seen=len(self._buf), keep=keep)
                return _Scan(None, self._scan, waiting=True)
            self._wait = None
        # Only candidates that start within the cap's window can be cut at; one that runs
        # past it ("....." over the whole push) would be matched whole again after each cap
        # cut, so the scan stops at the window's edge.
        end = min(len(self._buf), limit + 2)
        for m in _CANDIDATE.finditer(self._buf, self._scan, end):
            gap = m.group("gap") is not None
            if gap and m.end() == end < len(self._buf) and m.start() <= limit:
                m = _CANDIDATE.match(self._buf, m.start())  # judged by all of it (a line break?)
            pos = m.start() if gap else m.end()  # a line break's space leads the next phrase
            if pos > limit:
                self._scan = m.start()  # nothing before it to judge
                return _Scan(None, limit, waiting=False)
            verdict = self._judge_gap(m) if gap else self._judge_terminal(m)
            if (verdict is _Verdict.CUT and pos > cs
                    and (tag := in_html_tag(self._buf, cs, pos)) is not False):
                if tag:   # inside a whole tag: never a boundary
                    verdict = _Verdict.NO
                else:     # inside one the text ends in: it may still close
                    self._scan = m.start()
                    self._wait = _Wait(len(self._buf), _KEEP_TAG, grows=True)
                    return _Scan(None, m.start(), waiting=True)
            if verdict is _Verdict.WAIT:
                # No candidate starts before it, and none ends past it: resume from it.
                self._scan, self._wait = m.start(), self._waiting(m, gap)
                return _Scan(None, m.start(), waiting=True)
            if verdict is _Verdict.CUT and pos > cs:
                return _Scan(pos, pos, waiting=False)
            self._scan = m.end()
        self._scan = end  # no candidate can start in what was scanned
        return _Scan(None, end, waiting=False)

    def _waiting(self, m: re.Match[str], gap: bool) -> _Wait:
        """What keeps an undecided candidate undecided (see _Wait)."""
        seen = len(self._buf)
        if m.end() < seen:  # the next sentence's start is still to come: openers, spaces
            return _Wait(seen, _KEEP_OPENING, grows=False)
        if gap:
            return _Wait(seen, _KEEP_SPACE, grows=False)
        return _Wait(seen, _KEEP_CLOSERS if m.group("close") else _KEEP_TERMINAL, grows=True)

    def _judge_gap(self, m: re.Match[str]) -> _Verdict:
        if m.end() == len(self._buf):
            return _Verdict.WAIT  # more space, or a line break, may follow
        if not _LINE_BREAK.search(m.group()):
            return _Verdict.NO
        return self._judge_next_start(m.end())

    def _judge_terminal(self, m: re.Match[str]) -> _Verdict:
        buf, end = self._buf, m.end()
        if end == len(buf):
            return _Verdict.WAIT  # "3." -> "3.14", "Wait.." -> "Wait...", '"Stop.' -> '"Stop."'
        run = m.group("run")
        if _CJK_TERMINALS.intersection(run):
            return _Verdict.CUT
        if not buf[end].isspace():
            return _Verdict.NO  # "3.14", "example.com", "a.b?c=d", "Wait...what"
        verdict = self._judge_next_start(end)
        if verdict is _Verdict.CUT and run == ".":
            following = buf[_run_end(_SKIP_OPENERS, buf, end)]
            token = _token_before(buf, self._start, m.start())
            if self._is_abbreviation(token, following.isdigit()):
                return _Verdict.NO
            if self._is_list_number(token, m.start() - len(token)):
                return _Verdict.NO
        return verdict

    def _is_list_number(self, token: str, pos: int) -> bool:
        """Whether `token` (at `pos`, a "." after it) numbers a list item ("1. Mix the flour"
        on a line of its own, Markdown's marks before it allowed): read with its item, not
        as a phrase of its own ("one." and a pause)."""
        if not (token.isdigit() and len(token) <= 3):
            return False
        line = self._start
        for br in _LINE_BREAK.finditer(self._buf, self._start, pos):
            line = br.end()
        if line == self._start and not self._line_start:
            return False
        return _run_end(_LINE_MARKS, self._buf, line) == pos

    def _judge_next_start(self, pos: int) -> _Verdict:
        """A new sentence starts with anything but a lower-case letter ("Wait... what")."""
        nxt = _run_end(_SKIP_OPENERS, self._buf, pos)
        if nxt == len(self._buf):
            return _Verdict.WAIT
        return _Verdict.NO if self._buf[nxt].islower() else _Verdict.CUT

    def _is_abbreviation(self, token: str, before_number: bool) -> bool:
        word = token.lstrip(_OPENERS).lower()
        if word in self._cfg.abbreviations or _INITIALS.fullmatch(word):
            return True
        return before_number and word in self._cfg.number_abbreviations

    def _eager_cut(self, cs: int, horizon: int) -> int | None:
        """Earliest early cut up to `horizon`: a clause mark after enough words, else a word
        boundary (whitespace seen after the word) once the phrase has max words."""
        buf = self._buf
        tags = html_tags(buf, cs, horizon)
        forced = self._forced_cut(cs, horizon, tags)
        stop = horizon if forced is None else forced
        min_words = self._cfg.first_phrase_min_words
        for m in _CLAUSE.finditer(buf, cs, stop + 1):
            if m.end() > stop:
                break
            if buf[m.start()] == ";" and _REFERENCE_BEFORE.search(buf, max(cs, m.start() - 40),
                                                                  m.start()):
                continue   # "Salt &amp; pepper": a character, not a pause
            if _inside(tags, m.end()):
                continue   # '<span title="Note: see below">'
            if self._words_in(cs, m.end()) >= min_words:
                return m.end()
        return forced

    def _forced_cut(self, cs: int, horizon: int, tags: list[tuple[int, int]]) -> int | None:
        """The word end after max words, moved back before function words and numbers ending
        there if two words or more stay ("The results | of the study", "We got | 3 GB"); else
        the end of the next word that is neither ("summary of the report", "It is a nice",
        "It is 5 km")."""
        for count, end in self._word_ends(cs, horizon):
            if count >= self._cfg.first_phrase_max_words:
                cut = self._before_leaning_words(cs, end)
                if self._after_list_number(cs, cut) or _inside(tags, cut):
                    continue
                if cut == end or (cut > cs and self._words_in(cs, cut) >= 2):
                    return cut
        return None

    def _after_list_number(self, cs: int, cut: int) -> bool:
        """Whether the text up to `cut` ends with a list item's number ("## 1.")."""
        token = _token_before(self._buf, cs, cut)
        return token.endswith(".") and self._is_list_number(token[:-1], cut - len(token))

    def _words_in(self, start: int, end: int) -> int:
        return sum(1 for w in _WORD.finditer(self._buf, start, end) if _COUNTS.search(w.group()))

    def _before_leaning_words(self, cs: int, end: int) -> int:
        """`end`, or where the words before it end when the text up to it ends in words that
        lean on the next one (function words, numbers); `cs` (nothing) when it holds nothing
        else. Word by word from `end`: a word with punctuation after it ("of,", "5,") leans on
        nothing, whatever it is."""
        words = self._cfg.function_words
        buf, pos = self._buf, end
        while pos > cs:
            token = _token_before(buf, cs, pos)
            if _bare(token) not in words and not _LEANING_NUMBER.fullmatch(token):
                return pos
            pos -= len(token)
            while pos > cs and buf[pos - 1].isspace():
                pos -= 1
        return cs

    def _word_ends(self, cs: int, horizon: int) -> Iterator[tuple[int, int]]:
        """(words so far, end) at each proven word end before `horizon`: whitespace follows
        the word, and it is not a title the next word continues."""
        buf, count = self._buf, 0
        for w in _WORD.finditer(buf, cs, min(horizon, len(buf))):
            count += 1 if _COUNTS.search(w.group()) else 0
            end = w.end()
            if end == len(buf) or not buf[end].isspace():
                continue
            word = w.group()
            # A space after "Dr." proves the word ended, not that the name did.
            if not (word.endswith(".") and self._is_abbreviation(word[:-1], True)):
                yield count, end

    def _cap_cut(self, cs: int, limit: int) -> int:
        """Best cut with at most max_phrase_chars of content: a punctuation mark in the second
        half of the window, else the last word end, else mid-word (no space at all)."""
        buf = self._buf
        best = None
        half = cs + self._cfg.max_phrase_chars // 2
        tags = html_tags(buf, cs, limit + 1)
        for m in _BREAK.finditer(buf, half, limit + 1):
            if m.end() <= limit and not _inside(tags, m.end()):
                best = m.end()
        if best is not None and best > cs:
            return best
        for k in range(limit, cs, -1):
            if buf[k].isspace() and not buf[k - 1].isspace() and not _inside(tags, k):
                return k
        if (before := max((t for t, _ in tags if t > cs), default=cs)) > cs:
            return before   # text up to a tag, where nothing else would do
        logger.debug("no word boundary in %d chars; cutting mid-word", limit - cs)
        return limit


def _inside(tags: list[tuple[int, int]], pos: int) -> bool:
    """Whether `pos` lies inside one of these tags (markdown.html_tags): no cut there."""
    return any(start < pos < end for start, end in tags)


def _token_before(buf: str, floor: int, pos: int) -> str:
    """The non-space run that ends at `pos`, not reaching before `floor` (the phrase start)."""
    start = pos
    while start > floor and not buf[start - 1].isspace():
        start -= 1
    return buf[start:pos]


def _bare(token: str) -> str:
    """A token as the function-word list spells it: lower case, straight apostrophes, opening
    quotes and brackets stripped (closing ones and punctuation after it are kept: they end a
    phrase by themselves)."""
    return token.lstrip(_OPENERS).replace("\u2019", "'").lower()


def _run_end(run: re.Pattern[str], buf: str, pos: int) -> int:
    """Where a run of `run` (a pattern that may match empty) starting at `pos` ends."""
    m = run.match(buf, pos)
    return pos if m is None else m.end()
