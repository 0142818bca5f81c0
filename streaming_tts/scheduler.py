"""Scheduler: ONE coroutine owns the Engine and every stream's synthesis state.

Each step is schedule -> execute -> update:
- schedule (event loop): apply queued commands, then pick work across all streams by playback
  deadline (the moment each listener would run dry; a stream with no audio yet comes first),
  within a per-step frame budget sized from measured throughput, so a new stream waits at most
  one short step. Acoustic jobs for new phrases, decode jobs for next chunks, batched.
- execute (one worker thread): acoustic batch, decode batch; plain data in and out. Each stream's
  next phrase is phonemized in a second thread ahead of its step, so the model thread (the one
  feeding a GPU) spends its time on the model.
- update (event loop): turn results into phrase/words/audio events for each stream's sink.
Commands (text, flush, end, cancel, close) queue up and apply between steps, so a cancelled or
closed stream never gets audio from a step that finishes after the cancel.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from . import heap
from .engine import AcousticJob, AcousticResult, DecodeJob, Engine, SynthesisParams
from .metering import Meter, usage_summary
from .stream import (ActivePhrase, PendingPhrase, PhraseEvent, StreamOptions, StreamSink,
                     StreamState, word_times)
from .text.markdown import CodeBlocks, reads_nothing, speakable
from .text.phonemes import PhonemizedText
from .text.splitter import PhraseSplitter, ends_in_mark, ends_sentence
from .timers import StreamTimers

log = logging.getLogger(__name__)

# Tests set STREAMING_TTS_AUDIT_TIMERS=1: every timer check then also visits every stream and
# records here any stream that needed the scheduler but was neither armed nor queued for it.
AUDIT_TIMERS = os.environ.get("STREAMING_TTS_AUDIT_TIMERS") == "1"
AUDIT_FAILURES: list[str] = []
_AUDIT_EPS_S = 1e-6


@dataclass(frozen=True)
class SchedulerConfig:
    lookahead_ms: float = 1500.0       # compute at most this far ahead of each listener
    target_step_ms: float = 120.0      # size of a step's work; bounds the wait of a new stream
    max_batch_phrases: int = 8         # acoustic jobs per step
    max_batch_chunks: int = 16         # decode jobs per step
    silence_fill_ms: float = 100.0     # keep a listener fed with silence while text is pending
    first_phrase_wait_ms: float = 200.0  # a listener with nothing yet: speak the words come by then
    head_only_below_ms: float = 250.0  # listener this close to dry: first chunk before the whole flow
    new_stream_grace_ms: float = 400.0 # a newcomer's deadline: its first text plus this
    newcomer_step_ms: float = 60.0     # a step carrying first audio takes no more non-urgent work than this
    arriving_step_ms: float = 60.0     # a first phrase on its way: bigger jobs that can wait do (0: off)
    arriving_below_busy: float = 0.5   # ... only while the model was busy less than this of late
    behind_step_factor: float = 2.0    # 2+ started listeners due within a step: it may grow this much
    pipeline_margin_ms: float = 60.0   # audio held by resampler/encoder/network, off each deadline
    initial_frames_per_s: float = 800.0  # throughput guess until measured (CPU-ish)
    runway_ms: float = 1000.0          # a stream with work whose listener holds less is starting up
    buffer_delay_hold_ms: float = 1000.0  # max_buffer_delay waits while the listener has this much coming
    function_word_wait_ms: float = 0.0  # text still trickling this recently: delay cuts hold back
    delay_min_words: int = 0           # ... trailing function words, and speak at least this many words
    catch_up_after_ms: float = 3000.0  # a stream with catch_up > 1 speeds up past this much speech coming
    lead_in_ms: float = -1.0           # a stream's first audio starts at most this long before its first word (< 0: as the voice made it)
    lead_in_search_ms: float = 0.0     # ... a lead-in cut starts up to this much sooner where there is sound (an "s"), kept
    join_keep_ms: float = -1.0         # a phrase cut inside a clause: silence kept after its last word, and before the next one's first (< 0: as the voice made it)
    read_on_word: str = ""             # ... is read on into this word, never heard, so its last word is read as mid-sentence ("": not)
    read_from: bool = False            # ... and the phrase after it is read from its last word, never heard, so its first is too
    heap_trim_interval_s: float = 30.0  # give free C heap back this often, between steps (0: never)
    cost_half_life_s: float = 30.0     # with no stream finishing, the cost settles back
    recalibrate_idle_s: float = 60.0   # idle this long: probe the cost again (0: never)
    probe_streams: int = 1             # copies of the probe stream made together (as at warm-up)


class SchedulerObserver(Protocol):
    """Receives measurements (the server exports them); all calls on the event loop."""

    def on_step(self, seconds: float, acoustic: int, decode: int, frames: int) -> None: ...
    # A listener found dry while owed audio: at every timer check it stays so (on_late), and
    # once per time it runs dry, until its next audio (on_underrun).
    def on_late(self, stream_id: str) -> None: ...
    def on_underrun(self, stream_id: str) -> None: ...
    # The model thread's time for no stream: "cost_probe" (the idle probe), "heap_trim".
    def on_overhead(self, kind: str, seconds: float) -> None: ...
    # A stream ended; where its usage went: "done", "cancelled" (those messages), or
    # "log_only" (closed: a disconnect, an error, a shutdown; or its synthesis failed).
    def on_stream_ended(self, reported: str, usage: dict[str, Any]) -> None: ...


@dataclass
class LoadEstimate:
    active_streams: int
    demand_audio_s_per_s: float        # real-time audio the open streams need
    capacity_audio_s_per_s: float      # audio seconds the engine makes per second of compute
    starting_streams: int = 0          # still building a runway (see SchedulerConfig.runway_ms)

    @property
    def utilisation(self) -> float:
        return self.demand_audio_s_per_s / max(self.capacity_audio_s_per_s, 1e-9)


# Work is counted in decode-frame equivalents. The acoustic stage costs about 0.3 of a decode
# per frame it produces (measured on CPU), and English speech runs ~6.6 frames per character.
_ACOUSTIC_COST_PER_FRAME = 0.3
_ACOUSTIC_COST_PER_CHAR = _ACOUSTIC_COST_PER_FRAME * 6.6
_FLOW_COST_PER_FRAME = 0.15        # the flow is about half of the acoustic stage
_INITIAL_FRAMES_PER_CHAR = 6.0     # speech length per character of text until measured
_MIN_COSTED_AUDIO_MS = 2000.0      # streams shorter than this set the capacity estimate together:
                                   # their totals are pooled until they hold this much audio
# A live stream's cost counts each time it has made this much audio more (a window of its
# compute over its audio), as if a stream of that length had finished: a long one (a chapter
# read aloud, minutes of captions) corrects the estimate while it runs. Only finished streams
# did, and a reader's server that warmed up while the host was busy (0.85 s per audio s, ~20x
# the real cost) still refused a second context at "233%" after 25 minutes of one chapter.
_LIVE_COST_WINDOW_MS = 10_000.0
_SETTLED_COSTS = 64                # with no stream finishing, the cost estimate settles back to the
_SETTLED_MIN = 8                   # median of the last 64 finished, once 8 have (before: warm-up's)
# ... unless the last 8 all cost under this share of the median of those before them: the host
# got faster and stayed so (a neighbour that held the cores has gone), and the costs from before
# say nothing about it any more. Left in, they kept the estimate up for dozens of streams more.
_FASTER_FOR_GOOD = 0.75
# Timers (text deadlines, silence, a listener run dry, finished streams) are checked at most this
# often, or when one falls due. A check visits only the streams whose time has come (timers.py);
# when it visited every stream, checking at every step was the largest part of its time.
_TICK_MIN_S = 0.01
_BUSY_TAU_S = 2.0                   # busy_fraction's memory
_COMMANDS_PER_SLICE = 256          # commands applied before the event loop is let go (~2-5 ms)
# An idle server's probe runs the model alone; real streams cost more (first phrases, and on
# shared CPU cores their encoding): 15-30% on 2 cores (BENCHMARKS.md, "The warm-up probe encodes
# its audio"). A probe lowers the estimate to no less than this times what it read.
_PROBE_PREMIUM = 1.3
_TRIM_SAFE_BUFFERED_MS = 300.0     # a heap trim waits while a listener owed audio holds less
_TRIM_MAX_DEFER = 4                # ... for at most this many heap_trim_interval_s


class _PhraseJob(NamedTuple):
    """A new phrase for the acoustic model (and its first chunk's decode)."""

    sid: str
    text: str
    params: SynthesisParams
    head_only: bool
    first: int                           # index in the chunk schedule where its plan starts
    phonemized: concurrent.futures.Future   # its phonemes, being made in the text thread
    lead_in: int | None                  # frames kept before its first word (None: all)
    tail: int | None                     # frames kept after its last word (None: all)
    read_on: bool                        # read on into a word after it (Phonemizer.read_on)
    before: concurrent.futures.Future | None   # the word before it, to read it from


@dataclass
class _Batch:
    """Plain data handed to the worker thread: it never reads scheduler state."""

    acoustic: list[_PhraseJob] = field(default_factory=list)
    decode: list[tuple[str, DecodeJob, AcousticResult | None]] = field(default_factory=list)  # + flow to finish first
    owners: list[ActivePhrase] = field(default_factory=list)   # loop side only: phrase of each decode
    spaces: dict[str, str] = field(default_factory=dict)       # loop side only: each new phrase's space_before

    def stream_ids(self) -> list[str]:
        """The streams this step serves, each once, in batch order."""
        return list(dict.fromkeys([a[0] for a in self.acoustic] + [d[0] for d in self.decode]))


@dataclass
class _NewPhrase:
    text: str
    phonemized: PhonemizedText
    acoustic: AcousticResult
    plan: list[tuple[int, int]]          # the phrase's decode chunks; the first is decoded
    first_audio: np.ndarray
    first_word_at: int | None = None     # the phrase frame where its first word's sound starts,
                                         # where that is before its durations say (_first_word_onset)


@dataclass
class _Result:
    phrases: dict[str, _NewPhrase | None] = field(default_factory=dict)  # None: nothing speakable
    audio: dict[str, np.ndarray] = field(default_factory=dict)           # next chunks of active phrases
    finished_z: dict[str, object] = field(default_factory=dict)          # completed latents
    # Streams cancelled or closed during the step, whose decoding it left out: the work done
    # for each (a new phrase's acoustic stage), in decode-frame equivalents, for the meter.
    dropped: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    frames: float = 0.0                  # work done, in decode-frame equivalents


def _cut_lead_in(plan: list[tuple[int, int]], res: AcousticResult, ph: PhonemizedText,
                 keep_frames: int | None, search_frames: int = 0) -> tuple[list[tuple[int, int]], int]:
    """`plan` with its first chunk starting `keep_frames` before the phrase's first word (the
    voice's lead-in, silence, left out), or as it is (`keep_frames` None, no word, or a lead-in
    no longer than that). The first chunk keeps its end. With `search_frames`, it starts up to
    that many frames sooner, for _trim_quiet_lead to look at once decoded; returns the plan and
    the frames it starts sooner."""
    if keep_frames is None or not ph.words:
        return plan, 0
    lead_in = int(np.sum(res.durations[:ph.words[0].first_id]))
    cut = min(lead_in - keep_frames, plan[0][1] - 1)
    if cut <= 0:
        return plan, 0
    start = max(0, cut - search_frames)
    return [(start, plan[0][1]), *plan[1:]], cut - start


def _trim_quiet_lead(new: _NewPhrase, searched: int, keep_frames: int, hop: int) -> _NewPhrase:
    """Leave out the quiet frames at the start of a new phrase's first chunk, decoded
    `searched` frames sooner than its durations' cut: at most that many, never the
    `keep_frames` before its first frame with sound, and never the chunk's last frame. The
    durations start "The" 4-5 frames after its "Th" sounds, an "s" 1-2 frames after, and a cut
    by them alone clipped it."""
    if searched <= 0:
        return new
    audio = new.first_audio
    (a, b), rest = new.plan[0], new.plan[1:]
    look = min(searched + keep_frames, len(audio) // hop)
    loud = np.flatnonzero(_frame_rms(audio, hop, 0, look) > _QUIET_RMS)
    first_sound = int(loud[0]) if len(loud) else look
    trim = max(0, min(first_sound - keep_frames, searched, b - a - 1))
    if not trim:
        return new
    return replace(new, plan=[(a + trim, b), *rest], first_audio=audio[trim * hop:])


def _first_word_onset(new: _NewPhrase, hop: int) -> _NewPhrase:
    """`new` with `first_word_at` set where its first word's sound starts inside the id just
    before its first phoneme (the pad after the voice's lead-in), found in the decoded first
    chunk: the durations can give that pad the word's opening. "The old lighthouse" has 5-6
    frames of pad that sound as "Th" from their first, and its caption lit ~55 ms late."""
    words = new.phonemized.words
    if not words or words[0].first_id < 1 or words[0].first_id > len(new.acoustic.durations):
        return new
    cum = np.cumsum(new.acoustic.durations[: words[0].first_id])
    pad_start, word_start = int(cum[-2]) if len(cum) > 1 else 0, int(cum[-1])
    a, b = new.plan[0]
    lo, hi = max(pad_start, a), min(word_start, b, a + len(new.first_audio) // hop)
    if lo >= hi:
        return new
    loud = np.flatnonzero(_frame_rms(new.first_audio, hop, lo - a, hi - a) > _QUIET_RMS)
    return replace(new, first_word_at=lo + int(loud[0])) if len(loud) else new


def _frame_rms(audio: np.ndarray, hop: int, lo: int, hi: int) -> np.ndarray:
    """The RMS of each frame `lo`..`hi` of `audio` (frames of `hop` samples)."""
    frames = audio[lo * hop: hi * hop].reshape(hi - lo, hop)
    return np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))


def _fade_in(audio: np.ndarray, n: int) -> None:
    """Ramp the first `n` samples of `audio` up from silence, in place."""
    n = min(n, len(audio))
    audio[:n] *= np.arange(1, n + 1, dtype=audio.dtype) / (n + 1)


# A phrase read from the word before it starts inside a reading, at -36 dBFS (median; -22 the
# loudest) where that word's own reading ended near silence: faded in over this long.
_JOIN_FADE_S = 0.005

# A frame of a lead-in quieter than this (RMS, full scale 1.0: -50 dBFS) is silence; the voice's
# lead-in is at -70 to -95 dBFS, the opening of an "s" at -24 to -34.
_QUIET_RMS = 10 ** (-50 / 20)


def _cut_tail(plan: list[tuple[int, int]], res: AcousticResult, ph: PhonemizedText,
              keep_frames: int | None) -> list[tuple[int, int]]:
    """`plan` ending `keep_frames` after the phrase's last word (the voice's silence after it
    left out), or right at its end where it was read on into a word after it (what follows is
    that word's approach, never heard: the space before it sounds at -39 dBFS, the word's
    own last frame at -66, medians); or as it is (neither, or no longer than that). Chunks
    past the new end are dropped; the first chunk is kept, at least a frame of it."""
    if ph.read_on_from is not None:
        end = int(np.sum(res.durations[:ph.words[-1].end_id if ph.words else ph.read_on_from]))
    elif keep_frames is not None and ph.words:
        end = int(np.sum(res.durations[:ph.words[-1].end_id])) + keep_frames
    else:
        return plan
    end = max(end, plan[0][0] + 1)
    if end >= plan[-1][1]:
        return plan
    return [(a, min(b, end)) for a, b in plan if a < end]


# A stream's speech for measure_stream_cost: a short first phrase, then whole sentences.
_COST_PROBE_PHRASES = (
    "The first words",
    "of a stream are spoken as a short phrase, so that its listener hears them at once.",
    "The sentences after it follow the text's own punctuation, and are decoded in large chunks.",
    "Together they cost about what a real stream costs, start to end.",
)


class ProbeStopped(Exception):
    """`measure_stream_cost` was told to stop (its `stop()` returned True)."""


def measure_stream_cost(engine: Engine, phonemizer, streams: int = 1,
                        on_audio: Callable[[int, np.ndarray], None] | None = None,
                        stop: Callable[[], bool] | None = None) -> float:
    """Compute seconds per audio second of one stream made the way the scheduler makes it: a
    first phrase with only its head's flow and the smallest first chunk, then sentences decoded
    from the largest chunk (a listener with audio buffered). `streams` copies of that stream are
    made together, each model call batched across them, and the time is shared out: on a GPU a
    stream's cost falls with the batch, and near capacity the scheduler batches many streams; on
    a CPU batching buys nothing, so 1 is right there. Run in the model thread at warm-up: it is
    the capacity estimate until real streams have finished (the recent steps' output rate
    under-counts, as it includes the costly starts of the streams being measured).

    `on_audio(copy, samples)` gets each decoded chunk as a stream's sink would, from this
    thread and without waiting for it: the server encodes it meanwhile, as it encodes live
    streams' audio, so the time counts what encoding takes from the model where the two share
    CPU cores (on 2 cores, the probe measured 3-20% less without it).

    `stop()` is asked before each model call; once it returns True, ProbeStopped is raised (an
    idle server's probe gives way to a stream that arrives)."""
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    t0, frames = time.perf_counter(), 0
    for i, text in enumerate(_COST_PROBE_PHRASES):
        first = i == 0
        ids = phonemizer.phonemize(text).ids
        _check_stop(stop)
        # One seed for all copies: the same durations, so one chunk plan fits every copy.
        results = engine.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), head_only=first, seed=0)
                                   for _ in range(streams)])
        plan = engine.chunk_plan(results[0].num_frames, 0 if first else len(engine.config.chunk_schedule) - 1)
        for k, (a, b) in enumerate(plan):
            _check_stop(stop)
            if k:
                results = [res if res.complete else engine.finish_flow(res) for res in results]
            audio = engine.decode([DecodeJob(z=res.z, start=a, end=b, phrase_frames=res.num_frames)
                                   for res in results])
            if on_audio is not None:
                for copy, samples in enumerate(audio):
                    on_audio(copy, samples)
        frames += results[0].num_frames * streams
    return (time.perf_counter() - t0) / (frames * engine.frame_ms / 1000.0)


def _says_nothing(phrase: PendingPhrase) -> bool:
    """Known now to have nothing for the voice: left unread (`voice` ""), or phonemized
    already to nothing (the text thread's ValueError, as _execute would find)."""
    if phrase.voice == "":
        return True
    done = phrase.phonemized
    return (done is not None and done.done() and not done.cancelled()
            and isinstance(done.exception(), ValueError))


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise ProbeStopped


def _release_free_heap() -> float:
    """Give free heap back; the seconds it took."""
    t0 = time.perf_counter()
    try:
        heap.release_free_heap()
    except Exception:   # a failed trim must not cost a step
        log.warning("could not release free heap memory", exc_info=True)
    return time.perf_counter() - t0


def new_model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The single worker thread in which an engine is built, warmed up and run."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-model")


class Scheduler:
    """Owns the engine; talk to it only through the command methods."""

    def __init__(self, engine: Engine, *, phonemizer, splitter_factory: Callable[[], PhraseSplitter],
                 meter: Meter, config: SchedulerConfig = SchedulerConfig(),
                 observer: SchedulerObserver | None = None,
                 power_reader: Callable[[], float | None] | None = None,
                 model_thread: concurrent.futures.ThreadPoolExecutor | None = None,
                 initial_stream_cost: float | None = None):
        self.engine = engine
        self.phonemizer = phonemizer
        self.splitter_factory = splitter_factory
        self.meter = meter
        self.config = config
        self.observer = observer
        self.power_reader = power_reader
        self.frame_ms = engine.frame_ms
        # Frames of the voice's lead-in kept before a stream's first word (None: all of them).
        self._lead_in_frames = (round(config.lead_in_ms / self.frame_ms)
                                if config.lead_in_ms >= 0 else None)
        self._search_frames = round(config.lead_in_search_ms / self.frame_ms)
        # ... and of the silence the voice makes at either side of a cut inside a clause.
        self._join_frames = (round(config.join_keep_ms / self.frame_ms)
                             if config.join_keep_ms >= 0 else None)
        # The word a phrase cut inside a clause is read on into (Phonemizer.read_on).
        self._read_on = phonemizer.phonemize(config.read_on_word) if config.read_on_word else None
        self._streams: dict[str, StreamState] = {}
        self._opened = 0                      # streams opened: each one's `order`
        # Which streams need looking at, kept as their state changes so that no timer check or
        # plan visits every stream (_rearm): each one's next time (a text deadline, running dry,
        # silence due, ready for its next chunk) ...
        self._timers = StreamTimers()
        self._dirty: set[str] = set()         # ... streams changed since it was last worked out,
        self._ready: set[str] = set()         # ... those with work and under lookahead_ms held,
        self._held: set[str] = set()          # ... and those with text past its delay, held
        # Streams whose first words are arriving: text, no phrase cut yet, no audio (_arriving).
        self._arriving: dict[str, None] = {}
        self._arriving_wake: float | None = None   # the last plan left jobs for them until then
        # The model's busy share of the last seconds (decayed step time over decayed wall time).
        self._busy_s = self._wall_s = 0.0
        self._busy_at: float | None = None
        self._commands: collections.deque = collections.deque()
        self._opening_ids: set[str] = set()   # `open` queued, not applied yet
        self._leaving: set[str] = set()       # `cancel` or `close` queued, not applied yet
        self._closing: set[str] = set()       # `close` queued, not applied yet
        self._wake = asyncio.Event()
        # The one thread that runs model code. Pass the thread that loaded and warmed up the
        # engine: PyTorch's CPU thread pool (OpenMP) belongs to the thread that calls into it,
        # and a second calling thread leaves two pools fighting over the cores (on 2 cores every
        # model call then took ~1.5x as long). The scheduler owns it and shuts it down.
        self._pool = model_thread or new_model_thread()
        # Phonemizing (espeak-ng, ~0.5 ms a phrase) runs here, off the model thread: at 1000
        # streams it was two thirds of that thread's own CPU. Each stream's next phrase only
        # (see _prefetch), so a long text cut into many phrases at once cannot queue ahead of
        # other streams' next phrases. One thread, since espeak-ng keeps global state.
        self._text_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-text")
        self._fps = config.initial_frames_per_s
        # Audio seconds made per second of step time, for the real mix of work (acoustic,
        # flows, chunk context): admission's capacity until a stream has finished.
        self._audio_made = 0.0     # decayed totals: audio seconds made ...
        self._busy = 0.0           # ... and step seconds spent making them
        self._frames_per_char = _INITIAL_FRAMES_PER_CHAR   # at speed 1, measured on the phrases made
        # Compute seconds per audio second of recently finished streams, start to end: the
        # cost of a real stream's mix (first phrases, head-only flows, small first chunks),
        # steadier than the step mix, which swings between bursts of newcomers and idle tails.
        # Until one has finished: what a stream cost at warm-up (measure_stream_cost), if given.
        self._stream_cost: float | None = initial_stream_cost
        # While no stream finishes, the estimate returns to what streams have cost here: the
        # median of the last finished ones, or warm-up's cost before enough have (_current_cost).
        self._recent_costs: collections.deque[float] = collections.deque(maxlen=_SETTLED_COSTS)
        self._settled_cost = initial_stream_cost
        self._costed_at = time.monotonic()
        # Finished streams too short to cost alone (a one-line reply): audio ms, compute ms.
        self._short_pool = (0.0, 0.0)
        # The idle probe (_maybe_recalibrate): when the server last had nothing, the probe in
        # the model thread, its stop flag, and whether this idle spell has had its probe.
        self._idle_since: float | None = None
        self._probe: asyncio.Future | None = None
        self._probe_stop = threading.Event()
        self._recalibrated = False
        self._starting_count = (float("-inf"), 0, 0)   # when, how many starting, of how many
        self._last_tick = float("-inf")
        self._timer_due = False          # the last wait ended at a timer: tick now
        self._work_changed = True        # phrases cut or a step done since the last plan
        self._trimmed_at = time.monotonic()
        self._steps_at_trim = 0
        self.steps = 0

    # ---- commands (event loop; applied between steps) ----
    def open(self, sid: str, options: StreamOptions, sink: StreamSink) -> None:
        self._opening_ids.add(sid)
        self._command(("open", sid, options, sink))

    def text(self, sid: str, text: str) -> None:
        self._command(("text", sid, text, time.monotonic()))

    def flush(self, sid: str) -> None:
        self._command(("flush", sid))

    def end(self, sid: str) -> None:
        self._command(("end", sid))

    def cancel(self, sid: str) -> None:
        self._leaving.add(sid)
        self._command(("cancel", sid))

    def close(self, sid: str) -> None:
        """Forget a stream at once (disconnect): no output, nothing kept. A `cancel` queued
        before it is not answered either (its sink is gone)."""
        self._leaving.add(sid)
        self._closing.add(sid)
        self._command(("close", sid))

    def _command(self, cmd: tuple) -> None:
        self._commands.append(cmd)
        self._probe_stop.set()     # an idle probe gives way at its next model call
        self._wake.set()

    # ---- introspection ----
    @property
    def stream_count(self) -> int:
        return len(self._streams) + len(self._opening_ids)

    def _live_count(self) -> tuple[int, int]:
        """(streams opened and not cancelled or closed, of which still to be registered): as
        the commands will leave things, not as the last applied ones did. A stream cancelled
        during a step is the scheduler's until the step ends; counting it meanwhile had
        admission refuse the very next `start` on an idle server (`overloaded`, retry in 2 s:
        a broken barge-in)."""
        registered_left = len(self._streams) - sum(1 for sid in self._leaving if sid in self._streams)
        opening_left = len(self._opening_ids) - sum(1 for sid in self._leaving
                                                    if sid in self._opening_ids)
        return registered_left + opening_left, opening_left

    @property
    def queue_depth(self) -> int:
        return sum(len(s.phrases) for s in self._streams.values())

    def load(self, extra_streams: int = 0) -> LoadEstimate:
        live, opening = self._live_count()
        n = live + extra_streams
        cost = self._current_cost(time.monotonic())
        if cost:
            capacity = 1.0 / cost
        elif self._busy > 1.0:   # no stream finished yet: the recent steps' output rate
            capacity = self._audio_made / self._busy
        else:                    # under a second measured: estimate from the work-frame rate
            capacity = self._fps / (1.0 + _ACOUSTIC_COST_PER_FRAME) * self.frame_ms / 1000.0
        return LoadEstimate(active_streams=n, demand_audio_s_per_s=float(n),
                            capacity_audio_s_per_s=capacity,
                            starting_streams=opening + self._starting_streams() + extra_streams)

    def _current_cost(self, now: float) -> float | None:
        """The finished streams' cost, drawn back to the settled cost (the median of the last
        _SETTLED_COSTS finished streams, or warm-up's cost before _SETTLED_MIN have finished)
        with a half-life of `cost_half_life_s` since a stream last finished. Costs measured
        while the host was slow (another process took the cores) would otherwise refuse streams
        at a fraction of the real capacity for as long as no stream finishes to correct them,
        and refusing streams keeps them from finishing: on 2 cores, 25 s of a neighbour's load
        left a server refusing at 3 live streams of ~13 for minutes (BENCHMARKS.md, "Streams
        coming and going"). The median shrugs off such a spell, and after a quiet one the next
        burst is judged by what streams cost under load here, not by warm-up's single probe
        (4-23% lower on 2 cores). Streams finish every few seconds under load, so there the
        pull is small."""
        cost, settled = self._stream_cost, self._settled_cost
        half_life = self.config.cost_half_life_s
        if cost is None or settled is None or half_life <= 0:
            return cost
        return settled + (cost - settled) * 0.5 ** ((now - self._costed_at) / half_life)

    def _starting_streams(self) -> int:
        """Registered streams still building their runway (`StreamState.starting`). Streams
        that start together need more than real time until then, all at once."""
        now = time.monotonic()
        # Admission asks once per new stream; with hundreds of streams a burst would visit
        # every stream for each of its arrivals. Counted at most every _TICK_MIN_S; streams
        # registered since then count as starting.
        at, counted, registered = self._starting_count
        if now - at >= _TICK_MIN_S:
            frame_ms, runway = self.frame_ms, self.config.runway_ms
            counted = sum(1 for s in self._streams.values()
                          if s.starting(now, frame_ms, runway) and s.id not in self._leaving)
            registered = len(self._streams)
            self._starting_count = (now, counted, registered)
        return counted + max(0, len(self._streams) - registered)

    # ---- the loop ----
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self._iteration(loop)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug in one iteration must not silence every stream
                    log.exception("scheduler iteration failed; continuing")
                    await asyncio.sleep(0.05)
        finally:
            self._probe_stop.set()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._text_pool.shutdown(wait=False, cancel_futures=True)

    async def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        """One schedule -> execute -> update step, or a wait for something to do."""
        self._wake.clear()
        if self._probe is not None and self._probe.done():
            self._probe_done(*self._probe.result())
        await self._apply_all_commands()
        now = time.monotonic()
        ticked = self._timer_due or now - self._last_tick >= _TICK_MIN_S
        if ticked:
            self._tick_streams(now)
            self._last_tick, self._timer_due = now, False
        # A plan can change only with new phrases, a finished step or time (the tick): most
        # wake-ups with many streams are words arriving mid-sentence, which change nothing.
        batch = _Batch()
        if ticked or self._work_changed:
            self._work_changed = False
            batch = self._schedule(now)
        if batch.acoustic or batch.decode:
            result, failed = await loop.run_in_executor(self._pool, self._execute_isolated, batch)
            # Every stream in the step pays its share, one cancelled meanwhile too (its
            # `cancelled` reports it): metered before the commands drop anyone.
            self._meter_step(batch, result)
            await self._apply_all_commands()   # cancels that raced the step win over its output
            self._fail_streams(failed)
            self._update(batch, result)
            self._work_changed = True
            self._trim_heap()
            return
        self._trim_heap()   # idle: what the last steps freed goes back too
        self._maybe_recalibrate(loop, now)
        # Without a tick the timers were not looked at: wait no longer than until the next one.
        timeout = self._next_wakeup(now) if ticked else self._last_tick + _TICK_MIN_S - now
        # asyncio.timeout, not wait_for: no task is created for each wait (the scheduler waits
        # between most steps under light load).
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._wake.wait()
        except TimeoutError:
            self._timer_due = True

    def _maybe_recalibrate(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Once per idle spell, after `recalibrate_idle_s` with no stream: probe what a stream
        costs now (`measure_stream_cost`, in the model thread, given way to at the first
        command). The estimate comes from finished streams, and with none finishing it stays
        where the last ones left it: streams that finished while another process held the
        cores left an idle host refusing every second stream for 15 minutes and more."""
        if self._streams or self._commands:   # (a stream opening has its `open` queued)
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
        wait = self.config.recalibrate_idle_s
        if wait <= 0 or self._probe is not None or self._recalibrated or now - self._idle_since < wait:
            return
        self._recalibrated = True
        self._probe_stop.clear()
        stop, engine, phonemizer = self._probe_stop.is_set, self.engine, self.phonemizer
        streams = self.config.probe_streams

        def probe() -> tuple[float | None, float]:
            t0 = time.perf_counter()
            try:
                cost = measure_stream_cost(engine, phonemizer, streams=streams, stop=stop)
            except ProbeStopped:
                cost = None
            except Exception:   # a failed probe leaves the estimate as it was
                log.warning("idle cost probe failed", exc_info=True)
                cost = None
            return cost, time.perf_counter() - t0

        self._probe = loop.run_in_executor(self._pool, probe)
        self._probe.add_done_callback(lambda _f: self._wake.set())

    def _probe_done(self, cost: float | None, seconds: float) -> None:
        """Lower the estimate to what the idle probe read (times _PROBE_PREMIUM), never raise
        it: one probe is one moment, and finished streams show a slower host soon enough.
        `seconds`: the model thread's time on it (a stopped probe's too)."""
        self._probe = None
        self._overhead("cost_probe", seconds)
        now = time.monotonic()
        current = self._current_cost(now)
        if cost is None or current is None:
            return
        target = cost * _PROBE_PREMIUM
        if target >= current:
            log.debug("idle cost probe: %.3f s per audio s; estimate %.3f stays", cost, current)
            return
        log.info("idle cost probe: %.3f s per audio s; the cost estimate goes from %.3f to %.3f",
                 cost, current, target)
        self._stream_cost = self._settled_cost = target
        self._recent_costs.clear()
        self._short_pool = (0.0, 0.0)
        self._costed_at = now

    def _trim_heap(self) -> None:
        """Every `heap_trim_interval_s` (after a step, or idle), queue `release_free_heap` in
        the model thread: it runs before the next step, outside any step's measured (metered)
        time (25-40 ms with ~500 MB free on 2 CPU cores).

        glibc holds each arena's lock while it trims it, and the event loop and the encoder
        threads free memory the model thread allocated: now and then they wait for the trim
        (a 36 ms loop stall measured, BENCHMARKS.md). So a due trim waits until no listener
        owed audio holds less than _TRIM_SAFE_BUFFERED_MS (a newcomer's first audio, a
        listener near dry), for up to _TRIM_MAX_DEFER intervals."""
        interval = self.config.heap_trim_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._trimmed_at < interval or self.steps == self._steps_at_trim:
            return   # off, too soon, or no step has freed anything since the last trim
        if now - self._trimmed_at < _TRIM_MAX_DEFER * interval and not self._trim_harmless(now):
            return
        self._trimmed_at, self._steps_at_trim = now, self.steps
        trim = asyncio.get_running_loop().run_in_executor(self._pool, _release_free_heap)
        trim.add_done_callback(
            lambda f: None if f.cancelled() else self._overhead("heap_trim", f.result()))

    def _overhead(self, kind: str, seconds: float) -> None:
        if self.observer:
            self.observer.on_overhead(kind, seconds)

    def _trim_harmless(self, now: float) -> bool:
        """Whether every listener the scheduler owes audio holds enough that a stall of a
        trim's length cannot reach it."""
        return all(s.buffered_ms(now, self.frame_ms) >= _TRIM_SAFE_BUFFERED_MS
                   for s in self._streams.values() if s.has_work() or s.inflight_chars)

    async def _apply_all_commands(self) -> None:
        """The commands queued now, in order, `_COMMANDS_PER_SLICE` at a time with the event
        loop let go in between: a client that sends its text in 20,000 tiny frames queues as
        many commands, and applying them in one go stalled the loop (and every stream) ~0.5 s.
        Commands queued meanwhile wait for the next call, so a flood cannot hold steps off.
        (A stream cancelled meanwhile gets nothing more: the session has detached its sink.)"""
        left = len(self._commands)
        while left > 0:
            n = min(left, _COMMANDS_PER_SLICE)
            self._apply_commands(n)
            left -= n
            if left > 0:
                await asyncio.sleep(0)

    def _apply_commands(self, limit: int | None = None) -> None:
        applied = 0
        while self._commands and (limit is None or applied < limit):
            applied += 1
            cmd, sid, *args = self._commands.popleft()
            if cmd == "open":
                self._opening_ids.discard(sid)
                self._open(sid, *args)
                continue
            if cmd in ("cancel", "close"):
                self._leaving.discard(sid)
            if cmd == "close":
                self._closing.discard(sid)
            stream = self._streams.get(sid)
            if stream is None:
                continue
            if cmd in ("text", "flush", "end"):
                # Words joining text that was already waiting, in a stream that has had text,
                # only move its text deadline later than the time it is armed for: it is worked
                # out again only if they cut a phrase (_queue_phrases). Most words are such.
                resumed = self._resume_stalled(stream, time.monotonic())
                if (resumed or cmd != "text" or stream.first_text_at is None
                        or not stream.splitter.pending.strip()):
                    self._dirty.add(sid)
            if cmd == "text":
                self._on_text(stream, *args)
            elif cmd == "flush":
                self._queue_phrases(stream, stream.splitter.flush())
            elif cmd == "end":
                stream.ended = True
                self._queue_phrases(stream, stream.splitter.flush())
            elif cmd == "cancel":
                answered = sid not in self._closing   # the sink then logs the usage
                usage = self._drop(sid, "cancelled", log_usage=not answered)
                if answered:
                    stream.sink.on_cancelled(usage)
            elif cmd == "close":
                self._drop(sid, "closed")

    def _open(self, sid: str, options: StreamOptions, sink: StreamSink) -> None:
        if sid in self._streams:
            sink.on_error("bad_request", f"stream {sid} already open")
            return
        self._opened += 1
        self._streams[sid] = StreamState(
            id=sid, options=options, sink=sink, splitter=self.splitter_factory(),
            code_blocks=None if options.read_code else CodeBlocks(), order=self._opened)
        self._dirty.add(sid)
        self._recalibrated, self._idle_since = False, None   # the next idle spell may probe again
        self.meter.open(sid)
        log.debug("stream %s opened", sid)

    def _drop(self, sid: str, how: str, *, log_usage: bool = True) -> dict[str, Any] | None:
        """A stream cancelled or closed: what it used, logged (the only record of a stream
        that ends without `done` or `cancelled`: a disconnect, a shutdown) and returned."""
        self._forget(sid)
        usage = self.meter.close(sid)
        if log_usage and usage and usage.get("chars"):
            log.info("usage of stream %s, %s: %s", sid, how, usage_summary(usage))
        else:
            log.debug("stream %s %s", sid, how)
        self._ended("log_only" if log_usage else how, usage)
        return usage

    def _ended(self, reported: str, usage: dict[str, Any] | None) -> None:
        if self.observer and usage is not None:
            self.observer.on_stream_ended(reported, usage)

    def _forget(self, sid: str) -> None:
        self._streams.pop(sid, None)
        self._timers.discard(sid)
        self._dirty.discard(sid)
        self._ready.discard(sid)
        self._held.discard(sid)
        self._arriving.pop(sid, None)

    def _on_text(self, stream: StreamState, text: str, at: float) -> None:
        stream.last_text_at = at
        if stream.first_text_at is None:
            stream.first_text_at = at
        self.meter.add_text(stream.id, len(text), now=at)
        # Eager (short) phrases only while the listener has little speech coming: audio it
        # holds plus phrases already cut, so a backlog of short phrases cannot build up.
        ahead = self._ahead_ms(stream, time.monotonic())
        self._queue_phrases(stream, stream.splitter.push(text, buffered_ms=ahead))
        if (self.config.arriving_step_ms > 0 and stream.anchor is None
                and not stream.has_work() and not stream.inflight_chars):
            self._arriving[stream.id] = None

    def _queue_phrases(self, stream: StreamState, phrases: list[str]) -> None:
        for text in phrases:
            voice = None
            if stream.code_blocks is not None:    # every phrase, whitespace too: it ends lines
                blanked = stream.code_blocks.blank(text)
                voice = None if blanked == text else blanked.strip()
            if voice != "" and stream.options.markdown and reads_nothing(
                    text if voice is None else voice):
                voice = ""                        # only markup: a rule, a table's |---| row
            if spoken := text.strip():
                lead = stream.space_carry + text[:len(text) - len(text.lstrip())]
                stream.space_carry = text[len(text.rstrip()):]
                stream.queue_phrase(PendingPhrase(text=spoken, space_before=lead, voice=voice))
                stream.mid_sentence = not ends_sentence(text)
                self._work_changed = True
            else:
                stream.space_carry += text
        if phrases:
            self._dirty.add(stream.id)
        self._prefetch(stream)

    def _prefetch(self, stream: StreamState) -> None:
        """Start phonemizing the stream's next phrase in the text thread, if not yet started
        (one with nothing to read is announced without phonemes: see _schedule)."""
        if stream.phrases and stream.phrases[0].phonemized is None and stream.phrases[0].voice != "":
            head = stream.phrases[0]
            head.phonemized = self._text_pool.submit(self._phonemize, head.spoken,
                                                     stream.options.markdown,
                                                     stream.options.normalize)

    def _read_across(self, ph: PhonemizedText, before: concurrent.futures.Future | None,
                     read_on: bool) -> PhonemizedText:
        """(model thread) `ph` read from the word before it and on into the read-on word,
        where asked and the reading allows (Phonemizer.read_from, read_on)."""
        if before is not None:
            try:
                ph = self.phonemizer.read_from(before.result(), ph)
            except ValueError:
                pass                              # that word speaks nothing: read as it is
        return self.phonemizer.read_on(ph, self._read_on) if read_on else ph

    def _phonemize(self, text: str, markdown: bool, normalize: bool) -> PhonemizedText:
        """(text thread) The phrase's phonemes; Markdown markup blanked first if asked, and
        written forms read as said ("$5": five dollars) if asked."""
        return self.phonemizer.phonemize(speakable(text) if markdown else text,
                                         normalize=normalize)

    # ---- schedule ----
    def _tick_streams(self, now: float) -> None:
        """Timers: buffered-text deadline, listener clock, silence while text is pending. For
        the streams whose time has come (_rearm), and those holding text past its delay."""
        self._refresh(now)
        visit = dict.fromkeys(self._timers.pop_due(now))
        visit.update(dict.fromkeys(self._held))
        for sid in visit:
            if (stream := self._streams.get(sid)) is None:
                continue
            self._tick_stream(stream, now)
            if sid in self._streams:
                self._dirty.discard(sid)
                self._rearm(stream, now, visited=True)
        if AUDIT_TIMERS:
            self._audit(now)

    def _tick_stream(self, stream: StreamState, now: float) -> None:
        pending = stream.splitter.pending.strip()   # whitespace alone is never spoken
        delay = stream.options.max_buffer_delay_ms / 1000.0
        idle = None if stream.last_text_at is None else now - stream.last_text_at
        if pending and idle is not None and idle >= delay and self._hold_s(stream, now) <= 0:
            # While words still trickle in, function words at its end wait for the word
            # they lead, and a started listener gets a few words at a time rather than a
            # phrase per pause between words ("out of | their houses" at 3 words/s was a
            # phrase a word, each with its pauses, the word before each cut drawn out).
            trickle = idle < self.config.function_word_wait_ms / 1000.0
            words = self.config.delay_min_words if trickle and stream.anchor is not None else 0
            self._queue_phrases(stream, stream.splitter.flush(hold_function_words=trickle,
                                                              min_words=words))
        elif pending and (due := self._first_phrase_due(stream)) is not None and now >= due:
            # Text trickles in slower than the eager cut's few words: speak the complete
            # words that have come rather than keep a new listener waiting for more.
            self._queue_phrases(stream, stream.splitter.cut_at_word())
        buffered = stream.buffered_ms(now, self.frame_ms)
        if stream.anchor is not None and buffered < 0:
            if stream.has_work() and not stream.stalled:   # ran dry while we still had its speech
                if self.observer:
                    self.observer.on_late(stream.id)
                    if not stream.dry:
                        self.observer.on_underrun(stream.id)
                stream.dry = True
            # The listener's player stalls when dry and resumes with the next audio.
            stream.restart_clock(now, self.frame_ms)
            buffered = 0.0
        if (stream.anchor is not None and not stream.has_work() and stream.awaiting_words(now)
                and buffered < self.config.silence_fill_ms):
            self._emit_silence(stream, self.config.silence_fill_ms)
        if stream.finished():
            self._finish(stream)

    def _resume_stalled(self, stream: StreamState, now: float) -> bool:
        """A listener that ran dry with nothing owed (its player stalled: a pause in the
        client's text) is no longer followed by any timer. When text comes for it, its clock
        resumes from now, and until its next audio it waits as a newcomer does: that wait is
        not audio arriving late (_tick_stream counts only a listener run dry while owed audio).
        Returns whether it had stalled."""
        if (stream.anchor is not None and not stream.has_work()
                and stream.buffered_ms(now, self.frame_ms) < 0):
            stream.restart_clock(now, self.frame_ms)
            stream.stalled = True
            return True
        return False

    def _refresh(self, now: float) -> None:
        """Work out again when the streams changed since the last look next need the scheduler."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        for sid in dirty:
            if (stream := self._streams.get(sid)) is not None:
                self._rearm(stream, now, visited=False)

    def _rearm(self, stream: StreamState, now: float, *, visited: bool) -> None:
        """Arm the stream's timer for the first moment _tick_stream may have something to do
        for it or it becomes ready for its next chunk, assuming nothing else changes it (what
        does marks it in _dirty); and keep its place in the ready and held sets.

        `visited`: _tick_stream has just looked at it. A deadline already passed that the
        visit left as it was (the words so far could not be cut yet) then waits for new text,
        as before, rather than bring the stream up at every check. Otherwise a deadline passed
        arms it for the next check."""
        sid, frame_ms = stream.id, self.frame_ms
        work = stream.has_work()
        if self._is_ready(stream, now):
            self._ready.add(sid)
        else:
            self._ready.discard(sid)
        wake = float("inf")
        held = False
        if stream.splitter.pending.strip():
            if stream.last_text_at is not None:
                due = stream.last_text_at + stream.options.max_buffer_delay_ms / 1000.0
                if due > now:
                    wake = due
                else:     # past it: how long it is held moves with the speech estimate
                    held = True
            if (due := self._first_phrase_due(stream)) is not None and (due > now or not visited):
                wake = min(wake, due)
        elif stream.ended and not work:
            wake = now    # finished
        if held:
            self._held.add(sid)
        else:
            self._held.discard(sid)
        if stream.anchor is not None:
            dry = stream.dry_at(frame_ms)
            if work:      # ready for its next chunk; or late, if it runs dry first
                ready_at = dry - self.config.lookahead_ms / 1000.0
                wake = min(wake, ready_at if ready_at > now else dry)
            elif stream.awaiting_words(now):
                silence = dry - self.config.silence_fill_ms / 1000.0
                if silence > now or not visited:
                    wake = min(wake, silence)
        if wake != float("inf"):
            self._timers.arm(sid, wake)

    def _is_ready(self, stream: StreamState, now: float) -> bool:
        """Work to plan, and its listener holds under `lookahead_ms`."""
        return stream.has_work() and stream.buffered_ms(now, self.frame_ms) < self.config.lookahead_ms

    def _audit(self, now: float) -> None:
        """(tests) Every stream that needs the scheduler is armed for it, or queued for a look."""
        eps, frame_ms = _AUDIT_EPS_S, self.frame_ms
        for stream in self._streams.values():
            if stream.id in self._dirty:
                continue
            at = self._timers.armed_at(stream.id)
            at = float("inf") if at is None else at
            work = stream.has_work()
            wrong = []
            if self._is_ready(stream, now) and stream.id not in self._ready:
                wrong.append("ready, not in the ready set")
            if stream.finished() and at > now + eps:
                wrong.append("finished, not armed")
            if stream.splitter.pending.strip():
                if stream.last_text_at is not None:
                    due = stream.last_text_at + stream.options.max_buffer_delay_ms / 1000.0
                    if due <= now and stream.id not in self._held:
                        wrong.append("text past its delay, not held")
                    if due > now and at > due + eps:
                        wrong.append("text delay not armed")
                if (due := self._first_phrase_due(stream)) is not None and due > now and at > due + eps:
                    wrong.append("first phrase wait not armed")
            if stream.anchor is not None:
                dry = stream.dry_at(frame_ms)
                if work and at > dry + eps:
                    wrong.append("may run dry unarmed")
                silence = dry - self.config.silence_fill_ms / 1000.0
                if not work and stream.awaiting_words(now) and silence > now and at > silence + eps:
                    wrong.append("silence not armed")
            if wrong:
                AUDIT_FAILURES.append(f"stream {stream.id} at {now:.6f}: {', '.join(wrong)}")
                log.error("timer audit: %s", AUDIT_FAILURES[-1])

    def _hold_s(self, stream: StreamState, now: float) -> float:
        """How long text past its `max_buffer_delay_ms` may still wait: until the listener has
        less than `buffer_delay_hold_ms` of speech coming (0: flush now). Spoken then, it is
        still made before the listener runs dry, so it is heard no later, and it may complete
        its sentence meanwhile. Flushed at once, text typed at 3 words/s (a gap over 300 ms
        between words) became one phrase per word, each with a phrase's pauses around it:
        42.8 s of audio for 88 words that take 28 s at 15 words/s, the listener 13.7 s
        behind the text by the end of a paragraph."""
        hold = self.config.buffer_delay_hold_ms
        if hold <= 0:
            return 0.0
        return (self._ahead_ms(stream, now) - hold) / 1000.0

    def _ahead_ms(self, stream: StreamState, now: float) -> float:
        ms_per_char = self._frames_per_char * stream.options.params.length_scale * self.frame_ms
        return stream.ahead_ms(now, self.frame_ms, ms_per_char)

    def _phrase_params(self, stream: StreamState, now: float) -> SynthesisParams:
        """The synthesis settings of the phrase `stream` sends to the model now: its own, or, for
        a stream that may catch up (`options.catch_up`, from `start`'s `max_speed`), faster in
        proportion to the speech its listener has coming beyond `catch_up_after_ms` (audio
        buffered, phrases queued or in the model, this one included, text not yet cut), up to
        `catch_up` times. A live feed faster than the voice (captions at 4 words/s) put the
        listener ~10 s further behind the text each minute (9.6 s after 51 s: BENCHMARKS.md);
        so the lag settles where the speed matches the feed's."""
        params = stream.options.params
        most = stream.options.catch_up
        if most <= 1.0:
            return params
        ms_per_char = self._frames_per_char * params.length_scale * self.frame_ms
        coming = (stream.ahead_ms(now, self.frame_ms, ms_per_char)
                  + stream.splitter.pending_chars * ms_per_char)
        faster = min(most, coming / self.config.catch_up_after_ms)
        if faster <= 1.0:
            return params
        return replace(params, length_scale=params.length_scale / faster)

    def _first_phrase_due(self, stream: StreamState) -> float | None:
        """When a listener with no audio, and nothing cut or in the model for it, gets the words
        that have come so far (first text + first_phrase_wait_ms); None if not waiting so."""
        if (stream.anchor is not None or stream.has_work() or stream.inflight_chars
                or stream.first_text_at is None):
            return None
        return stream.first_text_at + self.config.first_phrase_wait_ms / 1000.0

    def _emit_silence(self, stream: StreamState, ms: float) -> None:
        frames = max(1, round(ms / self.frame_ms))
        stream.filled_frames += frames
        self._emit_audio(stream, np.zeros(frames * self.engine.hop_length, dtype=np.float32), frames)

    def _schedule(self, now: float) -> _Batch:
        batch = _Batch()
        budget = self._fps * self.config.target_step_ms / 1000.0
        used = 0.0
        # Streams whose time came since the last check may be ready now (the rest wait for it).
        self._dirty.update(self._timers.pop_due(now))
        self._refresh(now)
        ready = [s for sid in self._ready
                 if (s := self._streams.get(sid)) is not None and self._is_ready(s, now)]
        grace, margin = self.config.new_stream_grace_ms / 1000.0, self.config.pipeline_margin_ms / 1000.0
        # Several listeners waiting for their first audio at once (a burst of new streams).
        burst = sum(1 for s in ready if s.anchor is None) > 1
        step = self.config.target_step_ms / 1000.0
        # A step that carries a stream's first audio stays short: work not due within the next
        # step waits for the following one rather than delay that first audio.
        newcomer_budget = self._fps * self.config.newcomer_step_ms / 1000.0
        with_newcomer = False
        # While a new stream's first phrase is still arriving, a started listener's big job (a
        # sentence's acoustic, a long chunk) that can wait does: the phrase, once cut, would
        # wait for the step in progress, up to a whole one (_defer_for_arrival).
        arriving_until = self._arriving_until(now)
        self._arriving_wake = None
        keyed = [(s.deadline(self.frame_ms, now=now, new_grace_s=grace, margin_s=margin, step_s=step),
                  s.order, s) for s in ready]
        # Behind: two or more started listeners run dry within the next step. Then throughput
        # comes first and the step grows, so its model calls batch more (each call has a fixed
        # cost). A scheduler that keeps up never gets here, and keeps its steps short for the
        # streams that arrive during one.
        if sum(1 for due, _, s in keyed if s.anchor is not None and due <= now + step) >= 2:
            budget *= self.config.behind_step_factor
        # Earliest deadline first; at equal deadlines (newcomers), the stream opened first.
        for due, _, stream in sorted(keyed, key=lambda k: k[:2]):
            # Other newcomers are this step's urgent work: they batch with it (one model call
            # for several first phrases costs far less than one call each).
            limit = (min(budget, newcomer_budget)
                     if with_newcomer and stream.anchor is not None and due > now + step else budget)
            if stream.active is not None and stream.active.remaining:
                if len(batch.decode) >= self.config.max_batch_chunks:
                    continue
                active = stream.active
                a, b = active.plan[active.next_chunk]
                cost = self.engine.bucket(b - a)
                if active.unfinished is not None:
                    cost += _FLOW_COST_PER_FRAME * active.unfinished.num_frames
                if self._defer_for_arrival(stream, due, used + cost, arriving_until):
                    continue
                if used and used + cost > limit:
                    break
                batch.decode.append((stream.id, DecodeJob(z=active.z, start=a, end=b,
                                                          speaker=stream.options.params.speaker),
                                     active.unfinished))
                batch.owners.append(active)
            else:
                # Phrases known to hold nothing to read (code the stream asked not to hear, or
                # what its phonemes came out empty for: "!!!", an emoji left unread) are
                # announced here, where its timeline ends (no step is running), rather than take
                # a model step each: a long block would hold the prose after it for many steps.
                skipped = False
                while stream.phrases and _says_nothing(stream.phrases[0]):
                    phrase = stream.next_phrase()
                    self._unspoken_phrase(stream, phrase.text, phrase.space_before)
                    skipped = True
                if skipped:
                    self._dirty.add(stream.id)
                if not stream.phrases:
                    if stream.finished():   # its text ended in them: no step will end it
                        self._finish(stream)
                    continue
                if skipped:
                    self._prefetch(stream)   # the phrase after them
                if len(batch.acoustic) >= self.config.max_batch_phrases:
                    continue
                text, phonemized = stream.phrases[0].text, stream.phrases[0].phonemized
                spoken = stream.phrases[0].spoken
                spoken_chars = len(spoken)
                buffered = stream.buffered_ms(now, self.frame_ms)
                # Near dry: the first chunk before the flow over the whole phrase. Otherwise the
                # phrase's plan starts at a chunk no longer than what the listener holds.
                # Newcomers of a burst get a longer first chunk (whole flow): their next chunks
                # fall due together, and the runway must cover the steps that make them.
                if burst and stream.anchor is None and len(self.engine.config.chunk_schedule) > 1:
                    head_only, first = False, 1
                else:
                    head_only = buffered < self.config.head_only_below_ms
                    first = 0 if head_only else self.engine.schedule_index_for(buffered / self.frame_ms)
                cost = (self.engine.bucket(self.engine.config.chunk_schedule[first])
                        + _ACOUSTIC_COST_PER_CHAR * spoken_chars)
                # Newcomers waiting together share the step that carries the first of them,
                # whatever the budget (up to max_batch_phrases): one acoustic call for several
                # first phrases costs far less than a step each, and each step they wait for is
                # time before every later one of them hears anything.
                if self._defer_for_arrival(stream, due, used + cost, arriving_until):
                    continue
                if used and used + cost > limit and not (with_newcomer and stream.anchor is None):
                    break
                with_newcomer = with_newcomer or stream.anchor is None
                batch.spaces[stream.id] = stream.next_phrase().space_before
                self._dirty.add(stream.id)
                self._prefetch(stream)
                stream.inflight_chars += spoken_chars
                params = self._phrase_params(stream, now)
                # A stream's first audio: the voice's lead-in before its first word is silence
                # the listener would wait through; the first chunk starts near that word.
                # After a cut inside a clause, the voice's silence at the end of the phrase
                # before and at the start of this one is a pause no reader makes ("The
                # quarterly report | arrived": 145-220 ms against 55-65 read whole).
                if stream.emitted_frames == 0:
                    lead_in = self._lead_in_frames
                else:
                    lead_in = self._join_frames if stream.open_end else None
                # A line break ends a phrase as a mark does: a list's item, a heading.
                stream.open_end = not ends_in_mark(text) and not stream.line_break_after()
                tail = self._join_frames if stream.open_end else None
                # Cut inside a clause, it is read on into a word after it, never heard, unless
                # it is the stream's last: read alone, the voice ends it as a sentence, its
                # last word drawn out ~1.4x. The phrase after it is read from its last word,
                # never heard: read alone, its first word is read as a sentence's first. Not
                # for a listener near dry: the head-only flow (from the reading's frame 0)
                # comes first, and the whole flow's step made neighbours late.
                last = stream.ended and not stream.phrases and not stream.splitter.pending.strip()
                read_on = stream.open_end and not last and self._read_on is not None
                before, stream.word_before = stream.word_before, None
                before = None if head_only else before
                words = spoken.split()
                if stream.open_end and not last and self.config.read_from and words:
                    stream.word_before = self._text_pool.submit(
                        self._phonemize, words[-1], stream.options.markdown,
                        stream.options.normalize)
                batch.acoustic.append(_PhraseJob(stream.id, text, params, head_only, first,
                                                 phonemized, lead_in, tail, read_on, before))
            used += cost
        return batch

    def _arriving_until(self, now: float) -> float | None:
        """When the last first phrase now on its way is spoken at the latest, or None if none
        is: a new stream that has had text, no phrase cut, in the model or heard yet, for up to
        `first_phrase_wait_ms` from its first text (by then its words are spoken whatever their
        number). Streams that are no longer on their way are dropped here."""
        if not self._arriving or self.config.arriving_step_ms <= 0:
            return None
        # Jobs left for later leave the model idle meanwhile: near capacity that lost the
        # throughput the admitted streams count on (late audio under random arrivals).
        if self.busy_fraction(now) >= self.config.arriving_below_busy:
            return None
        wait = self.config.first_phrase_wait_ms / 1000.0
        until = None
        for sid in list(self._arriving):
            s = self._streams.get(sid)
            if (s is None or s.anchor is not None or s.has_work() or s.inflight_chars
                    or s.first_text_at is None or now - s.first_text_at > wait):
                del self._arriving[sid]
            else:
                until = max(until or 0.0, s.first_text_at + wait)
        return until

    def busy_fraction(self, now: float) -> float:
        """The share of the last few seconds (time constant _BUSY_TAU_S) the model spent in
        steps; idle time since the last step counts."""
        busy, wall = self._busy_window(now)
        return busy / wall if wall > 0 else 0.0

    def _busy_window(self, now: float) -> tuple[float, float]:
        """Step seconds and wall seconds until `now`, both decayed alike."""
        if self._busy_at is None:
            return 0.0, 0.0
        idle = max(0.0, now - self._busy_at)
        decay = math.exp(-idle / _BUSY_TAU_S)
        return self._busy_s * decay, self._wall_s * decay + idle

    def _note_step(self, now: float, seconds: float) -> None:
        if self._busy_at is not None:
            self._busy_s, self._wall_s = self._busy_window(now)
            self._busy_s += seconds
        self._busy_at = now

    def _defer_for_arrival(self, stream: StreamState, due: float, work: float,
                           arriving_until: float | None) -> bool:
        """Leave a started listener's job for a later step: a first phrase is on its way
        (`arriving_until`), the step would hold more than `arriving_step_ms` of work with it,
        and the job can still be done in time after that phrase's step (two steps' margin)."""
        if arriving_until is None or stream.anchor is None:
            return False
        if work <= self._fps * self.config.arriving_step_ms / 1000.0:
            return False
        job_s = work / self._fps
        if due - job_s < arriving_until + 2 * self.config.target_step_ms / 1000.0:
            return False
        self._arriving_wake = arriving_until   # plan again by then at the latest
        return True

    def _next_wakeup(self, now: float) -> float:
        """Seconds until a listener needs more audio, text times out, or silence is due."""
        self._refresh(now)
        if AUDIT_TIMERS:
            self._audit(now)
        nxt = 1.0
        if (at := self._timers.next_at()) is not None:
            nxt = min(nxt, at - now)
        if self._arriving_wake is not None:   # jobs left for a first phrase on its way
            nxt = min(nxt, self._arriving_wake - now)
        for sid in self._held:   # text past its delay, held while the listener has plenty coming
            if (s := self._streams.get(sid)) is not None:
                nxt = min(nxt, max(0.0, self._hold_s(s, now)))
        return max(nxt, 0.002)

    # ---- execute (worker thread: plain data only) ----
    def _execute_isolated(self, batch: _Batch) -> tuple[_Result, dict[str, str]]:
        """Run the step; if it fails, run each stream's part alone so only the culprit fails."""
        try:
            return self._execute(batch), {}
        except Exception as exc:
            sids = batch.stream_ids()
            if len(sids) == 1:
                log.exception("synthesis failed for stream %s", sids[0])
                return _Result(), {sids[0]: type(exc).__name__}
        merged, failed = _Result(), {}
        for sid in sids:
            part = _Batch(acoustic=[a for a in batch.acoustic if a.sid == sid],
                          decode=[d for d in batch.decode if d[0] == sid])
            try:
                res = self._execute(part)
            except Exception as exc:
                log.exception("synthesis failed for stream %s", sid)
                failed[sid] = type(exc).__name__
                continue
            merged.phrases.update(res.phrases)
            merged.audio.update(res.audio)
            merged.finished_z.update(res.finished_z)
            merged.dropped.update(res.dropped)
            merged.seconds += res.seconds
            merged.frames += res.frames
        return merged, failed

    def _execute(self, batch: _Batch) -> _Result:
        t0 = time.perf_counter()
        result = _Result()
        jobs, keys, firsts, cuts = [], [], [], []
        for p in batch.acoustic:
            try:
                ph = p.phonemized.result()
            except ValueError:
                result.phrases[p.sid] = None      # nothing speakable (e.g. only punctuation)
                continue
            ph = self._read_across(ph, p.before, p.read_on)
            jobs.append(AcousticJob(ids=ph.ids, params=p.params, head_only=p.head_only))
            keys.append((p.sid, p.text, ph))
            firsts.append(p.first)
            cuts.append((p.lead_in, p.tail))
        acoustic = self.engine.acoustic(jobs)
        plans, leads = [], []   # leads: (frames decoded before the durations' cut, kept)
        for r, first, key, (lead_in, tail) in zip(acoustic, firsts, keys, cuts):
            if key[2].read_from is not None:      # from the space before its first word
                start = int(np.sum(r.durations[:key[2].read_from]))
                plan = [(a + start, b + start)
                        for a, b in self.engine.chunk_plan(r.num_frames - start, first)]
                plans.append(_cut_tail(plan, r, key[2], tail))
                leads.append((0, 0))
                continue
            plan, sooner = _cut_lead_in(self.engine.chunk_plan(r.num_frames, first), r, key[2],
                                        lead_in, self._search_frames)
            plans.append(_cut_tail(plan, r, key[2], tail))
            leads.append((sooner, lead_in or 0))
        # A stream cancelled (or closed) since the step began is not decoded: its output would
        # be thrown away, and its `cancelled` waits for the step. (The event loop adds to
        # `_leaving` meanwhile; a stream it adds too late is decoded and dropped as before.)
        leaving = self._leaving
        decode, decoded = [], []
        for sid, job, unfinished in batch.decode:
            if sid in leaving:
                result.dropped.setdefault(sid, 0.0)
                continue
            if unfinished is not None:
                full = self.engine.finish_flow(unfinished)
                result.finished_z[sid] = full.z
                job = DecodeJob(z=full.z, start=job.start, end=job.end, speaker=job.speaker)
            decode.append(job)
            decoded.append(sid)
        new = []
        for key, res, plan, job, lead in zip(keys, acoustic, plans, jobs, leads):
            if key[0] in leaving:
                result.dropped[key[0]] = (result.dropped.get(key[0], 0.0)
                                          + _ACOUSTIC_COST_PER_FRAME * res.num_frames)
                continue
            decode.append(DecodeJob(z=res.z, start=plan[0][0], end=plan[0][1],
                                    speaker=job.params.speaker, phrase_frames=res.num_frames))
            new.append((key, res, plan, lead))
        audio = self.engine.decode(decode) if decode else []
        for sid, chunk in zip(decoded, audio):
            result.audio[sid] = chunk
        for ((sid, text, ph), res, plan, (sooner, keep)), chunk in zip(new, audio[len(decoded):]):
            hop = self.engine.hop_length
            if ph.read_from is not None:
                # It starts inside the reading, where the word before it ends: no silence there.
                _fade_in(chunk, round(_JOIN_FADE_S * self.engine.sample_rate))
                result.phrases[sid] = _NewPhrase(text, ph, res, plan, chunk)
                continue
            phrase = _trim_quiet_lead(_NewPhrase(text, ph, res, plan, chunk), sooner, keep, hop)
            result.phrases[sid] = _first_word_onset(phrase, hop)
        result.frames = (sum(j.end - j.start for j in decode)
                         + _ACOUSTIC_COST_PER_FRAME * sum(r.num_frames for r in acoustic))
        result.seconds = time.perf_counter() - t0
        return result

    # ---- update (event loop) ----
    def _update(self, batch: _Batch, result: _Result) -> None:
        self.steps += 1
        self._note_step(time.monotonic(), result.seconds)
        if result.frames and result.seconds > 0:
            self._fps = 0.8 * self._fps + 0.2 * (result.frames / result.seconds)
            samples = sum(len(a) for a in result.audio.values())
            samples += sum(len(p.first_audio) for p in result.phrases.values() if p is not None)
            decay = 0.98   # about the last 50 steps
            self._audio_made = decay * self._audio_made + samples / self.engine.sample_rate
            self._busy = decay * self._busy + result.seconds
        for sid, _, params, *_ in batch.acoustic:
            chars = 0   # what the voice reads of the stream's phrase in this step
            if (stream := self._streams.get(sid)) is not None:
                # One step runs at a time: nothing is in the model now.
                chars, stream.inflight_chars = stream.inflight_chars, 0
            new = result.phrases.get(sid)
            if new is not None and chars and params.length_scale > 0:
                fpc = new.acoustic.num_frames / chars / params.length_scale
                self._frames_per_char = 0.9 * self._frames_per_char + 0.1 * fpc
        if self.observer:
            self.observer.on_step(result.seconds, len(batch.acoustic), len(batch.decode), result.frames)
        for (sid, job, _), owner in zip(batch.decode, batch.owners):
            stream = self._streams.get(sid)
            # Only if the chunk still belongs to this stream's phrase (not cancelled meanwhile).
            if stream is not None and stream.active is owner and sid in result.audio:
                if sid in result.finished_z:
                    owner.z, owner.unfinished = result.finished_z[sid], None
                owner.next_chunk += 1
                self._emit_audio(stream, result.audio[sid], job.end - job.start)
        for sid, text, *_ in batch.acoustic:
            stream = self._streams.get(sid)
            if stream is None or sid not in result.phrases:   # gone, or its step failed
                continue
            new = result.phrases[sid]
            if new is not None:
                self._start_phrase(stream, new, batch.spaces.get(sid, ""))
            else:
                self._unspoken_phrase(stream, text, batch.spaces.get(sid, ""))
        # Streams this step served may be finished now (the others' turn comes at the next tick).
        for sid in batch.stream_ids():
            stream = self._streams.get(sid)
            if stream is not None:
                self._dirty.add(sid)
                if stream.finished():
                    self._finish(stream)

    def _meter_step(self, batch: _Batch, result: _Result) -> None:
        """Split the step's time and energy by the frames each stream had computed."""
        shares: dict[str, float] = dict(result.dropped)   # what was done for leaving streams
        for sid, job, _ in batch.decode:
            if sid in result.audio:
                shares[sid] = shares.get(sid, 0.0) + (job.end - job.start)
        for sid, new in result.phrases.items():
            if new is not None:
                a, b = new.plan[0]
                shares[sid] = (shares.get(sid, 0.0) + (b - a)
                               + _ACOUSTIC_COST_PER_FRAME * new.acoustic.num_frames)
        power = self.power_reader() if self.power_reader else None
        self.meter.record_batch(result.seconds, shares, power)

    def _start_phrase(self, stream: StreamState, new: _NewPhrase, space_before: str) -> None:
        """A phrase's latent exists: announce where it sits, then emit its first chunk (which
        starts at its frame `cut`, past a lead-in left out, or at 0)."""
        cut = new.plan[0][0]
        start = stream.emitted_frames - cut   # where the phrase's frame 0 would sit
        res = new.acoustic
        words = (word_times(new.phonemized.words, res.durations, start, self.frame_ms,
                            first_at=new.first_word_at) if stream.options.words else [])
        pid = self._announce(stream, new.text, new.plan[-1][1] - cut, words, space_before)
        stream.active = ActivePhrase(id=pid, z=res.z, plan=new.plan, next_chunk=1,
                                     unfinished=None if res.complete else res)
        stream.spoken_phrases += 1
        a, b = new.plan[0]
        self._emit_audio(stream, new.first_audio, b - a)

    def _unspoken_phrase(self, stream: StreamState, text: str, space_before: str) -> None:
        """A phrase with nothing to speak ("!!!", "---"): announced with no length where the
        timeline stands, so captions built from phrases still hold every character sent."""
        self._announce(stream, text, 0, [], space_before)

    def _announce(self, stream: StreamState, text: str, frames: int,
                  words: list[tuple[str, float, float]], space_before: str) -> int:
        """Send a `phrase` for the next `frames` of the timeline; returns its id."""
        pid, start = stream.next_phrase_id, stream.emitted_frames
        stream.next_phrase_id += 1
        stream.sink.on_phrase(PhraseEvent(
            id=pid, text=text, start_ms=start * self.frame_ms,   # the wire rounds (0.001 ms)
            end_ms=(start + frames) * self.frame_ms, words=words,
            space_before=space_before))
        self.meter.add_phrase(stream.id)
        return pid

    def _emit_audio(self, stream: StreamState, audio: np.ndarray, frames: int) -> None:
        now = time.monotonic()
        first = stream.anchor is None
        if first:
            stream.anchor = now
        elif stream.stalled:   # its player, stalled since, resumes with this audio
            stream.restart_clock(now, self.frame_ms)
        stream.stalled = stream.dry = False
        pts = stream.emitted_frames * self.frame_ms
        stream.emitted_frames += frames
        self._dirty.add(stream.id)
        self.meter.add_audio(stream.id, frames * self.frame_ms, now=now)
        stream.sink.on_audio(audio, pts)
        speech_ms = (stream.emitted_frames - stream.filled_frames) * self.frame_ms
        if speech_ms - stream.costed[0] >= _LIVE_COST_WINDOW_MS:
            self._cost_window(stream, self.meter.usage(stream.id))

    def _cost_window(self, stream: StreamState, usage: Mapping[str, Any]) -> None:
        """Count what `stream` cost since its last window (see _LIVE_COST_WINDOW_MS), over its
        audio less the silence sent while it waited for text: a captions feed's filler costs
        nothing, and windows of it would set the estimate for speech ~2-3x too low."""
        audio_ms, compute_ms = usage.get("audio_ms") or 0.0, usage.get("compute_ms")
        if compute_ms is None:
            return
        audio_ms -= stream.filled_frames * self.frame_ms
        costed_audio, costed_compute = stream.costed
        stream.costed = (audio_ms, compute_ms)
        self._add_cost(audio_ms - costed_audio, compute_ms - costed_compute)

    def _finish(self, stream: StreamState) -> None:
        usage = self.meter.close(stream.id) or {}   # every stream is opened in the meter
        self._forget(stream.id)
        self._cost_window(stream, usage)   # what it cost since its last window
        stream.sink.on_done(usage)
        log.debug("stream %s done: %s", stream.id, usage)
        self._ended("done", usage)

    def _add_cost(self, audio_ms: float, compute_ms: float | None) -> None:
        """A finished stream's cost. One of at least _MIN_COSTED_AUDIO_MS counts alone; shorter
        ones are pooled until their audio adds up to that, then count as one. A short stream
        alone is too noisy (a 0.3 s reply is mostly its first step), but left out, a server
        serving only short replies never corrects warm-up's probe: one warmed up while another
        process held the cores read 0.92 s per audio s and refused a second stream after
        nine short ones had shown the real cost. Short streams carry their first phrase's
        overhead over less audio, so the pooled cost errs high, i.e. towards refusing."""
        if compute_ms is None or audio_ms <= 0:
            return
        if audio_ms < _MIN_COSTED_AUDIO_MS:
            pooled_audio, pooled_compute = self._short_pool
            audio_ms, compute_ms = pooled_audio + audio_ms, pooled_compute + compute_ms
            if audio_ms < _MIN_COSTED_AUDIO_MS:
                self._short_pool = (audio_ms, compute_ms)
                return
            self._short_pool = (0.0, 0.0)
        cost = compute_ms / audio_ms
        now = time.monotonic()
        current = self._current_cost(now)
        self._stream_cost = cost if current is None else 0.8 * current + 0.2 * cost
        self._costed_at = now
        recent = self._recent_costs
        recent.append(cost)
        if len(recent) > _SETTLED_MIN:
            costs = list(recent)
            if max(costs[-_SETTLED_MIN:]) < _FASTER_FOR_GOOD * statistics.median(
                    costs[:-_SETTLED_MIN]):
                log.info("the last %d streams cost %.3f-%.3f s per audio s, all well under "
                         "those before: the cost estimate starts again from them",
                         _SETTLED_MIN, min(costs[-_SETTLED_MIN:]), max(costs[-_SETTLED_MIN:]))
                recent.clear()
                recent.extend(costs[-_SETTLED_MIN:])
        if len(recent) >= _SETTLED_MIN:
            self._settled_cost = statistics.median(recent)

    def _fail_streams(self, failed: dict[str, str]) -> None:
        for sid, error in failed.items():
            stream = self._streams.get(sid)
            if stream is not None:
                self._drop(sid, "failed")
                stream.sink.on_error("internal", f"synthesis failed: {error}")
