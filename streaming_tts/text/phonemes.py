"""Text -> espeak-ng IPA phonemes -> Piper phoneme ids, with the ids of each written word.

espeak-ng comes from `espeakng-loader` (library and data in a wheel) and is driven through the
`phonemizer` package's espeak backend, so no system espeak is needed.

The phoneme string follows Piper's espeak bridge: espeak phonemizes clause by clause, the
clause's punctuation mark (one of `, : ; . ! ?`) is appended to its phonemes, and a space
follows `, : ;`. The string is decomposed (NFD) into codepoints and each one becomes its ids
followed by the pad ids, between `^ _` and `$`:  ^ _ p _ p _ ... p _ $.

Clauses are split here, by position, rather than by phonemizer's punctuation option: that
option cuts "It is 3.14." at the decimal point and reads "U.S.A." letter by letter, while a
mark counts here only where a space or the end follows it, as espeak-ng itself decides.

Word spans: espeak's words are not the written ones ("1995" becomes three words, "in the"
one), so every written (whitespace-separated) word is also phonemized alone and the two are
aligned: word counts first, and where espeak joined words, the joined word is shared out by
the length of each part. If they cannot be aligned, the words phonemized alone are used, so
the spans are always right. Tokens that speak nothing ("-") join the neighbouring word.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

from streaming_tts.text.normalize import reader_for
from streaming_tts.voices import VoiceConfig

_LOGGER = logging.getLogger(__name__)

BOS = "^"
EOS = "$"
PAD = "_"

# The clause marks espeak-ng reports and Piper keeps in the phoneme string.
CLAUSE_MARKS = ",:;.!?"
# Marks after which Piper's espeak bridge adds a space (the clause goes on).
_CONTINUING_MARKS = ",:;"
# A run of clause marks ends a clause only before a space or the end (closing quotes and
# brackets may sit in between), so "3.14", "U.S.A" and "e.g" reach espeak whole; a dash
# standing between spaces ends one too, as espeak-ng reads it.
_CLAUSE_END_RE = re.compile(r"(?:[,:;.!?…]+[\"'”’»)\]]*|(?<!\S)[–—])(?=\s|$)")
# The mark written for a run that starts with these (others stand for themselves).
_MARK_OF = {"…": ".", "–": ";", "—": ";"}
# phonemizer must not touch punctuation (clauses are split above): with punctuation
# preservation off it only deletes the marks given here, and this one is removed from the
# input first, so nothing is deleted.
_NO_MARKS = "\x00"
# Stress and length marks: left out when comparing a word read alone with the same word
# read in context, where espeak often drops its stress.
_PROSODY_MARKS = frozenset("ˈˌːˑ")
# Most words espeak joins into one: "in the" -> "ɪnðə"; three covers "would have been".
_MAX_JOINED = 3
# Words phonemized alone (for word timings) kept per voice: about half of a phrase's espeak
# work, and speech repeats its words (BENCHMARKS.md, "The phonemizer's word cache").
WORD_CACHE_SIZE = 20_000


@dataclass(frozen=True)
class WordSpan:
    text: str        # the word as written in the input
    first_id: int    # index into ids of its first phoneme id
    end_id: int      # one past its last phoneme id (and the pad after it)


@dataclass(frozen=True)
class PhonemizedText:
    phonemes: str              # espeak IPA string, NFD: one codepoint per phoneme before ids
    ids: list[int]             # ^ _ p _ ... $
    words: list[WordSpan]      # every written word in order, non-overlapping, non-decreasing
                               # (a word that speaks nothing has no length)
    read_on_from: int | None = None  # ids from here are read for context only, never heard:
                                     # a word the phrase runs on into (Phonemizer.read_on)
    read_from: int | None = None     # ids before this are read for context only, never heard:
                                     # the word before the phrase (Phonemizer.read_from)


@dataclass(frozen=True)
class _Piece:
    """Which spoken espeak words a written token covers: words first..last, or, where espeak
    joined several tokens into word `first`, share `part` of it by `weights`."""

    first: int
    last: int
    part: int = 0
    weights: tuple[int, ...] = (1,)


class _DebugLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic from 3.11
    """Sends all of phonemizer's messages at DEBUG.

    phonemizer warns on every call whose word count changes ("1995" is three words) and on
    foreign-word language switches; both are expected here and would flood the log.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


def _espeak_backend(espeak_voice: str) -> Any:
    """A phonemizer espeak backend on the library and data shipped by espeakng-loader."""
    import espeakng_loader
    from phonemizer.backend import EspeakBackend
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    # Class-level settings of phonemizer; every backend we create wants the same values.
    EspeakWrapper.set_library(espeakng_loader.get_library_path())
    EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
    try:
        return EspeakBackend(
            espeak_voice,
            preserve_punctuation=False,
            punctuation_marks=_NO_MARKS,
            with_stress=True,
            language_switch="remove-flags",  # Piper drops "(fr)"-style flags too
            words_mismatch="ignore",
            logger=_DebugLogger(logging.getLogger(__name__ + ".espeak"), {}),
        )
    except RuntimeError as exc:
        raise ValueError(f"espeak-ng cannot phonemize voice {espeak_voice!r}: {exc}") from exc


class Phonemizer:
    """Phonemizes text for one voice.

    The espeak backend is created once (slow: it loads its own copy of libespeak-ng). A lock
    serializes calls into it, so sharing one Phonemizer between threads is safe, but only
    one thread phonemizes at a time; use one per thread for parallel work.
    """

    def __init__(self, voice: VoiceConfig) -> None:
        if voice.phoneme_type != "espeak":
            raise ValueError(f"unsupported phoneme_type {voice.phoneme_type!r}: only 'espeak'")
        missing = [s for s in (BOS, EOS, PAD) if s not in voice.phoneme_id_map]
        if missing:
            raise ValueError(f"voice phoneme_id_map lacks the symbols {missing}")
        self.voice = voice
        self._id_map: Mapping[str, Sequence[int]] = voice.phoneme_id_map
        self._clusters = frozenset(voice.vowel_clusters)
        self._backend = _espeak_backend(voice.espeak_voice)
        self._reader = reader_for(voice.espeak_voice)
        self._lock = threading.Lock()
        self._alone: dict[str, tuple[str, ...]] = {}   # word -> its phoneme words, read alone
        self._alone_lock = threading.Lock()

    def phonemize(self, text: str, *, normalize: bool = False) -> PhonemizedText:
        """Phonemes, Piper ids and word spans of `text`.

        normalize: read written forms that espeak misreads as a person would ("$5" as "five
        dollars", "Dr. Smith" without a sentence's end; text/normalize.py), for voices whose
        language has a reader. Word spans still name the written words.
        Raises ValueError("empty text") when nothing in it can be spoken.
        """
        tokens = _clean(text).split()
        if not tokens:
            raise ValueError("empty text")
        said = self._reader(tokens) if normalize and self._reader else tokens
        whole, alone = self._phonemize_with_words(said)
        if not any(_is_spoken(w) for words in alone for w in words):
            raise ValueError("empty text")
        pieces = _align(alone, [w for w in whole if _is_spoken(w)])
        if pieces is None:
            _LOGGER.debug("cannot align espeak's words with a phrase's %d words; using words "
                          "read alone", len(tokens))   # never the text: it is the user's
            whole = [w for words in alone for w in words]
            pieces = _pieces_alone(alone)
        units, cores = self._units(whole)
        ids, starts = self._ids(units)
        spans = _token_spans(tokens, pieces, cores, units)
        words = [WordSpan(t, starts[_onset(units, spans, k)], starts[hi])
                 for k, (t, (lo, hi)) in enumerate(spans)]
        return PhonemizedText(phonemes="".join(units), ids=ids, words=words)

    def read_on(self, ph: PhonemizedText, more: PhonemizedText) -> PhonemizedText:
        """`ph` running on into `more` (both from `phonemize`) as one reading, with the words
        of `ph` only: a phrase cut inside a clause is read with a word after it, so that its
        last word is read as inside a sentence (not drawn out as at a sentence's end).
        `read_on_from` marks where that word's first phoneme starts; the audio sent ends before
        it, with the phrase's own last word (the scheduler's `_cut_tail`). `ph` as it is where
        it ends in a punctuation mark (its reading pauses or ends there anyway)."""
        if not self._runs_on(ph) or ph.read_on_from is not None:
            return ph
        if len(more.ids) <= self._head() + len(self._id_map[EOS]):
            return ph
        ids = self._open_ids(ph)
        return PhonemizedText(phonemes=f"{ph.phonemes} {more.phonemes}",
                              ids=ids + more.ids[self._head():], words=ph.words,
                              read_on_from=len(ids), read_from=ph.read_from)

    def read_from(self, before: PhonemizedText, ph: PhonemizedText) -> PhonemizedText:
        """`ph` read on from `before` (both from `phonemize`: the last word of a phrase cut
        inside a clause, and the phrase after it) as one reading, with the words of `ph` only:
        read alone, its first word is read as a sentence's first. Its audio starts where the
        space before its first word does (`read_from`), its first word's span from there as a
        word's inside a phrase. `ph` as it is where `before` ends in a punctuation mark."""
        if not self._runs_on(before) or ph.read_from is not None or ph.read_on_from is not None \
                or before.read_on_from is not None or not ph.words:
            return ph
        head, start = self._head(), len(before.ids) - len(self._id_map[EOS])
        ids = self._open_ids(before)
        shift = len(ids) - head
        words = [WordSpan(w.text, w.first_id + shift, w.end_id + shift) for w in ph.words]
        words[0] = WordSpan(words[0].text, start, words[0].end_id)
        return PhonemizedText(phonemes=f"{before.phonemes} {ph.phonemes}",
                              ids=ids + ph.ids[head:], words=words, read_from=start)

    def _head(self) -> int:
        """How many ids open a reading (BOS, pad)."""
        return len(self._id_map[BOS]) + len(self._id_map[PAD])

    def _open_ids(self, ph: PhonemizedText) -> list[int]:
        """`ph`'s ids without their EOS, then a space and its pad: a reading going on."""
        return [*ph.ids[:-len(self._id_map[EOS])], *self._id_map[" "], *self._id_map[PAD]]

    def _runs_on(self, ph: PhonemizedText) -> bool:
        """Whether a reading can run on past `ph`'s end: it ends in a phoneme (no mark, no
        space), with the EOS, and the voice has a space."""
        eos, last = list(self._id_map[EOS]), ph.phonemes[-1:]
        return (" " in self._id_map and bool(last) and not last.isspace()
                and not unicodedata.category(last).startswith("P") and ph.ids[-len(eos):] == eos)

    def _phonemize_with_words(self, said: list[str]) -> tuple[list[str], list[list[str]]]:
        """The phrase's phoneme words, and each word's read alone: those from the cache where
        it has them, the rest in the same espeak call as the phrase."""
        with self._alone_lock:
            known = {w: self._alone[w] for w in said if w in self._alone}
        missing = list(dict.fromkeys(w for w in said if w not in known))
        whole, *fresh = self._phonemize_texts([" ".join(said), *missing])
        new = {word: tuple(words) for word, words in zip(missing, fresh)}
        known.update(new)
        with self._alone_lock:
            self._alone.update(new)
            while len(self._alone) > WORD_CACHE_SIZE:   # the oldest first
                del self._alone[next(iter(self._alone))]
        return whole, [list(known[w]) for w in said]

    def _phonemize_texts(self, texts: list[str]) -> list[list[str]]:
        """Phoneme words of each text, clause marks attached as Piper writes them."""
        clauses = [_split_clauses(t) for t in texts]
        chunks = [chunk for cl in clauses for chunk, _ in cl if chunk]
        with self._lock:
            phonemized = self._backend.phonemize(chunks, strip=True, njobs=1) if chunks else []
        if len(phonemized) != len(chunks):  # phonemizer promises one line out per line in
            raise RuntimeError("espeak backend returned a different number of lines")
        lines = iter(phonemized)
        return [_join_clauses([(next(lines) if c else "", m) for c, m in cl]) for cl in clauses]

    def _units(self, words: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """Phoneme units (NFD codepoints, vowel clusters merged) and, for each spoken word,
        its unit range without clause marks."""
        units: list[str] = []
        cores: list[tuple[int, int]] = []
        for k, word in enumerate(words):
            if k:
                units.append(" ")
            phones = _merge_clusters(list(unicodedata.normalize("NFD", word)), self._clusters)
            if _is_spoken(word):
                lo, hi = _trim_marks(phones)
                cores.append((len(units) + lo, len(units) + hi))
            units.extend(phones)
        if words and words[-1][-1] in _CONTINUING_MARKS:
            units.append(" ")  # Piper's espeak bridge writes a space after , : ;
        return units, cores

    def _ids(self, units: list[str]) -> tuple[list[int], list[int]]:
        """Piper ids of the units, and where each unit's ids start (one extra: the EOS)."""
        pad = self._id_map[PAD]
        ids: list[int] = [*self._id_map[BOS], *pad]
        starts: list[int] = []
        for unit in units:
            starts.append(len(ids))
            unit_ids = self._id_map.get(unit)
            if unit_ids is None:
                _LOGGER.debug("phoneme %r is not in the voice's id map; skipped", unit)
                continue
            ids.extend(unit_ids)
            ids.extend(pad)
        starts.append(len(ids))
        ids.extend(self._id_map[EOS])
        return ids, starts


# --- clauses -------------------------------------------------------------------------------


def _clean(text: str) -> str:
    # Control characters (NUL above all) would cut or confuse espeak's C string.
    return "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)


def _split_clauses(text: str) -> list[tuple[str, str]]:
    """(clause text, its mark or "") pairs; the mark is the first of a run ("?!" -> "?")."""
    clauses: list[tuple[str, str]] = []
    pos = 0
    for match in _CLAUSE_END_RE.finditer(text):
        if _is_abbreviation_dot(text, match):
            continue
        mark = match.group()[0]
        clauses.append((text[pos : match.start()].strip(), _MARK_OF.get(mark, mark)))
        pos = match.end()
    tail = text[pos:].strip()
    if tail or not clauses:
        clauses.append((tail, ""))
    return clauses


def _is_abbreviation_dot(text: str, match: re.Match[str]) -> bool:
    # espeak-ng goes on with the clause after a single "." ending a word when a lower-case
    # word follows: "Mr. and", "U.S.A. is", "5 p.m. sharp".
    attached = match.start() > 0 and not text[match.start() - 1].isspace()
    return attached and match.group() == "." and text[match.end() :].lstrip()[:1].islower()


def _join_clauses(clauses: list[tuple[str, str]]) -> list[str]:
    """Words of the phonemized clauses, each mark glued to its clause's last word."""
    words: list[str] = []
    for phonemes, mark in clauses:
        clause_words = phonemes.split()
        if mark and clause_words:
            clause_words[-1] += mark
        elif mark and words:
            clause_words = [mark]  # a clause that speaks nothing still keeps its pause
        words.extend(clause_words)
    return words


def _is_spoken(word: str) -> bool:
    return any(ch not in CLAUSE_MARKS for ch in word)


def _trim_marks(phones: list[str]) -> tuple[int, int]:
    """Range of `phones` without leading and trailing clause marks."""
    lo, hi = 0, len(phones)
    while lo < hi and phones[lo] in CLAUSE_MARKS:
        lo += 1
    while hi > lo and phones[hi - 1] in CLAUSE_MARKS:
        hi -= 1
    return lo, hi


def _merge_clusters(phones: list[str], clusters: frozenset[tuple[str, ...]]) -> list[str]:
    """Merge runs listed in the voice's `vowel_clusters` into one phoneme (longest first)."""
    if not clusters:
        return phones
    longest = max(len(c) for c in clusters)
    out: list[str] = []
    i = 0
    while i < len(phones):
        for n in range(min(longest, len(phones) - i), 1, -1):
            if tuple(phones[i : i + n]) in clusters:
                out.append("".join(phones[i : i + n]))
                i += n
                break
        else:
            out.append(phones[i])
            i += 1
    return out


# --- aligning written words with espeak's words ----------------------------------------------


def _skeleton(word: str) -> str:
    """A word's phonemes without stress, length or clause marks, for comparing readings."""
    return "".join(ch for ch in word if ch not in _PROSODY_MARKS and ch not in CLAUSE_MARKS)


def _similarity(a: str, b: str) -> float:
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def _align(alone: list[list[str]], context: list[str]) -> list[_Piece | None] | None:
    """Give each token (its spoken words read alone) its spoken words in `context`.

    Walks both in order: a token takes as many context words as it has alone, unless espeak
    joined it with the next tokens into one word (only tried while the context is short of
    words, and taken when the joined reading is the closer match). None if the walk does not
    come out even; silent tokens get None.
    """
    spoken = [[w for w in words if _is_spoken(w)] for words in alone]
    skeletons = ["".join(_skeleton(w) for w in words) for words in spoken]
    pieces: list[_Piece | None] = []
    short = sum(map(len, spoken)) - len(context)  # words espeak joined away
    i = j = 0
    while i < len(spoken):
        n = len(spoken[i])
        if n == 0:
            pieces.append(None)
            i += 1
            continue
        width = _joined_width(spoken, skeletons, i, context, j) if short > 0 else 1
        if width > 1:
            weights = tuple(max(1, len(s)) for s in skeletons[i : i + width])
            pieces.extend(_Piece(j, j, part, weights) for part in range(width))
            short -= width - 1
            i, j = i + width, j + 1
            continue
        if j + n > len(context):
            return None
        pieces.append(_Piece(j, j + n - 1))
        i, j = i + 1, j + n
    return pieces if j == len(context) else None


def _pieces_alone(alone: list[list[str]]) -> list[_Piece | None]:
    """The pieces when the words read alone are the phonemes: each token its own words."""
    pieces: list[_Piece | None] = []
    j = 0
    for words in alone:
        n = sum(1 for w in words if _is_spoken(w))
        pieces.append(_Piece(j, j + n - 1) if n else None)
        j += n
    return pieces


def _joined_width(
    spoken: list[list[str]], skeletons: list[str], i: int, context: list[str], j: int
) -> int:
    """How many one-word tokens from `i` espeak read as the single context word `j` (1: none)."""
    if j >= len(context) or len(spoken[i]) != 1:
        return 1
    target = _skeleton(context[j])
    if len(target) <= len(skeletons[i]):  # not long enough to hold a second word
        return 1
    best_width, best = 1, _similarity(skeletons[i], target)
    for width in range(2, _MAX_JOINED + 1):
        group = spoken[i : i + width]
        if len(group) < width or any(len(words) != 1 for words in group):
            break
        score = _similarity("".join(skeletons[i : i + width]), target)
        if score > best:
            best_width, best = width, score
    return best_width


def _token_spans(
    tokens: list[str],
    pieces: list[_Piece | None],
    cores: list[tuple[int, int]],
    units: list[str],
) -> list[tuple[str, tuple[int, int]]]:
    """Each written word with its unit range. A token that speaks nothing (an emoji, a dash,
    a list's bullet) is a word of no length where it stands: at the end of the word before it,
    or, before the first spoken one, at that one's start. (Joined to a neighbour instead, a
    caption's "word" held a space: "Family: 👨‍👩‍👧".)"""
    spans: list[tuple[str, tuple[int, int]]] = []
    pending: list[str] = []       # silent tokens before the first spoken one
    for token, piece in zip(tokens, pieces, strict=True):
        if piece is None:
            if spans:
                end = spans[-1][1][1]
                spans.append((token, (end, end)))
            else:
                pending.append(token)
            continue
        lo, hi = _piece_range(piece, cores, units)
        spans.extend((silent, (lo, lo)) for silent in pending)
        spans.append((token, (lo, hi)))
        pending = []
    return spans


def _onset(units: list[str], spans: list[tuple[str, tuple[int, int]]], k: int) -> int:
    """Where word k starts: at the space before it when that space follows the previous word
    directly. The voice speaks the next word's onset in the space between two words (the /s/
    of "the streaming", the vowel of "is a", a stop's closure: 35-116 ms), so a word that
    started after it was captioned late and the two words left a gap of speech between them.
    After a clause mark (", ") the space is part of the pause and the word starts after it."""
    lo = spans[k][1][0]
    if k and lo >= 1 and units[lo - 1] == " " and spans[k - 1][1][1] == lo - 1:
        return lo - 1
    return lo


def _piece_range(piece: _Piece, cores: list[tuple[int, int]], units: list[str]) -> tuple[int, int]:
    """Unit range of a piece: whole words, or its share of a word espeak joined."""
    if len(piece.weights) == 1:
        return cores[piece.first][0], cores[piece.last][1]
    lo, hi = cores[piece.first]
    bounds = _share_bounds(units, lo, hi, piece.weights)
    return bounds[piece.part], bounds[piece.part + 1]


def _share_bounds(units: list[str], lo: int, hi: int, weights: tuple[int, ...]) -> list[int]:
    """Cut units[lo:hi] into len(weights) parts by weight, counting phonemes only and
    keeping a stress mark with the vowel after it."""
    sounds = [u for u in range(lo, hi) if units[u] not in _PROSODY_MARKS]
    if len(sounds) < len(weights):  # too short to share: the first part takes it all
        return [lo] + [hi] * len(weights)
    total, bounds, acc = sum(weights), [lo], 0
    for weight in weights[:-1]:
        acc += weight
        cut = sounds[min(len(sounds) - 1, max(1, round(len(sounds) * acc / total)))]
        while cut > bounds[-1] and units[cut - 1] in "ˈˌ":
            cut -= 1
        bounds.append(max(cut, bounds[-1]))
    bounds.append(hi)
    return bounds
