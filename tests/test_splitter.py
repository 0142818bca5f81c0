"""Behaviour of the incremental phrase splitter: what a listener would hear as phrases."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming_tts.text.splitter import (
    ENGLISH_FUNCTION_WORDS,
    PhraseSplitter,
    SplitterConfig,
    ends_sentence,
    function_words_for,
    read_on_word_for,
)

SENTENCE_MODE_MS = 10_000.0  # far above eager_until_buffered_ms: cut at sentence ends only


def split(
    fragments: Iterable[str],
    buffered_ms: float | Sequence[float] = SENTENCE_MODE_MS,
    config: SplitterConfig | None = None,
) -> list[str]:
    """Push each fragment, then flush; return every phrase in order."""
    splitter = PhraseSplitter(config)
    phrases: list[str] = []
    for i, fragment in enumerate(fragments):
        ms = buffered_ms if isinstance(buffered_ms, float) else buffered_ms[i % len(buffered_ms)]
        phrases += splitter.push(fragment, buffered_ms=ms)
    return phrases + splitter.flush()


def fragmentations(text: str, awkward: Sequence[str] = ()) -> list[list[str]]:
    """Whole, one character at a time, and split around each awkward substring."""
    ways = [[text], list(text)]
    for piece in awkward:
        at = text.index(piece)
        for k in range(1, len(piece)):
            ways.append([text[: at + k], text[at + k :]])
    return ways


SENTENCE_CASES = [
    (
        "Dr. Smith arrived. He paid 3.14 dollars.",
        ["Dr. Smith arrived.", " He paid 3.14 dollars."],
        ["Dr. Smith", "3.14"],
    ),
    ("The total is 12345. Thanks.", ["The total is 12345.", " Thanks."], ["12345."]),
    (
        "Visit https://example.com/a.b?c=d for details. Then leave.",
        ["Visit https://example.com/a.b?c=d for details.", " Then leave."],
        ["https://example.com/a.b?c=d"],
    ),
    ("Go to example.com. It works.", ["Go to example.com.", " It works."], ["com. It"]),
    (
        "Write to a.b@c.com today. Thanks!",
        ["Write to a.b@c.com today.", " Thanks!"],
        ["a.b@c.com"],
    ),
    ("Wait... Then it happened.", ["Wait...", " Then it happened."], ["... T"]),
    ("Wait… Then it happened.", ["Wait…", " Then it happened."], ["… T"]),
    ("Wait... what happened?", ["Wait... what happened?"], ["... w"]),
    ("Wait…what happened?", ["Wait…what happened?"], ["…w"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', " Then he left."], ['."']),
    ("She asked (why?) Nobody knew.", ["She asked (why?)", " Nobody knew."], ["?) N"]),
    ('It ended. "Really?" she asked.', ["It ended.", ' "Really?" she asked.'], ['. "R']),
    ("你好。我很好！谢谢？", ["你好。", "我很好！", "谢谢？"], ["。我"]),
    ("他说：「走。」然后走了。", ["他说：「走。」", "然后走了。"], ["。」"]),
    ("Really?! Yes.", ["Really?!", " Yes."], ["?!"]),
    # Closers after a terminal, then another one: each push used to be judged alone.
    ("好！)! Yes.", ["好！)", "!", " Yes."], ["！)", ")!"]),
    ("One.   Two.", ["One.", "   Two."], ["   "]),
    (
        "Title\n\nFirst line here.\n- item one\n- item two",
        ["Title", "\n\nFirst line here.", "\n- item one", "\n- item two"],
        ["\n\n"],
    ),
    ("It wraps\nmid sentence.", ["It wraps\nmid sentence."], ["\nm"]),
    ("Use e.g. The Hobbit. Or i.e. this.", ["Use e.g. The Hobbit.", " Or i.e. this."], ["e.g."]),
    ("The U.S. Army won. Mr. Jones left.", ["The U.S. Army won.", " Mr. Jones left."], ["Mr."]),
    ("See No. 5 here. No. I won't.", ["See No. 5 here.", " No.", " I won't."], ["No. 5"]),
    ("Pi is 3. 14 is not.", ["Pi is 3.", " 14 is not."], ["3. 1"]),
    # A numbered list item's number is read with its item, not as a phrase ("one." alone).
    (
        "## 1. The starter\n\n1. Mix the flour.\n2. Add water. Stir.\n10. Bake.",
        ["## 1. The starter", "\n\n1. Mix the flour.", "\n2. Add water.", " Stir.",
         "\n10. Bake."],
        ["\n1", "1.", ". M", "\n2"],
    ),
    ("1. First. 2. Second.", ["1. First.", " 2.", " Second."], ["1. F"]),
    ("Steps:\n> 3. Go.", ["Steps:", "\n> 3. Go."], ["3."]),
    ("It was\n1990. Then more.", ["It was", "\n1990.", " Then more."], ["1990."]),
]


@pytest.mark.parametrize(("text", "expected", "awkward"), SENTENCE_CASES)
def test_sentence_mode_cuts_at_proven_sentence_ends(
    text: str, expected: list[str], awkward: list[str]
) -> None:
    for fragments in fragmentations(text, awkward):
        assert split(fragments) == expected, fragments


@pytest.mark.parametrize(
    "tail", ["3.", "Dr.", "e.g.", "12345", "https://example.com/a.b", "a.b@c.", "Wait...", "Hi. "]
)
def test_ambiguous_tail_is_held_until_more_text_or_flush(tail: str) -> None:
    splitter = PhraseSplitter()
    first = splitter.push("It is done. Next is " + tail, buffered_ms=SENTENCE_MODE_MS)
    assert first == ["It is done."]
    assert splitter.pending == " Next is " + tail
    assert splitter.flush() == [" Next is " + tail]
    assert splitter.pending == ""


def test_held_decimal_point_joins_its_number() -> None:
    splitter = PhraseSplitter()
    assert splitter.push("He paid 3.", buffered_ms=SENTENCE_MODE_MS) == []
    phrases = splitter.push("14 dollars. Bye", buffered_ms=SENTENCE_MODE_MS)
    assert phrases == ["He paid 3.14 dollars."]


def test_flush_speaks_mid_sentence_text_and_keeps_bare_whitespace() -> None:
    splitter = PhraseSplitter()
    assert splitter.push("Hello there", buffered_ms=SENTENCE_MODE_MS) == []
    assert splitter.flush() == ["Hello there"]
    assert splitter.push("  ", buffered_ms=SENTENCE_MODE_MS) == []
    assert splitter.flush() == []
    assert splitter.pending == "  "
    splitter.push("again.", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush() == ["  again."]


LONG_SENTENCE = (
    "I think that we should probably go to the store later today and buy some milk "
    "because we are out of it."
)


def llm_tokens(text: str) -> list[str]:
    """Word tokens the way LLMs stream them: a leading space on all but the first."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def test_eager_first_phrase_arrives_within_max_words() -> None:
    config = SplitterConfig()
    splitter = PhraseSplitter(config)
    arrivals = [splitter.push(token, buffered_ms=0.0) for token in llm_tokens(LONG_SENTENCE)]
    first = next(i for i, phrases in enumerate(arrivals) if phrases)
    # The token after the 6th word proves that word ended; no sooner, no later.
    assert first == config.first_phrase_max_words
    assert arrivals[first] == ["I think that we should probably"]


def test_eager_cuts_at_the_first_clause_mark() -> None:
    # Before, a clause mark counted only after 3 words: the cut after the third word won
    # ("Well, to be | honest", "Hello there, this | sentence"), a pause and a drawn-out word
    # where a reader makes none.
    for text, first in [
        ("Well, you know, I really think that this is the right way to go.", "Well,"),
        ("Hello there, this sentence is cut early.", "Hello there,"),
    ]:
        phrases = split(llm_tokens(text), buffered_ms=0.0)
        assert phrases[0] == first
        assert "".join(phrases) == text


ENGLISH = SplitterConfig(first_phrase_max_words=3, function_words=ENGLISH_FUNCTION_WORDS)


@pytest.mark.parametrize(("text", "phrases"), [
    # An ellipsis inside a sentence is a clause mark: before, the cut after the third word
    # fell anywhere ("Hmm... let | me think.", "I think... maybe | not.").
    ("Hmm... let me think.", ["Hmm...", " let me think."]),
    ("I think\u2026 maybe not.", ["I think\u2026", " maybe not."]),
    ("Wait...what now?", ["Wait...what now?"]),            # no space: no mark
    # Nor does an early cut leave a list item's number alone.
    ("## 1. The starter dough", ["## 1. The starter", " dough"]),
    # A heading's or a bullet's mark is no word to count ("# A Short | Guide to Sourdough").
    ("# A Short Guide to Sourdough", ["# A Short Guide", " to Sourdough"]),
    ("- First item here and more.", ["- First item here", " and more."]),
    # The ";" of a character reference is no clause mark ("Salt &amp; | pepper").
    ("Salt &amp; pepper are on the table.", ["Salt &amp; pepper", " are on the table."]),
    ("&gt;&gt; SPEAKER: Hello there everyone.", ["&gt;&gt; SPEAKER:", " Hello there everyone."]),
])
def test_an_early_cut_at_an_ellipsis_but_not_after_a_list_number_or_markup(
    text: str, phrases: list[str],
) -> None:
    for fragments in ([text], llm_tokens(text), list(text)):
        assert split(fragments, buffered_ms=0.0, config=ENGLISH) == phrases, fragments


@pytest.mark.parametrize(("text", "first"), [
    ("The results of the study show it.", "The results"),        # before "of"
    ("When the storm finally passed, we left.", "When the storm"),  # ends on a content word
    ("It is a nice day today.", "It is a nice"),                   # all function words: on
    ("Results of the study are in.", "Results of the study"),     # one word would stay: on
    ("\u201cThe results of\u201d the study.", "\u201cThe results of\u201d"),  # closed: a mark
])
def test_an_early_cut_goes_before_function_words(text: str, first: str) -> None:
    for fragments in ([text], llm_tokens(text)):
        phrases = split(fragments, buffered_ms=0.0, config=ENGLISH)
        assert phrases[0] == first, fragments
        assert "".join(phrases) == text
    # Without the list (a voice of another language) the cut stays after the third word.
    assert split([text], buffered_ms=0.0, config=SplitterConfig(first_phrase_max_words=3))[0] \
        == " ".join(text.split()[:3])


@pytest.mark.parametrize(("text", "first"), [
    ("It is 5 km away from here.", "It is 5 km"),        # the number keeps its unit
    ("We got 3 GB free today.", "We got"),                 # or goes with it to the next phrase
    ("I paid $5 million for it.", "I paid"),               # "$5 | million": five dollars, million
    ("Meet at 10 am tomorrow morning.", "Meet at 10 am tomorrow"),
    ("Only 5 km left to go.", "Only 5 km"),                # the cut after the unit is kept
    ("It is 5, maybe 6 of them.", "It is 5,"),            # a mark after it: no longer leaning
])
def test_an_early_cut_never_parts_a_number_from_the_next_word(text: str, first: str) -> None:
    for fragments in ([text], llm_tokens(text), list(text)):
        phrases = split(fragments, buffered_ms=0.0, config=ENGLISH)
        assert phrases[0] == first, fragments
        assert "".join(phrases) == text
    # Numbers lean on their unit in any language, with or without a function-word list.
    phrases = split(["Es kostet 5 Euro pro Tag."], buffered_ms=0.0,
                    config=SplitterConfig(first_phrase_max_words=3))
    assert phrases[0] == "Es kostet"


def test_a_delayed_flush_keeps_a_trailing_number_for_its_unit() -> None:
    splitter = PhraseSplitter(ENGLISH)
    splitter.push("the tower is 300", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True) == ["the tower"]
    assert splitter.flush(hold_function_words=True) == []   # " is 300": leaning words only
    splitter.push(" m tall", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True) == [" is 300 m tall"]
    # A listener kept waiting for its first words hears them, the number held back.
    splitter = PhraseSplitter(SplitterConfig(first_phrase_max_words=6,
                                             function_words=ENGLISH_FUNCTION_WORDS))
    assert splitter.push("It costs $5 ", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == ["It costs"]
    assert splitter.pending == " $5 "


def test_function_words_are_known_for_english_voices_only() -> None:
    assert function_words_for("en_US") is ENGLISH_FUNCTION_WORDS
    assert function_words_for("en-gb") is ENGLISH_FUNCTION_WORDS
    assert function_words_for("de_DE") == frozenset() == function_words_for("")


def test_a_read_on_word_is_known_for_english_voices_only() -> None:
    assert read_on_word_for("en_US") == read_on_word_for("en-gb") == "could"
    assert read_on_word_for("de_DE") == "" == read_on_word_for("")


def test_a_delayed_flush_keeps_trailing_function_words_for_the_next_phrase() -> None:
    splitter = PhraseSplitter(ENGLISH)
    assert splitter.push("came out of their", buffered_ms=SENTENCE_MODE_MS) == []
    assert splitter.flush(hold_function_words=True) == ["came out"]
    assert splitter.pending == " of their"
    # Function words alone wait whole; the next word ends them.
    assert splitter.flush(hold_function_words=True) == []
    splitter.push(" houses", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True) == [" of their houses"]
    # A word with a mark after it ends a phrase, whatever it is; a plain flush takes all.
    splitter.push(" out of, their", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True) == [" out of,"]
    assert splitter.flush() == [" their"] and splitter.pending == ""


def test_a_delayed_flush_with_min_words_waits_for_them_or_a_mark() -> None:
    splitter = PhraseSplitter(ENGLISH)
    splitter.push("finally", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True, min_words=3) == []
    splitter.push(" passed", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True, min_words=3) == []
    splitter.push(",", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True, min_words=3) == ["finally passed,"]
    splitter.push("the villagers came out of", buffered_ms=SENTENCE_MODE_MS)
    assert splitter.flush(hold_function_words=True, min_words=3) == ["the villagers came out"]


def test_buffered_audio_switches_to_sentence_boundaries() -> None:
    splitter = PhraseSplitter()
    emitted = [p for t in llm_tokens(LONG_SENTENCE) for p in splitter.push(t, buffered_ms=2000.0)]
    assert emitted == []  # nothing: the sentence has not provably ended
    assert splitter.push(" Next", buffered_ms=2000.0) == [LONG_SENTENCE]


def test_whole_text_pushed_at_once_cuts_early_only_once() -> None:
    text = LONG_SENTENCE + " And then we can cook dinner together tonight, maybe pasta."
    phrases = split([text], buffered_ms=0.0)
    assert phrases == [
        "I think that we should probably",
        LONG_SENTENCE[len("I think that we should probably") :],
        " And then we can cook dinner together tonight, maybe pasta.",
    ]


def test_eager_never_cuts_between_title_and_name() -> None:
    text = "Please welcome our keynote speaker Dr. Smith to the stage tonight."
    phrases = split(llm_tokens(text), buffered_ms=0.0)
    assert not any(p.endswith("Dr.") for p in phrases)
    assert "".join(phrases) == text


def test_cap_cuts_at_word_boundaries_in_text_without_punctuation() -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = " ".join(words[i % len(words)] for i in range(400))
    assert len(text) > 2000
    for fragments in ([text], llm_tokens(text)):
        phrases = split(fragments)
        assert "".join(phrases) == text
        assert len(phrases) >= len(text) // 400
        for p in phrases:
            assert len(p.strip()) <= 400
            assert set(p.split()) <= set(words)  # no word was cut in half


def test_cap_prefers_clause_marks_and_hard_cuts_text_without_spaces() -> None:
    config = SplitterConfig(max_phrase_chars=40)
    text = "one two three four five six, seven eight nine ten eleven twelve"
    assert split([text], config=config)[0] == "one two three four five six,"
    assert split(["x" * 100], config=config) == ["x" * 40, "x" * 40, "x" * 20]


def test_cut_at_word_speaks_complete_words_only() -> None:
    splitter = PhraseSplitter()
    assert splitter.push("Hello wor", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == ["Hello"]
    assert splitter.pending == " wor"
    assert splitter.cut_at_word() == []          # "wor" may go on: no space after it yet
    assert splitter.push("ld and Dr. ", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == [" world and"]   # never between a title and the name
    assert splitter.pending == " Dr. "
    assert splitter.push("Smith", buffered_ms=0.0) == [] and splitter.cut_at_word() == []


def test_cut_at_word_does_not_speak_a_function_word_alone() -> None:
    # Sub-word tokens at 15/s: by first_phrase_wait_ms only "The" had come; spoken alone, it was
    # drawn out and a silence of ~350 ms followed while the next word came.
    splitter = PhraseSplitter(ENGLISH)
    assert splitter.push("The quar", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == []
    assert splitter.push("terly rep", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == ["The quarterly"]
    assert splitter.push("ort of the ", buffered_ms=0.0) == []
    assert splitter.cut_at_word() == [" report"]       # "of the" lead the next phrase
    assert splitter.pending == " of the "
    assert splitter.cut_at_word() == []
    assert splitter.flush() == [" of the "]          # max_buffer_delay_ms: spoken as it is


def test_ends_sentence_sees_terminals_through_closing_quotes() -> None:
    assert [ends_sentence(p) for p in ("Hello.", 'He said "hi!"', "好。", "(see above.) ")] == [True] * 4
    assert [ends_sentence(p) for p in ("Hello", "Wait,", "and Dr", " ", "")] == [False] * 5


class CountingPattern:
    """Wraps one of the splitter's regexes and counts the characters its scans cross: a
    measure of work that does not depend on the machine's speed. Patterns can share a count."""

    def __init__(self, pattern: re.Pattern[str], shared: CountingPattern | None = None) -> None:
        self.pattern, self.scanned = pattern, 0
        self._total = shared or self

    def _add(self, n: int) -> None:
        self._total.scanned += n

    def match(self, buf: str, pos: int = 0) -> re.Match[str] | None:
        m = self.pattern.match(buf, pos)
        self._add(1 if m is None else max(1, m.end() - pos))
        return m

    def fullmatch(self, buf: str, pos: int = 0) -> re.Match[str] | None:
        self._add(max(1, len(buf) - pos))
        return self.pattern.fullmatch(buf, pos)

    def finditer(self, buf: str, pos: int = 0, endpos: int | None = None) -> Iterator[re.Match[str]]:
        end, last = (len(buf) if endpos is None else endpos), pos
        for m in self.pattern.finditer(buf, pos, end):
            self._add(m.end() - last)
            last = m.end()
            yield m
        self._add(end - last)           # exhausted: the rest was crossed without a match


UNBROKEN = {
    "no whitespace": "a" * 20_000,
    "base64": "QUJD" * 5_000,
    "CJK without punctuation": "漢字" * 10_000,
    "one space at the far end": "x" * 19_990 + " tail",
    "prose": " ".join(s for s, _, _ in SENTENCE_CASES) * 40,
}


@pytest.mark.parametrize("text", UNBROKEN.values(), ids=UNBROKEN.keys())
@pytest.mark.parametrize("fragment", [20_000_000, 7, 1], ids=["whole", "7 chars", "1 char"])
def test_splitting_scans_each_character_a_bounded_number_of_times(
        monkeypatch: pytest.MonkeyPatch, text: str, fragment: int) -> None:
    # The splitter runs on the event loop. A 100k-character frame of text without a sentence
    # boundary (a URL, base64, CJK) was rescanned from its start for each 400-character cap
    # cut: quadratic, about a second of a stalled loop for every stream on the server.
    import streaming_tts.text.splitter as module
    counting = CountingPattern(module._CANDIDATE)
    monkeypatch.setattr(module, "_CANDIDATE", counting)
    for ms in (0.0, SENTENCE_MODE_MS):
        counting.scanned = 0
        phrases = split([text[i:i + fragment] for i in range(0, len(text), fragment)], ms)
        assert "".join(phrases) == text
        assert counting.scanned <= 3 * len(text)


GROWING_RUNS = {
    "only spaces": " " * 20_000,
    "spaces after a word": "Hello" + " " * 20_000,
    "line breaks after a sentence": "Hello there.\n" + "\n" * 20_000,
    "openers after a sentence": "Hello there. " + "(" * 20_000,
    "a run of dots": "Wait" + "." * 20_000,
    "closers after a terminal": "Go!" + ")" * 20_000,
}


@pytest.mark.parametrize("text", GROWING_RUNS.values(), ids=GROWING_RUNS.keys())
@pytest.mark.parametrize("fragment", [20_000_000, 1], ids=["whole", "1 char"])
def test_an_undecided_run_that_grows_is_not_scanned_again_at_each_push(
        monkeypatch: pytest.MonkeyPatch, text: str, fragment: int) -> None:
    # A run at the end of the text leaves its candidate undecided (more spaces, dots or
    # openers may follow) and blocked every cut after it; a client sending it a character per
    # frame had the whole run matched again at every push: 30 s of a stalled event loop for
    # 100k spaces, 58 s for openers after a sentence.
    import streaming_tts.text.splitter as module
    total = CountingPattern(module._CANDIDATE)
    monkeypatch.setattr(module, "_CANDIDATE", total)
    for name in ("_LEADING_SPACE", "_SKIP_OPENERS", "_KEEP_SPACE", "_KEEP_TERMINAL",
                 "_KEEP_CLOSERS", "_KEEP_OPENING"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, CountingPattern(getattr(module, name), total))
    for ms in (0.0, SENTENCE_MODE_MS):
        total.scanned = 0
        splitter = PhraseSplitter()
        phrases = [p for i in range(0, len(text), fragment)
                   for p in splitter.push(text[i:i + fragment], buffered_ms=ms)]
        flushes = [splitter.flush() for _ in range(100)]   # what a timer or client may send
        assert "".join(phrases) + "".join(sum(flushes, [])) + splitter.pending == text
        assert total.scanned <= 10 * len(text) + 100 * 3


# --- properties -----------------------------------------------------------------------------

ALPHABET = "abcXYZ019 \n\t.,!?;:…'\"()-/@。！？，、「」" + "\u3000"
# Inline HTML in an LLM's Markdown, its attribute values holding clause and sentence marks.
HTML_TAGGED = [
    'See <img alt="A cat. It sits on a mat" src="c.png"> here. Then more.',
    'Note <span title="Note: see below, please">this one</span> here. Next.',
    'A <span class="one two three four five six seven">Hello</span> world and more words.',
]
REALISTIC = [s for s, _, _ in SENTENCE_CASES] + HTML_TAGGED + [
    LONG_SENTENCE,
    "Mr. and Mrs. Smith paid $3.50 at 5 p.m. on Jan. 3rd, approx. twice the price.",
    "Check https://docs.example.org/v1.2/index.html?q=a.b#c. Or mail me@x.io!",
    "The results of the study show that it is a nice day, and that they are in the morning.",
]
texts = st.one_of(
    st.text(alphabet=ALPHABET, max_size=120),
    st.lists(st.sampled_from(REALISTIC), min_size=1, max_size=4).map(" ".join),
)
configs = st.sampled_from([SplitterConfig(), SplitterConfig(max_phrase_chars=12), ENGLISH,
                           SplitterConfig(max_phrase_chars=12, function_words=ENGLISH_FUNCTION_WORDS)])
# Besides pushes, what the scheduler may do at any moment: nothing, a slow stream's first-phrase
# timeout, or a buffered-text delay's flush while words still trickle in (function words kept).
ACTIONS = ["none", "word", "delay"]
BUFFERED = st.lists(st.floats(0.0, 3000.0), min_size=1, max_size=8)   # per push, in turn
TIMERS = st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=8)
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def fragmented(
    draw: st.DrawFn, text_strategy: st.SearchStrategy[str] = texts
) -> tuple[str, list[str]]:
    text = draw(text_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=30)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in pairwise(bounds)]


def step(splitter: PhraseSplitter, i: int, fragment: str, buffered: list[float],
         actions: list[str]) -> list[str]:
    """Push the i-th fragment, then do the i-th action (ACTIONS); the phrases they cut."""
    phrases = splitter.push(fragment, buffered_ms=buffered[i % len(buffered)])
    action = actions[i % len(actions)]
    if action == "word":
        phrases += splitter.cut_at_word()
    elif action == "delay":
        phrases += splitter.flush(hold_function_words=True, min_words=i % 4)
    return phrases


@PROPERTY_SETTINGS
@given(
    case=fragmented(),
    buffered=BUFFERED,
    actions=TIMERS,
    config=configs,
)
def test_phrases_are_exact_nonblank_capped_slices(
    case: tuple[str, list[str]], buffered: list[float], actions: list[str],
    config: SplitterConfig,
) -> None:
    text, fragments = case
    splitter = PhraseSplitter(config)
    phrases: list[str] = []
    pushed = ""
    for i, fragment in enumerate(fragments):
        phrases += step(splitter, i, fragment, buffered, actions)
        pushed += fragment
        # Nothing lost or duplicated at any moment, not only at the end.
        assert "".join(phrases) + splitter.pending == pushed
    phrases += splitter.flush()
    assert "".join(phrases) + splitter.pending == text
    assert splitter.pending.strip() == ""
    for p in phrases:
        assert p.strip(), phrases
        assert len(p.strip()) <= config.max_phrase_chars


@PROPERTY_SETTINGS
@given(case=fragmented(), config=configs)
def test_sentence_mode_boundaries_do_not_depend_on_fragmentation(
    case: tuple[str, list[str]], config: SplitterConfig
) -> None:
    text, fragments = case
    whole = split([text], config=config)
    pieces = split(fragments, config=config)
    assert pieces == whole
    spoken = " ".join(" ".join(p.split()) for p in pieces)
    assert spoken == " ".join(" ".join(p.split()) for p in split(list(text), config=config))


NUMBER_WORDS = st.lists(st.sampled_from(
    ["It", "is", "5", "km", "$5", "million", "at", "10", "am", "the", "tower", "300", "m", "of",
     "1,000", "people", "3.5", "GB", "10:30", "pm", "we", "got", "free", "away"]),
    min_size=1, max_size=30).map(" ".join)


@PROPERTY_SETTINGS
@given(case=fragmented(NUMBER_WORDS), config=st.sampled_from([ENGLISH, SplitterConfig()]))
def test_an_early_cut_never_ends_a_phrase_on_a_bare_number(
    case: tuple[str, list[str]], config: SplitterConfig,
) -> None:
    text, fragments = case
    splitter = PhraseSplitter(config)
    phrases = [p for f in fragments for p in splitter.push(f, buffered_ms=0.0)]
    assert "".join(phrases) + splitter.pending == text
    for phrase in phrases:   # under the cap, with no punctuation: only early cuts happen here
        assert not re.fullmatch(r"[$\d][\d.,:]*", phrase.split()[-1]), phrase


TAG = re.compile(r"</?[a-z]+(?:\s+[a-z]+=\"[^\"]*\")*>")


def cuts_a_tag(phrases: list[str]) -> bool:
    """Whether a boundary between phrases falls inside a tag of their text."""
    text, ends = "".join(phrases), list(accumulate(len(p) for p in phrases))
    return any(m.start() < end < m.end() for m in TAG.finditer(text) for end in ends)


@pytest.mark.parametrize("text", HTML_TAGGED)
def test_no_phrase_ends_inside_an_html_tag(text: str) -> None:
    # A tag cut in two is no tag to the Markdown reading: both halves were read aloud
    # ('<img alt="A cat.' | ' It sits">': "less than img alt equals ...").
    for ms in (0.0, SENTENCE_MODE_MS):
        for fragments in ([text], llm_tokens(text), list(text)):
            phrases = split(fragments, buffered_ms=ms, config=ENGLISH)
            assert "".join(phrases) == text
            assert not cuts_a_tag(phrases), (ms, phrases)


@pytest.mark.parametrize("text", [
    "a < b. Then", "if a<b, then c>d.", "x <3 y, z.", "Use <b and c, then.", "Hmm <b"])
def test_a_less_than_sign_that_opens_no_tag_still_lets_phrases_be_cut(text: str) -> None:
    whole = split([text], buffered_ms=0.0, config=ENGLISH)
    assert split(list(text), buffered_ms=0.0, config=ENGLISH)[0] == whole[0]
    assert "".join(whole) == text


def test_a_tag_left_open_waits_for_its_close_but_no_longer_than_a_phrase() -> None:
    splitter = PhraseSplitter()
    opening = 'Look at <img alt="A cat. It'
    assert splitter.push(opening, buffered_ms=SENTENCE_MODE_MS) == []
    assert splitter.push(' sits"> now. Then', buffered_ms=SENTENCE_MODE_MS) == [
        'Look at <img alt="A cat. It sits"> now.']
    # A "<" whose quoted value never closes is text after all: the cap still cuts it.
    splitter = PhraseSplitter()
    phrases = [p for word in ['Look <img alt="A cat.'] + [" And more"] * 200
               for p in splitter.push(word, buffered_ms=SENTENCE_MODE_MS)]
    assert phrases and all(len(p.strip()) <= SplitterConfig().max_phrase_chars for p in phrases)
    assert phrases[0] == 'Look <img alt="A cat.'


@PROPERTY_SETTINGS
@given(case=fragmented(st.lists(st.sampled_from(HTML_TAGGED + REALISTIC[:6]), min_size=1,
                                max_size=4).map(" ".join)),
       buffered=BUFFERED, actions=TIMERS, config=st.sampled_from([ENGLISH, SplitterConfig()]))
def test_no_fragmentation_or_timer_cuts_an_html_tag(
    case: tuple[str, list[str]], buffered: list[float], actions: list[str],
    config: SplitterConfig,
) -> None:
    text, fragments = case
    splitter = PhraseSplitter(config)
    phrases = [p for i, f in enumerate(fragments)
               for p in step(splitter, i, f, buffered, actions)]
    phrases += splitter.flush()
    assert "".join(phrases) == text
    assert not cuts_a_tag(phrases), phrases
