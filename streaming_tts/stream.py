"""Per-stream synthesis state. Owned and mutated only by the Scheduler.

A stream's timeline is counted in latent frames (one frame = hop samples at the voice rate), so
audio positions, phrase and word times all come from the same integer clock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .params import SynthesisParams
from .text.markdown import CodeBlocks
from .text.phonemes import WordSpan
from .text.splitter import PhraseSplitter

if TYPE_CHECKING:
    import torch


# With no text left waiting, silence is sent mid-sentence for at most this long after a word
# (text still waiting in the splitter keeps the silence going until it is spoken: at most the
# stream's max_buffer_delay_ms).
MID_SENTENCE_WAIT_S = 2.0
# A stream opened this long ago that has had no text is an idle context, not one starting: a
# client that means to speak sends its text right after `start` (see StreamState.starting).
IDLE_CONTEXT_S = 1.0


@dataclass(frozen=True)
class StreamOptions:
    """What a client chose at `start` that the scheduler needs."""

    params: SynthesisParams
    max_buffer_delay_ms: float = 300.0   # synthesize buffered text after this long without text
    words: bool = True                   # send word timings
    markdown: bool = True                # Markdown markup is not spoken (text/markdown.py)
    normalize: bool = True               # "$5", "Dr. Smith", "5 km" read as said (text/normalize.py)
    read_code: bool = True               # False: fenced code blocks are not read (text/markdown.py)
    # Up to this many times `params`' speed while the listener is far behind the text (a live
    # feed faster than the voice: Scheduler._phrase_params); 1.0: never faster.
    catch_up: float = 1.0


@dataclass(frozen=True)
class PhraseEvent:
    id: int
    text: str
    start_ms: float
    end_ms: float
    words: list[tuple[str, float, float]]   # (word, start_ms, end_ms) on the stream timeline
    # The whitespace that came before `text` in what the client sent ("" where a flush or a
    # cut split a word): these plus the texts, in order, give the stream's text back.
    space_before: str = ""


class StreamSink(Protocol):
    """Where a stream's output goes (the server session). Called on the event loop; must not block."""

    def on_phrase(self, phrase: PhraseEvent) -> None: ...
    def on_audio(self, samples: np.ndarray, pts_ms: float) -> None: ...
    def on_done(self, usage: dict) -> None: ...
    def on_cancelled(self, usage: dict | None) -> None: ...
    def on_error(self, code: str, message: str) -> None: ...


@dataclass
class PendingPhrase:
    text: str                            # stripped: the phrase as sent (its caption)
    space_before: str = ""               # the whitespace stripped from its start (see PhraseEvent)
    voice: str | None = None             # what the voice reads of it, where not all (read_code)
    # Its phonemes, made in the scheduler's text thread once it is its stream's next phrase, so
    # the model thread only waits for them when they are late (None: not its stream's next yet).
    phonemized: concurrent.futures.Future | None = None

    @property
    def spoken(self) -> str:
        return self.text if self.voice is None else self.voice


@dataclass
class ActivePhrase:
    """A phrase whose latent exists; decoded chunk by chunk."""

    id: int
    z: torch.Tensor
    plan: list[tuple[int, int]]
    next_chunk: int = 0
    unfinished: object | None = None   # head-only AcousticResult whose flow the next step completes

    @property
    def total_frames(self) -> int:
        return self.plan[-1][1]

    @property
    def remaining(self) -> bool:
        return self.next_chunk < len(self.plan)


@dataclass
class StreamState:
    id: str
    options: StreamOptions
    sink: StreamSink
    splitter: PhraseSplitter
    created: float = field(default_factory=time.monotonic)
    phrases: collections.deque = field(default_factory=collections.deque)  # PendingPhrase
    active: ActivePhrase | None = None
    next_phrase_id: int = 0                         # phrases announced, spoken or not
    spoken_phrases: int = 0                         # phrases that had speech in them
    emitted_frames: int = 0                         # timeline end, in frames
    anchor: float | None = None                     # wall time of timeline 0 for the listener
    last_text_at: float | None = None               # for max_buffer_delay
    first_text_at: float | None = None              # when the listener started waiting
    ended: bool = False                             # `end` received
    inflight_chars: int = 0                         # text of phrases in the running step
    queued_chars: int = 0                           # text of the phrases in `phrases`
    mid_sentence: bool = False                      # the last phrase cut did not end a sentence
    open_end: bool = False                          # the last phrase sent to the model ended in no mark
    word_before: concurrent.futures.Future | None = None  # ... its last word's phonemes, for the next
    # Whitespace after the last phrase queued (a flush cut after it) or in a cut that held
    # nothing else: it goes before the next phrase, so captions keep it.
    space_carry: str = ""
    code_blocks: CodeBlocks | None = None           # where fenced code is (read_code False)
    order: int = 0                                  # opened as the scheduler's n-th stream
    stalled: bool = False                           # ran dry with nothing owed; text came since
    dry: bool = False                               # ran dry while owed audio, none sent since
    filled_frames: int = 0                          # of them, silence sent while awaiting text
    costed: tuple[float, float] = (0.0, 0.0)        # speech ms, compute ms in the cost estimate

    def ahead_ms(self, now: float, frame_ms: float, ms_per_char: float) -> float:
        """Speech the listener has coming, played or not yet made: audio buffered, the rest
        of the active phrase, and the phrases waiting or in the model (estimated from their
        length). The splitter cuts short phrases only while this is small."""
        ms = max(0.0, self.buffered_ms(now, frame_ms))
        if self.active is not None and self.active.remaining:
            ms += (self.active.total_frames - self.active.plan[self.active.next_chunk][0]) * frame_ms
        # A running count: this is asked at every text frame, and a client sending text far
        # ahead of speech can queue thousands of phrases (summing them made a text flood
        # quadratic on the event loop: 40k characters in 2-character frames stalled it 5 s).
        return ms + (self.inflight_chars + self.queued_chars) * ms_per_char

    def queue_phrase(self, phrase: PendingPhrase) -> None:
        self.phrases.append(phrase)
        self.queued_chars += len(phrase.spoken)

    def line_break_after(self) -> bool:
        """Whether a line break is known to follow the phrase last taken (`next_phrase`): in
        the whitespace before the next phrase, or after it where none is queued yet."""
        after = (self.phrases[0].space_before if self.phrases
                 else self.space_carry + self.splitter.pending)
        return "\n" in after[: len(after) - len(after.lstrip())]

    def next_phrase(self) -> PendingPhrase:
        phrase = self.phrases.popleft()
        self.queued_chars -= len(phrase.spoken)
        return phrase

    def dry_at(self, frame_ms: float) -> float:
        """Wall time at which the listener has played all audio sent (`anchor` set)."""
        return self.anchor + self.emitted_frames * frame_ms / 1000.0

    def restart_clock(self, now: float, frame_ms: float) -> None:
        """The listener's player, stalled with nothing to play, resumes at `now`."""
        self.anchor = now - self.emitted_frames * frame_ms / 1000.0

    def buffered_ms(self, now: float, frame_ms: float) -> float:
        """Audio the listener has not played yet (negative: it ran dry that long ago)."""
        if self.anchor is None:
            return 0.0
        return self.emitted_frames * frame_ms - (now - self.anchor) * 1000.0

    def deadline(self, frame_ms: float, *, now: float, new_grace_s: float = 0.0,
                 margin_s: float = 0.0, step_s: float = 0.0) -> float:
        """Wall time by which the stream needs its next audio (the scheduler's priority).

        A started stream: when its listener runs dry, less `margin_s` (audio the resampler and
        encoder still hold, network). A stream with no audio yet: its first text plus
        `new_grace_s`, so earliest-deadline-first lets a newcomer wait a little rather than
        make a started listener stutter; and never earlier than one step (`step_s`) from now:
        a newcomer's wait only delays its start, a started listener running dry is a glitch,
        so an overdue newcomer still yields to a listener due within the next step.
        """
        if self.anchor is None:
            waiting_since = self.first_text_at if self.first_text_at is not None else self.created
            return max(waiting_since + new_grace_s, now + step_s)
        return self.dry_at(frame_ms) - margin_s

    def has_work(self) -> bool:
        return (self.active is not None and self.active.remaining) or bool(self.phrases)

    def starting(self, now: float, frame_ms: float, runway_ms: float) -> bool:
        """Still building its runway, so it needs more than real time: no audio yet; or still
        on its first phrase with more to say; or with work queued while its listener holds
        under `runway_ms`. The first phrase is cut short for time to first audio, so what it
        buffers is no runway: the next phrase, a whole sentence, is still to compute (for every
        stream of a burst at once). A stream only waiting for text is not starting: more
        compute would not help it. Nor is a context opened over IDLE_CONTEXT_S ago that has had
        no text yet (a client keeping contexts open for later turns): it counts as starting
        again from its first text. One just opened counts, as its text is usually on the way."""
        if self.anchor is None:
            return (self.first_text_at is not None or self.has_work() or self.inflight_chars > 0
                    or now - self.created < IDLE_CONTEXT_S)
        if self.spoken_phrases < 2:
            return self.has_work() or self.inflight_chars > 0 or bool(self.splitter.pending.strip())
        return self.has_work() and self.buffered_ms(now, frame_ms) < runway_ms

    def awaiting_words(self, now: float) -> bool:
        """More of a sentence is coming: text pending, or only the space after a phrase that
        stopped mid-sentence while words still trickle in (the last came under
        MID_SENTENCE_WAIT_S ago; a longer pause is the client's, and the listener may stall)."""
        pending = self.splitter.pending
        if pending.strip():
            return True
        recent = self.last_text_at is not None and now - self.last_text_at < MID_SENTENCE_WAIT_S
        return bool(pending) and self.mid_sentence and not self.ended and recent

    def finished(self) -> bool:
        # Whitespace left after the last phrase is never spoken (the splitter keeps it pending).
        return self.ended and not self.has_work() and not self.splitter.pending.strip()


def word_times(words: list[WordSpan], durations: np.ndarray, start_frame: int,
               frame_ms: float, first_at: int | None = None) -> list[tuple[str, float, float]]:
    """Map word spans over phoneme ids to times on the stream timeline; the first word starts
    at phrase frame `first_at` where that is sooner than its durations say (where its sound
    was found to start)."""
    cum = np.concatenate([[0], np.cumsum(durations)])
    out = []
    for k, w in enumerate(words):
        a = start_frame + int(cum[w.first_id])
        if k == 0 and first_at is not None:
            a = min(a, start_frame + first_at)
        b = start_frame + int(cum[min(w.end_id, len(durations))])
        out.append((w.text, a * frame_ms, b * frame_ms))  # the wire rounds (0.001 ms)
    return out
