"""The scheduler driven by a made-up engine: ordering, batching, deadlines, cancellation.

The fake engine's audio encodes (phrase number, frame index) in every sample, so a test can
check that a stream's audio is complete, in order and never mixed with another stream's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
import torch

from streaming_tts.engine import AcousticResult, Engine, EngineConfig, SynthesisParams
from streaming_tts.metering import Meter
from streaming_tts.scheduler import (_COST_PROBE_PHRASES, Scheduler, SchedulerConfig, _NewPhrase,
                                      _first_word_onset, _trim_quiet_lead, measure_stream_cost)
from streaming_tts.stream import (IDLE_CONTEXT_S, ActivePhrase, PendingPhrase, PhraseEvent, StreamOptions,
                                  StreamState)
from streaming_tts.text.phonemes import PhonemizedText, WordSpan
from streaming_tts.text.splitter import ENGLISH_FUNCTION_WORDS, PhraseSplitter, SplitterConfig

HOP = 10
RATE = 1000           # one frame = 10 ms
FRAMES_PER_ID = 2     # every phoneme id lasts 20 ms


class FakeEngine:
    """Engine stand-in: z holds a phrase tag, audio = tag * 1000 + frame index per sample."""

    hop_length = HOP
    sample_rate = RATE
    context_frames = 0

    def __init__(self, schedule=(2, 4), delay_s: float = 0.0, fail: bool = False,
                 acoustic_delay_s: float = 0.0):
        self.config = EngineConfig(chunk_schedule=schedule)
        self.buckets = tuple(sorted(set(schedule)))
        self.delay_s = delay_s
        self.acoustic_delay_s = acoustic_delay_s
        self.fail = fail
        self.calls: list[tuple[str, int]] = []
        self.tags = 0
        self.thread_ids: set[int] = set()
        self.head_results = 0
        self.finished = 0
        self.poison_ids = -1            # acoustic fails for any phrase with this many ids
        self.read: list[list[int]] = []  # the ids of every phrase read, in order

    frame_ms = property(lambda self: 1000.0 * HOP / RATE)
    chunk_plan = Engine.chunk_plan
    schedule_index_for = Engine.schedule_index_for
    bucket = Engine.bucket

    def acoustic(self, jobs):
        self.thread_ids.add(threading.get_ident())
        if any(len(job.ids) == self.poison_ids for job in jobs):
            raise RuntimeError("poisoned phrase")
        if jobs:
            self.calls.append(("acoustic", len(jobs)))
            time.sleep(self.acoustic_delay_s)
        out = []
        for job in jobs:
            self.tags += 1
            self.read.append(list(job.ids))
            n = len(job.ids) * FRAMES_PER_ID
            z = torch.full((1, n), float(self.tags))
            durations = np.full(len(job.ids), FRAMES_PER_ID)
            if job.head_only and n > self.head_frames:
                # Like the real engine: only the head of z is usable until finish_flow.
                self.head_results += 1
                out.append(AcousticResult(z=z[:, :self.head_frames].clone(), durations=durations,
                                          num_frames=n, z_prior=z))
            else:
                out.append(AcousticResult(z=z, durations=durations, num_frames=n))
        return out

    @property
    def head_frames(self) -> int:
        return self.config.chunk_schedule[0]

    def finish_flow(self, res):
        self.finished += 1
        return AcousticResult(z=res.z_prior, durations=res.durations, num_frames=res.num_frames)

    def decode(self, jobs):
        self.thread_ids.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("boom")
        self.calls.append(("decode", len(jobs)))
        time.sleep(self.delay_s)
        for job in jobs:
            assert job.end <= job.z.shape[1], "decoded past the final part of a head-only latent"
        return [np.repeat(job.z[0, job.start:job.end].numpy() * 1000 + np.arange(job.start, job.end), HOP)
                .astype(np.float32) for job in jobs]


class FakePhonemizer:
    """One id per letter; words are whitespace tokens; nothing speakable -> ValueError."""

    def phonemize(self, text: str, *, normalize: bool = False) -> PhonemizedText:
        if not any(c.isalnum() for c in text):
            raise ValueError("empty text")
        ids, words = [1, 0], []
        for word in text.split():
            first = len(ids)
            for _ in word:
                ids += [5, 0]
            words.append(WordSpan(word, first, len(ids)))
        return PhonemizedText(phonemes=text, ids=ids + [2], words=words)

    def read_on(self, ph: PhonemizedText, more: PhonemizedText) -> PhonemizedText:
        """As Phonemizer.read_on: [... eos] + [space 3, pad] + more without [bos, pad]."""
        ids = [*ph.ids[:-1], 3, 0]
        return PhonemizedText(f"{ph.phonemes} {more.phonemes}", ids + more.ids[2:], ph.words,
                              read_on_from=len(ids), read_from=ph.read_from)

    def read_from(self, before: PhonemizedText, ph: PhonemizedText) -> PhonemizedText:
        """As Phonemizer.read_from: before's [... eos] + [space 3, pad] + ph without [bos, pad]."""
        ids, start = [*before.ids[:-1], 3, 0], len(before.ids) - 1
        words = [WordSpan(w.text, w.first_id + len(ids) - 2, w.end_id + len(ids) - 2)
                 for w in ph.words]
        words[0] = WordSpan(words[0].text, start, words[0].end_id)
        return PhonemizedText(f"{before.phonemes} {ph.phonemes}", ids + ph.ids[2:], words,
                              read_from=start)


@dataclass
class Sink:
    events: list = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    audio_at: list = field(default_factory=list)

    def on_phrase(self, phrase: PhraseEvent) -> None:
        self.events.append(("phrase", phrase))

    def on_audio(self, samples: np.ndarray, pts_ms: float) -> None:
        self.events.append(("audio", samples, pts_ms))
        self.audio_at.append(time.monotonic())

    def on_done(self, usage: dict) -> None:
        self.events.append(("done", usage))
        self.done.set()

    def on_cancelled(self, usage: dict | None) -> None:
        self.events.append(("cancelled", usage))
        self.done.set()

    def on_error(self, code: str, message: str) -> None:
        self.events.append(("error", code, message))
        self.done.set()

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def audio(self) -> list[tuple[np.ndarray, float]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "audio"]

    def phrases(self) -> list[PhraseEvent]:
        return [e[1] for e in self.events if e[0] == "phrase"]


OPTS = StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=50.0)
SLOW_FLUSH = StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=1000.0)  # text waits 1 s


def new_scheduler(engine: FakeEngine, *, initial_stream_cost: float | None = None,
                  **cfg) -> Scheduler:
    return Scheduler(engine, phonemizer=FakePhonemizer(), splitter_factory=PhraseSplitter,
                     meter=Meter(), config=SchedulerConfig(**cfg),
                     initial_stream_cost=initial_stream_cost)


async def running(engine: FakeEngine, **cfg):
    sched = new_scheduler(engine, **cfg)
    task = asyncio.create_task(sched.run())
    return sched, task


def planning_scheduler(engine: FakeEngine, names: list[str], **cfg) -> Scheduler:
    """A scheduler whose steps a test plans by hand (`_schedule`): 1000 frames/s measured, so
    a step of `target_step_ms` 100 has a budget of 100 frames; the named streams are open."""
    sched = new_scheduler(engine, target_step_ms=100.0, initial_frames_per_s=1000.0, **cfg)
    for name in names:
        sched.open(name, OPTS, Sink())
    sched._apply_commands()
    return sched


async def speak(sched: Scheduler, sid: str, sink: Sink, text: str, timeout: float = 5.0) -> None:
    """Open a stream, send all its text, end it and wait until it is done."""
    sched.open(sid, OPTS, sink)
    sched.text(sid, text)
    sched.end(sid)
    await asyncio.wait_for(sink.done.wait(), timeout)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def check_timeline(sink: Sink) -> None:
    """pts contiguous; every phrase's frames present once, in order; phrase times line up."""
    t = 0.0
    for samples, pts in sink.audio():
        assert pts == pytest.approx(t)
        t += len(samples) / RATE * 1000
    speech = np.concatenate([s for s, _ in sink.audio()])
    for ph in sink.phrases():
        if ph.start_ms == ph.end_ms:    # nothing to speak in it
            continue
        seg = speech[int(ph.start_ms * RATE / 1000):int(ph.end_ms * RATE / 1000)][::HOP]
        tag = seg[0] // 1000
        np.testing.assert_array_equal(seg, tag * 1000 + np.arange(len(seg)))
        for _, ws, we in ph.words if ph.words else []:
            assert ph.start_ms <= ws < we <= ph.end_ms


async def test_one_stream_speaks_all_text_in_order_then_done():
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s1", OPTS, sink)
    for tok in ["Hello the", "re world. ", "Second sen", "tence here. Third."]:
        sched.text("s1", tok)
    sched.end("s1")
    await asyncio.wait_for(sink.done.wait(), 5)
    await stop(task)
    assert sink.kinds()[-1] == "done"
    spoken = " ".join(p.text for p in sink.phrases())
    assert spoken.split() == "Hello there world. Second sentence here. Third.".split()
    check_timeline(sink)
    # The first phrase (nothing buffered yet) went out before its whole flow was computed.
    assert engine.head_results >= 1 and engine.finished == engine.head_results
    usage = sink.events[-1][1]
    assert usage["phrases"] == len(sink.phrases())
    assert usage["audio_ms"] == pytest.approx(sum(len(s) for s, _ in sink.audio()) / RATE * 1000, abs=1)
    assert usage["chars"] == len("Hello there world. Second sentence here. Third.")
    assert sched.stream_count == 0


class ThreadRecordingPhonemizer(FakePhonemizer):
    def __init__(self) -> None:
        self.thread_ids: set[int] = set()

    def phonemize(self, text: str, *, normalize: bool = False) -> PhonemizedText:
        self.thread_ids.add(threading.get_ident())
        return super().phonemize(text, normalize=normalize)


async def test_model_runs_in_one_worker_thread_and_phonemizing_in_another_off_the_loop():
    engine, phonemizer = FakeEngine(), ThreadRecordingPhonemizer()
    sched = Scheduler(engine, phonemizer=phonemizer, splitter_factory=PhraseSplitter, meter=Meter())
    task = asyncio.create_task(sched.run())
    sinks = [Sink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        sched.open(f"s{i}", OPTS, sink)
        sched.text(f"s{i}", "One two three. Four five.")
        sched.end(f"s{i}")
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks)), 5)
    await stop(task)
    assert all(s.kinds()[-1] == "done" for s in sinks)
    assert len(engine.thread_ids) == 1 and len(phonemizer.thread_ids) == 1
    loop_thread = {threading.get_ident()}
    assert engine.thread_ids.isdisjoint(loop_thread | phonemizer.thread_ids)
    assert phonemizer.thread_ids.isdisjoint(loop_thread)


def test_a_streams_next_phrase_is_phonemized_ahead_of_its_step():
    # Cut but not yet scheduled: the next phrase's phonemes are already being made, with no step
    # running; the one after it waits its turn (a long text cut at once must not queue ahead of
    # other streams' next phrases).
    sched = planning_scheduler(FakeEngine(), ["s"])
    sched.text("s", "Hello there. How are you? Next")
    sched._apply_commands()
    first, second = sched._streams["s"].phrases
    assert first.phonemized.result(timeout=5) == FakePhonemizer().phonemize("Hello there.")
    assert second.phonemized is None
    batch = sched._schedule(time.monotonic())
    assert [a[1] for a in batch.acoustic] == ["Hello there."]
    assert second.phonemized.result(timeout=5) == FakePhonemizer().phonemize("How are you?")


async def test_new_streams_are_batched_together():
    engine = FakeEngine()
    sched, task = await running(engine, initial_frames_per_s=1e6)
    sinks = [Sink() for _ in range(4)]
    for i, sink in enumerate(sinks):
        sched.open(f"s{i}", OPTS, sink)
        sched.text(f"s{i}", "Alpha beta gamma.")
        sched.end(f"s{i}")
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sinks)), 5)
    await stop(task)
    assert ("acoustic", 4) in engine.calls
    for sink in sinks:
        check_timeline(sink)


async def test_a_new_stream_goes_before_streams_that_have_audio_buffered():
    engine = FakeEngine(schedule=(4,), delay_s=0.01)
    # Budget of one chunk per step: each step serves exactly the most urgent stream.
    sched, task = await running(engine, target_step_ms=1.0, initial_frames_per_s=1.0)
    old = Sink()
    sched.open("old", OPTS, old)
    sched.text("old", "a b c d e f g h i j k l m n o p q r s t u v w x y z. " * 8)
    # Until its listener holds more than a newcomer's grace (400 ms; see StreamState.deadline)
    # the old stream is rightly the more urgent: wait for that, however slow this machine is.
    # It has more to say, and under the lookahead (1.5 s) it still wants model steps.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        state = sched._streams.get("old")
        if state is not None and state.buffered_ms(time.monotonic(), sched.frame_ms) > 800:
            break
        await asyncio.sleep(0.005)
    assert old.audio() and sched._streams["old"].has_work()
    new = Sink()
    sched.open("new", OPTS, new)
    sched.text("new", "Hi there.")
    sched.flush("new")
    t0 = time.monotonic()
    while not new.audio() and time.monotonic() - t0 < 2:
        await asyncio.sleep(0.005)
    await stop(task)
    assert new.audio(), "the new stream got no audio"
    # Old audio emitted between the new stream's arrival and its first audio: at most one step.
    assert sum(1 for t in old.audio_at if t0 <= t <= new.audio_at[0]) <= 1


async def test_lookahead_bounds_how_far_ahead_audio_is_computed():
    engine = FakeEngine(schedule=(2, 4))
    sched, task = await running(engine, lookahead_ms=200.0)
    sink = Sink()
    sched.open("s", OPTS, sink)
    sched.text("s", "word " * 200 + ". ")
    sched.end("s")
    await asyncio.sleep(0.5)
    await stop(task)
    first = sink.audio_at[0]
    for (samples, pts), at in zip(sink.audio(), sink.audio_at):
        ahead = pts - (at - first) * 1000
        assert ahead <= 200.0 + 40.0 + 1e-6   # lookahead + one chunk
    played = (time.monotonic() - first) * 1000
    end = sink.audio()[-1][1] + len(sink.audio()[-1][0]) / RATE * 1000
    assert end < played + 300


async def test_cancel_stops_audio_at_once_even_mid_step():
    engine = FakeEngine(delay_s=0.15)
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", OPTS, sink)
    sched.text("s", "This is a long sentence that keeps going. " * 5)
    while not sink.audio():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)      # a step is in flight now
    sched.cancel("s")
    await asyncio.wait_for(sink.done.wait(), 2)
    await asyncio.sleep(0.4)       # let the in-flight step finish
    await stop(task)
    assert sink.kinds()[-1] == "cancelled"
    assert sched.stream_count == 0 and "s" not in sched.meter


async def test_a_cancelled_stream_is_answered_with_its_usage_the_step_in_flight_included():
    # The cancel lands while a step that serves the stream runs: that step's time is the
    # stream's (not the neighbours'), and `cancelled` reports it with the rest.
    engine = FakeEngine(delay_s=0.15)
    sched, task = await running(engine)
    sink = Sink()
    text = "This is a long sentence that keeps going. " * 5
    sched.open("s", OPTS, sink)
    sched.text("s", text)
    while not sink.audio():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)      # a step is in flight now
    sched.cancel("s")
    await asyncio.wait_for(sink.done.wait(), 2)
    await stop(task)
    kind, usage = sink.events[-1]
    assert kind == "cancelled"
    # One stream: every step's time is its own, the last one's too.
    assert usage["compute_ms"] == pytest.approx(sched.meter.totals().compute_s * 1000, abs=0.1)
    assert usage["compute_ms"] >= 150 * sched.meter.totals().batches * 0.9
    assert usage["chars"] == len(text) and usage["phrases"] >= 1
    heard = sum(len(samples) for samples, _ in sink.audio()) / RATE * 1000
    assert usage["audio_ms"] == pytest.approx(heard, abs=1)


async def spoken(engine: FakeEngine, parts: list[str], **cfg) -> Sink:
    """One stream's sink once done: `parts` sent in turn, each flushed (a phrase of its own,
    however it ends), then `end`, on a scheduler of its own with `cfg`."""
    sched, task = await running(engine, **cfg)
    sink = Sink()
    sched.open("s", OPTS, sink)
    for part in parts:
        sched.text("s", part)
        sched.flush("s")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 5)
    await stop(task)
    return sink


class SoundBeforeTheWordEngine(FakeEngine):
    """Each phrase is quiet (below -50 dBFS) before frame `sound_from`, as a real voice's
    lead-in is (the fake voice's first word starts at frame 4, after [bos, pad]); a sound from
    before frame 4 is a word that opens before its durations say (an "s", a "Th"). Quiet
    frames keep their tag and frame number, scaled by QUIET (`frame_numbers` reads them)."""

    def __init__(self, sound_from: int, **kw) -> None:
        super().__init__(**kw)
        self.sound_from = sound_from

    def decode(self, jobs):
        out = super().decode(jobs)
        for job, audio in zip(jobs, out):
            quiet = max(0, min(self.sound_from, job.end) - job.start)
            audio[: quiet * HOP] *= QUIET
        return out


QUIET = 1e-8


def frame_numbers(speech: np.ndarray) -> np.ndarray:
    """Each sample's phrase frame number, quiet (SoundBeforeTheWordEngine) or not."""
    loud = np.abs(speech) >= 1
    return np.rint(np.where(loud, speech, speech / QUIET)).astype(np.int64) % 1000


async def test_a_streams_first_audio_leaves_out_the_voices_lead_in_and_the_times_follow():
    # The fake voice's lead-in: ids [bos, pad] before the first word, 2 frames each: 40 ms,
    # quiet. Keeping 10 ms of it, the first chunk starts at frame 3 of the first phrase; the
    # first word sits 10 ms into the audio, and the phrase's end moves 30 ms earlier with it.
    sink = await spoken(SoundBeforeTheWordEngine(4, schedule=(8, 16)),
                        ["Hello there. Second one here."], lead_in_ms=10.0)
    first, second = sink.phrases()[:2]
    speech = frame_numbers(np.concatenate([samples for samples, _ in sink.audio()])[::HOP])
    assert speech[0] == 3                              # frame 3 of the first phrase
    assert first.start_ms == 0 and first.words[0][1] == pytest.approx(10.0)
    n_first = int(first.end_ms / 10)
    np.testing.assert_array_equal(speech[:n_first], np.arange(3, 3 + n_first))
    # The next phrase is whole (its lead-in is the pause between sentences).
    assert second.start_ms == first.end_ms
    assert speech[n_first] == 0 and second.words[0][1] == pytest.approx(first.end_ms + 40)
    t = 0.0
    for samples, pts in sink.audio():   # the timeline runs on without a gap
        assert pts == pytest.approx(t)
        t += len(samples) / RATE * 1000
    usage = sink.events[-1][1]
    assert usage["audio_ms"] == pytest.approx(t)


@pytest.mark.parametrize("sound_from, first_frame", [(2, 1), (4, 3), (0, 0)])
async def test_a_lead_in_cut_keeps_sound_that_opens_before_the_word(sound_from, first_frame):
    # Keeping 10 ms (1 frame) of the 40 ms lead-in, the durations cut at frame 3. Looking 30 ms
    # (3 frames) sooner, the cut keeps 1 quiet frame before the first with sound: a sound from
    # frame 2 starts the audio at frame 1; one from the word's own frame 4, at 3 as before; one
    # from frame 0 (nothing quiet), at 0. The first word starts where its sound does, looked
    # for in the pad before it (frames 2-3): at frame 2, 4 and 2.
    sink = await spoken(SoundBeforeTheWordEngine(sound_from, schedule=(8, 16)),
                        ["Hello there. Second one here."], lead_in_ms=10.0, lead_in_search_ms=30.0)
    first = sink.phrases()[0]
    samples = np.concatenate([samples for samples, _ in sink.audio()])
    loud = np.abs(samples[::HOP]) >= 1
    speech = frame_numbers(samples[::HOP])
    word_from = max(sound_from, 2)
    assert first.start_ms == 0 and first.words[0][1] == pytest.approx((word_from - first_frame) * 10.0)
    n_first = int(first.end_ms / 10)
    np.testing.assert_array_equal(speech[:n_first], np.arange(first_frame, first_frame + n_first))
    sounding = speech[:n_first][loud[:n_first]]
    assert sounding[0] == max(sound_from, first_frame)   # nothing with sound is left out
    np.testing.assert_array_equal(sounding, np.arange(sounding[0], first_frame + n_first))
    assert np.count_nonzero(~loud[:n_first]) == max(0, sound_from - first_frame)
    assert sink.events[-1][1]["audio_ms"] == pytest.approx(len(samples) / RATE * 1000)


def test_a_quiet_lead_is_trimmed_to_what_it_keeps_and_never_to_nothing():
    hop = 4
    res = AcousticResult(z=torch.zeros(1, 12), durations=np.full(6, 2), num_frames=12)

    def phrase(quiet: int, plan: list[tuple[int, int]]) -> _NewPhrase:
        audio = np.ones((plan[0][1] - plan[0][0]) * hop, dtype=np.float32)
        audio[: quiet * hop] = 0.0
        return _NewPhrase("x", PhonemizedText("x", [0] * 6, []), res, plan, audio)

    # 4 frames searched before the durations' cut at 4, keeping 1: quiet frames 0-2, sound
    # from frame 3: starts at frame 2.
    cut = _trim_quiet_lead(phrase(3, [(0, 8), (8, 12)]), 4, 1, hop)
    assert cut.plan == [(2, 8), (8, 12)] and len(cut.first_audio) == 6 * hop
    # All quiet: at most the frames searched.
    assert _trim_quiet_lead(phrase(8, [(0, 8)]), 4, 1, hop).plan == [(4, 8)]
    # A first chunk shorter than that keeps its last frame.
    short = _trim_quiet_lead(phrase(2, [(0, 2)]), 4, 0, hop)
    assert short.plan == [(1, 2)] and len(short.first_audio) == hop


def test_a_phrases_first_word_starts_where_its_sound_opens_in_the_pad_before_it():
    hop = 4
    # ids [bos, pad, w, pad, w, pad], 2 frames each: the first word's pad is frames 2-3, and
    # its durations start it at frame 4.
    res = AcousticResult(z=torch.zeros(1, 12), durations=np.full(6, 2), num_frames=12)
    words = [WordSpan("a", 2, 4), WordSpan("b", 4, 6)]

    def onset(sound_from: int, plan: list[tuple[int, int]], spans=words) -> int | None:
        a, b = plan[0]
        audio = np.ones((b - a) * hop, dtype=np.float32)
        audio[: max(0, sound_from - a) * hop] = 1e-4             # -80 dBFS
        new = _NewPhrase("a b", PhonemizedText("ab", [0] * 6, spans), res, plan, audio)
        return _first_word_onset(new, hop).first_word_at

    assert onset(3, [(0, 8), (8, 12)]) == 3       # sounding in its pad: from there
    assert onset(0, [(0, 8)]) == 2                # sounding before it: from the pad's start
    assert onset(4, [(0, 8)]) is None             # from the word's own frame: as the durations
    assert onset(6, [(0, 8)]) is None             # later than that: as the durations
    assert onset(0, [(3, 8)]) == 3                # a lead-in cut: from the first frame sent
    assert onset(0, [(0, 2), (2, 12)]) is None    # the pad is not in the first chunk
    assert onset(0, [(0, 8)], spans=[]) is None   # no word


async def test_a_cut_inside_a_clause_leaves_out_the_voices_pause_at_either_side():
    # The fake voice ends a phrase with [pad after the last word, eos] and starts one with
    # [bos, pad]: 2 frames (20 ms) after the last word's end, 4 (40 ms) before the first word.
    # "Hello there" ends in no mark: its end keeps 10 ms past its last word, and the phrase
    # after it starts 10 ms before its first word. "Second one here." ends a sentence: its
    # pause and the next phrase's lead-in stay whole.
    sink = await spoken(SoundBeforeTheWordEngine(4, schedule=(8, 16)),
                        ["Hello there", " Second one here.", " Third."], join_keep_ms=10.0)
    first, second, third = sink.phrases()
    assert first.end_ms == pytest.approx(first.words[-1][2] + 10)
    assert second.start_ms == first.end_ms
    assert second.words[0][1] == pytest.approx(second.start_ms + 10)
    assert second.end_ms == pytest.approx(second.words[-1][2] + 20)
    assert third.words[0][1] == pytest.approx(third.start_ms + 40)
    speech = frame_numbers(np.concatenate([samples for samples, _ in sink.audio()])[::HOP])
    n_first, n_second = int(first.end_ms / 10), int((second.end_ms - second.start_ms) / 10)
    np.testing.assert_array_equal(speech[:n_first], np.arange(n_first))
    # The second phrase's audio starts at its frame 3, past 3 of its 4 lead-in frames.
    np.testing.assert_array_equal(speech[n_first:n_first + n_second], np.arange(3, 3 + n_second))
    assert speech[n_first + n_second] == 0
    t = 0.0
    for samples, pts in sink.audio():   # the timeline runs on without a gap
        assert pts == pytest.approx(t)
        t += len(samples) / RATE * 1000
    assert t == pytest.approx(third.end_ms)
    assert sink.events[-1][1]["audio_ms"] == pytest.approx(t)


async def test_a_phrase_cut_inside_a_clause_is_read_on_into_a_word_never_heard():
    # "Hello there" is cut for time (no mark): read on into "could", and its audio ends with
    # its last word (and the pad after it); the space and "could" after are never heard. "Second one
    # here." ends in a mark, and " Third" is the stream's last phrase: both read as they are.
    engine = SoundBeforeTheWordEngine(4, schedule=(8, 16))
    sink = await spoken(engine, ["Hello there", " Second one here.", " Third"],
                        read_on_word="could")
    first, second, third = sink.phrases()
    hello = FakePhonemizer().phonemize("Hello there")
    could = FakePhonemizer().phonemize("could")
    assert engine.read[0] == hello.ids[:-1] + [3, 0] + could.ids[2:]
    assert engine.read[1:] == [FakePhonemizer().phonemize(t).ids for t in ("Second one here.", "Third")]
    assert [w for w, _, _ in first.words] == ["Hello", "there"]
    # Its audio: every frame up to its last word's end (the word's own pad included).
    assert first.words[-1][2] == pytest.approx(len(hello.ids[:-1]) * FRAMES_PER_ID * 10)
    assert first.end_ms == pytest.approx(first.words[-1][2])
    assert second.start_ms == first.end_ms
    speech = frame_numbers(np.concatenate([samples for samples, _ in sink.audio()])[::HOP])
    n_first = int(first.end_ms / 10)
    np.testing.assert_array_equal(speech[:n_first], np.arange(n_first))
    assert speech[n_first] == 0                         # then the next phrase, from its frame 0
    assert third.end_ms - third.words[-1][2] == pytest.approx(2 * 10)   # its eos: read as it is


@pytest.mark.parametrize("join_keep_ms", [-1.0, 10.0, 100.0])
async def test_a_read_on_phrase_keeps_nothing_after_its_last_word(join_keep_ms):
    # What follows its last word is the approach to the word read on into, not silence.
    engine = FakeEngine(schedule=(8, 16))
    sink = await spoken(engine, ["Hello there", " Second one here."], read_on_word="could",
                        join_keep_ms=join_keep_ms)
    first, second = sink.phrases()
    assert len(engine.read[0]) > len(FakePhonemizer().phonemize("Hello there").ids)
    assert first.end_ms == pytest.approx(first.words[-1][2]) == second.start_ms


async def test_the_phrase_after_a_cut_inside_a_clause_is_read_from_the_word_before_it():
    # "Hello there" is cut for time: read on into "could", and "second one here." is read from
    # "there" (never heard): its audio starts at the space before "second", faded in over 5 ms,
    # where "there" ends in that reading; its first word's time starts there.
    engine = SoundBeforeTheWordEngine(4, schedule=(8, 16))
    sink = await spoken(engine, ["Hello there", " second one here."], read_on_word="could",
                        read_from=True)
    first, second = sink.phrases()
    fake = FakePhonemizer()
    there, rest = fake.phonemize("there"), fake.phonemize("second one here.")
    assert engine.read[1] == there.ids[:-1] + [3, 0] + rest.ids[2:]
    assert [w for w, _, _ in second.words] == ["second", "one", "here."]
    assert first.end_ms == pytest.approx(first.words[-1][2]) == second.start_ms
    assert second.words[0][1] == pytest.approx(second.start_ms)
    assert second.words[0][2] - second.words[0][1] == pytest.approx((2 + 2 * 6) * FRAMES_PER_ID * 10)
    samples = np.concatenate([samples for samples, _ in sink.audio()])
    at = int(second.start_ms * RATE / 1000)
    speech = frame_numbers(samples[HOP - 1::HOP])    # each frame's last sample: none faded
    start = (len(there.ids) - 1) * FRAMES_PER_ID      # the frame of the space before "second"
    n_second = int((second.end_ms - second.start_ms) / 10)
    np.testing.assert_array_equal(speech[at // HOP: at // HOP + n_second],
                                  np.arange(start, start + n_second))
    tag = np.rint(samples[at + HOP - 1] - start)       # that phrase's tag * 1000
    np.testing.assert_allclose(samples[at: at + 6], (tag + start) * np.array(
        [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]), rtol=1e-6)
    assert sink.events[-1][1]["audio_ms"] == pytest.approx(len(samples) / RATE * 1000)


async def test_without_a_word_before_it_to_read_from_a_phrase_is_cut_as_before():
    # The stream's first phrase, and a phrase after a full stop: no word before them is read.
    engine = SoundBeforeTheWordEngine(4, schedule=(8, 16))
    await spoken(engine, ["Hello there.", " Second one here."], read_on_word="could",
                 read_from=True)
    fake = FakePhonemizer()
    assert engine.read == [fake.phonemize("Hello there.").ids, fake.phonemize("Second one here.").ids]


async def test_a_listener_near_dry_gets_the_head_only_flow_not_a_reading_from_the_word_before():
    # Every listener counts as near dry: the phrase after the cut is read alone, its flow
    # head-only (a reading from the word before it would need the whole flow first).
    engine = SoundBeforeTheWordEngine(4, schedule=(8, 16))
    sink = await spoken(engine, ["Hello there", " second one here."], read_on_word="could",
                        read_from=True, head_only_below_ms=1e9, lead_in_ms=10.0, join_keep_ms=10.0)
    fake = FakePhonemizer()
    assert engine.read[1] == fake.phonemize("second one here.").ids
    assert engine.head_results == 2
    second = sink.phrases()[1]
    assert second.words[0][1] - second.start_ms == pytest.approx(10.0)   # join_keep_ms


@pytest.mark.parametrize("parts, read_on", [
    (["Buy milk\n", "- Call mom."], False),      # a line break after it: a list's item
    (["Buy milk", "\n\nCall mom."], False),     # ... in the next phrase's leading space
    (["Buy milk ", "call mom."], True),           # a space only: cut inside a clause
])
async def test_a_phrase_ending_a_line_keeps_its_pause_and_is_read_as_it_is(parts, read_on):
    engine = SoundBeforeTheWordEngine(4, schedule=(8, 16))
    sink = await spoken(engine, parts, read_on_word="could", join_keep_ms=10.0)
    first, second = sink.phrases()
    alone = FakePhonemizer().phonemize("Buy milk").ids
    assert (engine.read[0] != alone) is read_on
    if read_on:
        assert first.end_ms == pytest.approx(first.words[-1][2])
        assert second.words[0][1] - second.start_ms == pytest.approx(10.0)
    else:   # the voice's own pause at either side: its pad and eos, then [bos, pad]
        assert first.end_ms - first.words[-1][2] == pytest.approx(20.0)
        assert second.words[0][1] - second.start_ms == pytest.approx(40.0)


async def gone_and_stays(engine: FakeEngine, gone_text: str, stays_text: str):
    """A running scheduler with two streams speaking: "gone" (to be cancelled) and "stays"."""
    sched, task = await running(engine)
    gone, stays = Sink(), Sink()
    sched.open("gone", OPTS, gone)
    sched.open("stays", OPTS, stays)
    sched.text("gone", gone_text)
    sched.text("stays", stays_text)
    return sched, task, gone, stays


async def test_a_stream_cancelled_during_the_acoustic_stage_is_not_decoded():
    engine = FakeEngine(acoustic_delay_s=0.2)
    sched, task, gone, stays = await gone_and_stays(engine, "Hello there.", "Hello you.")
    while ("acoustic", 2) not in engine.calls:   # both phrases are in the model now
        await asyncio.sleep(0.005)
    sched.cancel("gone")
    await asyncio.wait_for(gone.done.wait(), 2)
    while not stays.audio():
        await asyncio.sleep(0.005)
    await stop(task)
    assert engine.calls[:2] == [("acoustic", 2), ("decode", 1)]   # only the one that stays
    usage = gone.events[-1][1]
    assert gone.kinds() == ["cancelled"] and usage["audio_ms"] == 0 and usage["phrases"] == 0
    assert usage["compute_ms"] > 0   # its acoustic stage ran: its share of the step is its own
    billed = usage["compute_ms"] + sched.meter.usage("stays")["compute_ms"]
    assert billed == pytest.approx(sched.meter.totals().compute_s * 1000, abs=0.2)


async def test_a_neighbour_does_not_pay_for_a_stream_cancelled_in_mid_step():
    engine = FakeEngine(delay_s=0.1)
    sched, task, gone, stays = await gone_and_stays(
        engine, "This is a long sentence that keeps going. " * 5,
        "Another long sentence that keeps on going. " * 5)
    while not (gone.audio() and stays.audio()):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.03)      # a step (100 ms) serving both is in flight now
    billed = sched.meter.usage("gone")["compute_ms"]
    sched.cancel("gone")
    await asyncio.wait_for(gone.done.wait(), 2)
    sched.cancel("stays")
    await asyncio.wait_for(stays.done.wait(), 2)
    await stop(task)
    assert gone.events[-1][1]["compute_ms"] > billed + 20   # its share of that step
    spent = gone.events[-1][1]["compute_ms"] + stays.events[-1][1]["compute_ms"]
    assert spent == pytest.approx(sched.meter.totals().compute_s * 1000, abs=0.2)


async def test_a_cancel_followed_by_a_close_before_either_is_applied_emits_nothing():
    # `close` means nothing more reaches the sink, even the answer to a `cancel` queued just
    # before it (both are applied at the next step). The server's sessions never queue both
    # for one stream; the scheduler's contract holds anyway (found by test_scheduler_fuzz.py).
    engine = FakeEngine(delay_s=0.05)
    sched, task = await running(engine)
    sink, other = Sink(), Sink()
    sched.open("s", OPTS, sink)
    sched.open("t", OPTS, other)
    sched.text("s", "Some words here. More words there.")
    while not sink.audio():
        await asyncio.sleep(0.01)
    n = len(sink.events)
    sched.cancel("s")
    sched.cancel("t")
    sched.close("s")
    await asyncio.wait_for(other.done.wait(), 2)   # applied: t's cancel is answered
    await asyncio.sleep(0.1)
    await stop(task)
    assert len(sink.events) == n and other.kinds() == ["cancelled"]
    assert sched.stream_count == 0 and not sched._closing and not sched._leaving


async def test_close_forgets_the_stream_and_emits_nothing_more():
    engine = FakeEngine(delay_s=0.05)
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", OPTS, sink)
    sched.text("s", "Some words here. More words there. " * 5)
    while not sink.audio():
        await asyncio.sleep(0.01)
    sched.close("s")
    await asyncio.sleep(0.01)
    n = len(sink.events)
    await asyncio.sleep(0.3)
    await stop(task)
    assert len(sink.events) == n
    assert sched.stream_count == 0 and "s" not in sched.meter


async def test_buffered_text_is_spoken_after_max_buffer_delay():
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=150.0), sink)
    sched.text("s", "no sentence end yet")
    await asyncio.sleep(0.08)
    assert not sink.phrases()
    await asyncio.sleep(0.2)
    await stop(task)
    assert [p.text for p in sink.phrases()] == ["no sentence end yet"]


async def test_flush_speaks_now_and_unspeakable_text_is_announced_with_no_length():
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=10_000), sink)
    sched.text("s", "half a sente")
    sched.flush("s")
    sched.text("s", " ... !!! ")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 3)
    await stop(task)
    spoken, *unspoken = sink.phrases()
    assert [(p.space_before, p.text) for p in sink.phrases()] == [("", "half a sente"), (" ", "..."),
                                                                 (" ", "!!!")]
    # Nothing to speak: no audio, no words, placed where the timeline stands.
    for k, p in enumerate(unspoken, 1):
        assert p.start_ms == p.end_ms == spoken.end_ms and p.words == [] and p.id == spoken.id + k
    assert sink.kinds()[-1] == "done" and sink.events[-1][1]["phrases"] == 3
    check_timeline(sink)


async def test_phrases_and_the_space_before_each_give_the_text_back():
    # Captions built from phrases: every character sent, with its spacing, even where a flush
    # split a word and where a phrase had nothing to speak.
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=10_000), sink)
    text = ["  Hello there.", " !!!\n\n", "- a list item.", "\tHalf a wo"]
    for piece in text:
        sched.text("s", piece)
    sched.flush("s")
    sched.text("s", "rd and the end.  ")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 3)
    await stop(task)
    rebuilt = "".join(p.space_before + p.text for p in sink.phrases())
    assert rebuilt == ("".join(text) + "rd and the end.  ").rstrip()
    assert any(p.space_before == "" and p.text.startswith("rd") for p in sink.phrases())
    check_timeline(sink)


async def test_whitespace_before_a_flush_goes_before_the_next_phrase():
    # "Hello " + flush + "world": the flush cuts after the space, and the captions read
    # "Hello world", not "Helloworld" (found by tests/test_scheduler_fuzz.py). Whitespace
    # flushed on its own waits for the next phrase too.
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=10_000), sink)
    for piece in ["Hello ", None, " \n", None, "world. ", None]:
        if piece is None:
            sched.flush("s")
        else:
            sched.text("s", piece)
    sched.text("s", "Bye.")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 3)
    await stop(task)
    assert [(p.space_before, p.text) for p in sink.phrases()] == [
        ("", "Hello"), ("  \n", "world."), (" ", "Bye.")]


async def test_engine_failure_errors_its_streams_and_the_scheduler_survives(caplog):
    caplog.set_level(logging.INFO, logger="streaming_tts.scheduler")
    engine = FakeEngine(fail=True)
    sched, task = await running(engine)
    bad = Sink()
    sched.open("bad", OPTS, bad)
    sched.text("bad", "Hello. ")
    await asyncio.wait_for(bad.done.wait(), 3)
    assert bad.events[-1][:2] == ("error", "internal")
    assert any(m.startswith("usage of stream bad, failed: chars=7, ") for m in caplog.messages)
    engine.fail = False
    good = Sink()
    await speak(sched, "good", good, "Still alive. ", timeout=3)
    await stop(task)
    assert good.kinds()[-1] == "done"


async def test_streams_share_capacity_fairly():
    engine = FakeEngine(schedule=(4,), delay_s=0.005)
    sched, task = await running(engine, target_step_ms=1.0, initial_frames_per_s=1.0, lookahead_ms=10_000,
                                new_stream_grace_ms=0.0)
    sinks = [Sink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        sched.open(f"s{i}", OPTS, sink)
        sched.text(f"s{i}", "word " * 100 + ". ")
    await asyncio.sleep(0.4)
    await stop(task)
    emitted = [sum(len(s) for s, _ in sink.audio()) for sink in sinks]
    assert min(emitted) > 0
    assert max(emitted) - min(emitted) <= 2 * 4 * HOP   # within two chunks of each other


async def test_silence_keeps_the_listener_fed_while_text_is_pending():
    engine = FakeEngine()
    sched, task = await running(engine, silence_fill_ms=50.0)
    sink = Sink()
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=400.0), sink)
    sched.text("s", "Hi. ")
    sched.flush("s")
    await asyncio.sleep(0.05)
    sched.text("s", "and then")       # pending, no sentence end: wait up to 400 ms
    await asyncio.sleep(0.6)
    await stop(task)
    check_timeline(sink)
    silent = [s for s, _ in sink.audio() if not s.any()]
    assert silent, "no silence was sent while text was pending"
    # The timeline kept pace with the wall clock: no gap a player would hear as an underrun.
    end = sink.audio()[-1][1] + len(sink.audio()[-1][0]) / RATE * 1000
    assert end >= (sink.audio_at[-1] - sink.audio_at[0]) * 1000 - 60


async def test_a_failing_stream_does_not_take_its_batch_neighbours_down():
    engine = FakeEngine()
    poison = "Zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz."
    engine.poison_ids = len(FakePhonemizer().phonemize(poison).ids)
    sched, task = await running(engine, initial_frames_per_s=1e6)   # both in one step
    bad, good = Sink(), Sink()
    sched.open("bad", OPTS, bad)
    sched.open("good", OPTS, good)
    sched.text("bad", poison)
    sched.text("good", "Fine words here.")
    sched.end("bad")
    sched.end("good")
    await asyncio.wait_for(asyncio.gather(bad.done.wait(), good.done.wait()), 5)
    await stop(task)
    assert bad.events[-1][:2] == ("error", "internal")
    assert good.kinds()[-1] == "done" and good.audio()
    check_timeline(good)


async def test_text_arriving_before_first_audio_does_not_pile_up_short_phrases():
    # Eager (short) phrases are for a listener with little speech coming. Words that arrive
    # while the first phrase is still being made must not be cut into more short phrases:
    # the first phrase already covers that wait (slow engine: no audio for a while).
    engine = FakeEngine(schedule=(4, 400), delay_s=0.2)
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", OPTS, sink)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi.".split()
    for w in words:
        sched.text("s", w + " ")
        await asyncio.sleep(0.01)
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 10)
    await stop(task)
    phrases = [p.text for p in sink.phrases()]
    # The default splitter cuts the first phrase after at most 6 words; the rest is one sentence.
    assert phrases == [" ".join(words[:6]), " ".join(words[6:])]
    check_timeline(sink)


async def test_a_listener_with_audio_buffered_gets_bigger_first_chunks():
    engine = FakeEngine(schedule=(2, 4, 8))
    sched, task = await running(engine, head_only_below_ms=50.0)
    sink = Sink()
    await speak(sched, "s", sink, "Hello there. Defghij klmnop.")
    await stop(task)
    phrases = sink.phrases()
    assert len(phrases) == 2
    sizes = {ph.id: [] for ph in phrases}
    for samples, pts in sink.audio():
        ph = next(p for p in phrases if p.start_ms <= pts < p.end_ms)
        sizes[ph.id].append(len(samples) // HOP)
    # Nothing buffered: the plan starts small. ~500 ms buffered when the second phrase starts:
    # its first chunk is the largest scheduled size that fits in that (8 frames = 80 ms).
    assert sizes[phrases[0].id][:3] == [2, 4, 8]
    assert sizes[phrases[1].id][0] == 8
    check_timeline(sink)


async def test_capacity_comes_from_what_finished_streams_cost():
    # Each decode takes 20 ms of "compute"; capacity is audio seconds per compute second of
    # whole streams, once one has finished (before: an estimate from the steps).
    engine = FakeEngine(schedule=(8, 64), delay_s=0.02)
    sched, task = await running(engine)
    assert sched.load().capacity_audio_s_per_s > 0
    sink = Sink()
    await speak(sched, "s", sink, "abcdefghij " * 12 + ".", timeout=10)
    await stop(task)
    usage = sink.events[-1][1]
    assert usage["audio_ms"] >= 2000
    load = sched.load(extra_streams=1)
    assert load.active_streams == 1 and load.demand_audio_s_per_s == 1.0
    assert load.capacity_audio_s_per_s == pytest.approx(usage["audio_ms"] / usage["compute_ms"], rel=0.01)


def test_warm_up_stream_cost_is_the_capacity_until_a_stream_has_finished():
    # Only decode "computes" here (20 ms a call): the measured cost is the decode calls' time
    # over the audio made, and the first phrase is split like a newcomer's (head, then the rest).
    engine = FakeEngine(schedule=(8, 64), delay_s=0.02)
    cost = measure_stream_cost(engine, FakePhonemizer())
    assert engine.head_results == 1 and engine.finished == 1
    decodes = sum(1 for kind, _ in engine.calls if kind == "decode")
    phonemizer = FakePhonemizer()
    ids = sum(len(phonemizer.phonemize(p).ids) for p in _COST_PROBE_PHRASES)
    audio_s = ids * FRAMES_PER_ID * HOP / RATE
    assert decodes * 0.02 / audio_s <= cost < decodes * 0.04 / audio_s
    sched = new_scheduler(engine, initial_stream_cost=cost)
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1.0 / cost)


def test_warm_up_cost_measured_in_a_batch_shares_each_calls_time_out():
    # Each model call costs the same whatever its batch (a GPU's launch-bound calls): four
    # streams measured together cost a quarter each, and every call carried all four.
    alone = measure_stream_cost(FakeEngine(schedule=(8, 64), delay_s=0.02), FakePhonemizer())
    engine = FakeEngine(schedule=(8, 64), delay_s=0.02)
    together = measure_stream_cost(engine, FakePhonemizer(), streams=4)
    assert together == pytest.approx(alone / 4, rel=0.3)
    assert {batch for _, batch in engine.calls} == {4}
    assert engine.head_results == 4 and engine.finished == 4
    with pytest.raises(ValueError, match="streams must be >= 1"):
        measure_stream_cost(engine, FakePhonemizer(), streams=0)


def test_warm_up_cost_probe_hands_each_copys_audio_over_in_order():
    # The server encodes what the probe decodes, as it would a stream's: every chunk of every
    # copy, in the order of the copy's timeline, from the calling thread.
    engine = FakeEngine(schedule=(8, 64))
    got: dict[int, list[np.ndarray]] = {}
    threads = set()

    def on_audio(copy: int, samples: np.ndarray) -> None:
        threads.add(threading.get_ident())
        got.setdefault(copy, []).append(samples)

    measure_stream_cost(engine, FakePhonemizer(), streams=3, on_audio=on_audio)
    assert sorted(got) == [0, 1, 2] and threads == {threading.get_ident()}
    ids = [len(FakePhonemizer().phonemize(p).ids) for p in _COST_PROBE_PHRASES]
    for chunks in got.values():
        # The fake's samples carry the frame index: each phrase's frames 0..n-1, in order.
        frames = np.concatenate(chunks)[::HOP] % 1000
        expected = np.concatenate([np.arange(n * FRAMES_PER_ID) for n in ids])
        assert np.array_equal(frames, expected)


async def test_streams_starting_together_get_longer_first_chunks():
    # A lone newcomer gets the smallest first chunk (fastest first audio). Newcomers that
    # arrive together get the next size: each one's runway must cover the others' first steps.
    engine = FakeEngine(schedule=(2, 8, 16))
    sched, task = await running(engine)
    sinks = {sid: Sink() for sid in ("lone", "a", "b", "c")}
    await speak(sched, "lone", sinks["lone"], "Hello there.")
    for sid in ("a", "b", "c"):
        sched.open(sid, OPTS, sinks[sid])
        sched.text(sid, "Hello there.")
        sched.end(sid)
    await asyncio.wait_for(asyncio.gather(*(sinks[s].done.wait() for s in "abc")), 5)
    await stop(task)
    first_chunk = {sid: len(sink.audio()[0][0]) // HOP for sid, sink in sinks.items()}
    assert first_chunk == {"lone": 2, "a": 8, "b": 8, "c": 8}
    for sink in sinks.values():
        check_timeline(sink)


def test_an_overdue_newcomer_yields_to_a_listener_due_within_a_step():
    from streaming_tts.stream import StreamState
    now = 100.0
    waiting = StreamState(id="new", options=OPTS, sink=Sink(), splitter=PhraseSplitter(),
                          first_text_at=now - 2.0)             # waiting 2 s: long overdue
    playing = StreamState(id="old", options=OPTS, sink=Sink(), splitter=PhraseSplitter(),
                          anchor=now - 1.0, emitted_frames=105)  # 1.05 s made: dry in 50 ms
    relaxed = StreamState(id="ok", options=OPTS, sink=Sink(), splitter=PhraseSplitter(),
                          anchor=now - 1.0, emitted_frames=200)  # dry in 1 s
    key = {s.id: s.deadline(10.0, now=now, new_grace_s=0.4, step_s=0.12) for s in (waiting, playing, relaxed)}
    assert key["old"] < key["new"] < key["ok"]


async def test_a_step_carrying_first_audio_takes_no_work_that_is_not_due():
    # Budget: 100 frames per step. The old listener holds 0.9 s: its next chunk is not due
    # within the next step (100 ms), so it waits rather than delay the newcomer's first audio.
    engine = FakeEngine(schedule=(4,))
    sched = planning_scheduler(engine, ["old", "new"], newcomer_step_ms=1.0)
    now = time.monotonic()
    old, new = sched._streams["old"], sched._streams["new"]
    z = torch.zeros(1, 400)
    old.active = ActivePhrase(id=0, z=z, plan=engine.chunk_plan(400), next_chunk=25)
    old.anchor, old.emitted_frames = now - 0.1, 100          # 1 s made, 0.1 s played
    new.queue_phrase(PendingPhrase("Hi there."))
    new.first_text_at = now
    batch = sched._schedule(now)
    assert [a[0] for a in batch.acoustic] == ["new"] and batch.decode == []
    # Once the old listener is due within the step, its chunk joins the newcomer's step.
    old.anchor = now - 0.95
    new.queue_phrase(PendingPhrase("Hi there."))
    batch = sched._schedule(now)
    assert [d[0] for d in batch.decode] == ["old"] and [a[0] for a in batch.acoustic] == ["new"]


def first_words_arriving(chunk: int, **cfg) -> tuple[Scheduler, StreamState, float]:
    """A planning scheduler (budget 100 frames a step): "old" holds 1 s and has chunks of
    `chunk` frames to make; "new" has sent its first word (its first phrase is cut at its
    third). Returns the scheduler, the old stream and now."""
    engine = FakeEngine(schedule=(chunk,))
    sched = planning_scheduler(engine, ["old", "new"], first_phrase_wait_ms=200.0, **cfg)
    now = time.monotonic()
    old = sched._streams["old"]
    old.active = ActivePhrase(id=0, z=torch.zeros(1, 800), plan=engine.chunk_plan(800), next_chunk=1)
    old.anchor, old.emitted_frames = now - 0.1, 110       # 1.1 s made, 0.1 s played
    sched._on_text(sched._streams["new"], "Hello ", now)
    assert not sched._streams["new"].has_work()           # its words are still arriving
    return sched, old, now


def test_a_big_job_that_can_wait_waits_while_a_first_phrase_is_arriving():
    # arriving_step_ms 60 (60 frames): the old listener's next chunk (80 frames, 80 ms) started
    # now would hold the newcomer's first phrase, once cut, up to 80 ms.
    sched, old, now = first_words_arriving(80)
    assert sched._schedule(now).decode == []
    assert sched._next_wakeup(now) <= 0.2 + 1e-6         # planned again when they must be spoken
    # Past first_phrase_wait_ms the newcomer's words are spoken, however few: nothing waits.
    assert [d[0] for d in sched._schedule(now + 0.21).decode] == ["old"]
    # A job that could not wait out the arrival and the newcomer's step (two steps) is taken.
    sched, old, now = first_words_arriving(80)
    old.anchor = now - 0.8                                # 0.3 s left to play
    assert [d[0] for d in sched._schedule(now).decode] == ["old"]


def test_a_small_job_or_arriving_step_ms_0_leaves_nothing_for_an_arriving_phrase():
    sched, _, now = first_words_arriving(40)              # within arriving_step_ms: taken
    assert [d[0] for d in sched._schedule(now).decode] == ["old"]
    sched, _, now = first_words_arriving(80, arriving_step_ms=0.0)
    assert [d[0] for d in sched._schedule(now).decode] == ["old"]


def test_nothing_waits_for_an_arriving_phrase_while_the_model_is_busy():
    # A job left for later leaves the model idle: near capacity that costs the admitted streams
    # throughput they count on. Busy 60% of the last seconds (over arriving_below_busy 0.5):
    # the big job goes now; once the model has been idle a while, it waits again.
    sched, old, now = first_words_arriving(80)
    for k in range(40):                                   # steps of 60 ms every 100 ms
        sched._note_step(now - 4.0 + 0.1 * k, 0.06)
    assert sched.busy_fraction(now - 0.1) == pytest.approx(0.6, abs=0.05)
    assert [d[0] for d in sched._schedule(now - 0.1).decode] == ["old"]
    later = now + 3.0                                     # 3 s idle since
    assert sched.busy_fraction(later) < 0.5
    old.active.next_chunk, old.anchor = 1, later - 0.1    # holding 1 s again
    new = sched._streams["new"]
    sched._on_text(new, "there ", later - 0.05)           # still no phrase cut
    new.first_text_at = later - 0.05
    assert sched._schedule(later).decode == []


def newcomers_waiting(sched: Scheduler, text: str) -> float:
    """Every open stream of a planning scheduler has `text` cut and no audio yet; returns now."""
    now = time.monotonic()
    for stream in sched._streams.values():
        stream.queue_phrase(PendingPhrase(text))
        stream.first_text_at = now
    return now


def test_newcomers_waiting_together_share_the_step_that_carries_first_audio():
    # The newcomer-step limit holds back started listeners' work that is not due, never the
    # other newcomers: one acoustic call for several first phrases costs far less than one each.
    sched = planning_scheduler(FakeEngine(schedule=(4,)), ["n0", "n1", "n2"], newcomer_step_ms=1.0)
    now = newcomers_waiting(sched, "Hi.")
    assert sorted(a[0] for a in sched._schedule(now).acoustic) == ["n0", "n1", "n2"]


def test_newcomers_waiting_together_are_not_split_across_steps_by_the_budget():
    # Budget: 100 frames per step; each first phrase costs ~80 (a 40-frame first chunk plus its
    # acoustic work), so a budget-bound step would take one newcomer per step. They share the
    # step of the first, up to max_batch_phrases.
    sched = planning_scheduler(FakeEngine(schedule=(40,)), ["n0", "n1", "n2"], max_batch_phrases=2)
    now = newcomers_waiting(sched, "twenty chars of text")
    assert sorted(a[0] for a in sched._schedule(now).acoustic) == ["n0", "n1"]
    assert [a[0] for a in sched._schedule(now).acoustic] == ["n2"]


def test_a_scheduler_behind_its_listeners_takes_bigger_steps():
    # Budget: 100 frames per step; each listener's next chunk is 40 frames. While at most one
    # listener is due within the step, steps hold 2 chunks. Once two or more are due, the step
    # may grow (behind_step_factor 2): 4 chunks in one batch instead of two steps of two.
    engine = FakeEngine(schedule=(40,))
    sched = planning_scheduler(engine, [f"s{i}" for i in range(4)])
    now = time.monotonic()
    for i in range(4):
        stream = sched._streams[f"s{i}"]
        stream.active = ActivePhrase(id=0, z=torch.zeros(1, 400), plan=engine.chunk_plan(400), next_chunk=1)
        stream.anchor, stream.emitted_frames = now - 0.1, 50 + 10 * i   # 0.4 s buffered and more
    assert len(sched._schedule(now).decode) == 2
    for i in range(2):
        sched._streams[f"s{i}"].emitted_frames = 10 + i               # these two run dry now
    assert len(sched._schedule(now).decode) == 4


async def test_slowly_arriving_text_is_spoken_after_first_phrase_wait():
    # Words every 150 ms (a slow LLM): the eager cut would wait for 6 words (~750 ms); after
    # first_phrase_wait_ms the complete words that have come are spoken.
    engine = FakeEngine()
    sched, task = await running(engine, first_phrase_wait_ms=200.0)
    sink = Sink()
    sched.open("s", SLOW_FLUSH, sink)
    t0 = time.monotonic()
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for w in words:
        sched.text("s", w + " ")
        await asyncio.sleep(0.15)
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 5)
    await stop(task)
    first = sink.phrases()[0].text.split()
    assert 1 <= len(first) < 6 and first == words[:len(first)]
    assert sink.audio_at[0] - t0 < 0.45
    assert " ".join(p.text for p in sink.phrases()).split() == words
    check_timeline(sink)


async def test_a_stream_whose_text_ends_in_whitespace_after_an_early_cut_finishes():
    # The eager cut takes the 6 words as soon as the space after the last one arrives, leaving
    # only that space pending; `end` must still finish the stream.
    engine = FakeEngine()
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", SLOW_FLUSH, sink)
    for w in "one two three four five six".split():
        sched.text("s", w + " ")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 3)
    await stop(task)
    assert [p.text for p in sink.phrases()] == ["one two three four five six"]
    assert sink.kinds()[-1] == "done"


async def test_whitespace_left_pending_does_not_spin_the_scheduler():
    # After an early cut only a space is pending; the text timeout must not fire every tick.
    engine = FakeEngine()
    sched, task = await running(engine)
    ticks = 0
    tick = sched._tick_streams

    def counting(now: float) -> None:
        nonlocal ticks
        ticks += 1
        tick(now)

    sched._tick_streams = counting  # type: ignore[method-assign]
    sink = Sink()
    sched.open("s", OPTS, sink)
    for w in "one two three four five six".split():
        sched.text("s", w + " ")
    await asyncio.sleep(1.5)
    await stop(task)
    assert sched._streams["s"].splitter.pending == " "
    assert ticks < 100      # about one per chunk and timer; spinning gave ~460 per second


async def test_an_idle_scheduler_waits_without_a_task_per_wait_and_wakes_on_a_command():
    # Between steps the scheduler waits for a command or its next timer. That wait must not
    # be a task of its own (asyncio.wait_for made one per wait: a live task more in every
    # soak sample and a task created and destroyed per idle wake-up).
    engine = FakeEngine()
    sched, task = await running(engine)
    await asyncio.sleep(0.1)
    seen = set()
    for _ in range(20):                      # idle: waits end at timers and start again
        seen |= {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        await asyncio.sleep(0.01)
    assert seen == {task}
    sink = Sink()
    t0 = time.monotonic()
    await speak(sched, "s", sink, "Wake up now.")
    assert time.monotonic() - t0 < 2.0       # generous: the wake-up, not a timer, started it
    await stop(task)


async def test_a_listener_is_kept_in_silence_between_words_of_a_sentence():
    # "alpha" is spoken alone (first_phrase_wait_ms); its sentence goes on, so while only the
    # space after it is pending the listener gets silence instead of running dry.
    engine = FakeEngine()
    sched, task = await running(engine, first_phrase_wait_ms=200.0)
    sink = Sink()
    sched.open("s", SLOW_FLUSH, sink)
    sched.text("s", "alpha ")
    await asyncio.sleep(0.6)
    beta_at = time.monotonic()
    sched.text("s", "beta.")
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 5)
    await stop(task)
    first = sink.phrases()[0]
    assert first.text == "alpha"
    silence = [at for (samples, pts), at in zip(sink.audio(), sink.audio_at)
               if pts >= first.end_ms and not samples.any()]
    assert silence and silence[0] < beta_at
    check_timeline(sink)


def test_streams_still_building_a_runway_are_counted_for_admission():
    ids = ["new", "thin", "safe", "idle", "first", "first-text", "first-only"]
    sched = planning_scheduler(FakeEngine(), ids, runway_ms=1000.0)
    now, ms = time.monotonic(), sched.frame_ms
    s = sched._streams
    for sid, held_ms in (("thin", 300.0), ("safe", 1500.0), ("idle", 100.0), ("first", 1500.0),
                         ("first-text", 1500.0), ("first-only", 1500.0)):
        s[sid].anchor, s[sid].emitted_frames = now - 2.0, int((2000.0 + held_ms) / ms)
        s[sid].next_phrase_id = s[sid].spoken_phrases = 1 if sid.startswith("first") else 5
    s["thin"].queue_phrase(PendingPhrase("more words"))   # work queued, listener holds 0.3 s
    s["safe"].queue_phrase(PendingPhrase("more words"))   # work queued, 1.5 s held
    # "idle" holds 0.1 s but has nothing to compute: it waits for text, more compute won't help.
    # Still on their short first phrase with more to say, 1.5 s held is no runway: a phrase is
    # queued, or words wait in the splitter for the sentence's end.
    s["first"].queue_phrase(PendingPhrase("the whole next sentence"))
    assert s["first-text"].splitter.push("and the rest of the sent", buffered_ms=1500.0) == []
    # Said all it has been given in one phrase: waiting for text, like "idle".
    sched.open("opening", OPTS, Sink())                     # not yet applied: starting too
    load = sched.load()
    assert (load.active_streams, load.starting_streams) == (8, 5)
    assert sched.load(extra_streams=1).starting_streams == 6


def test_a_context_open_for_a_while_without_text_is_idle_not_starting():
    # A client keeping contexts open for later turns: counted as streams, not as starting
    # (which costs `startup_extra` more each), until its first text comes.
    sched = planning_scheduler(FakeEngine(), ["fresh", "kept", "spoken-to"])
    s = sched._streams
    for sid in ("kept", "spoken-to"):
        s[sid].created -= IDLE_CONTEXT_S + 0.5
    sched._starting_count = (float("-inf"), 0, 0)
    load = sched.load()
    assert (load.active_streams, load.starting_streams) == (3, 1)     # "fresh" only
    sched.text("spoken-to", "Now it speaks.")
    sched._apply_commands()
    sched._starting_count = (float("-inf"), 0, 0)
    assert sched.load().starting_streams == 2


async def test_free_heap_is_given_back_in_the_model_thread_between_steps(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr("streaming_tts.heap.release_free_heap",
                        lambda: calls.append(threading.get_ident()) or True)
    engine = FakeEngine()
    sched, task = await running(engine, heap_trim_interval_s=0.05)
    await asyncio.sleep(0.2)
    assert calls == [], "an idle scheduler that has made nothing has nothing to give back"
    sinks = [Sink() for _ in range(3)]
    for i, sink in enumerate(sinks):   # one after the other: the trims fall between steps
        await speak(sched, f"s{i}", sink, "One two three. Four five six. Seven eight.")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    n = len(calls)
    await asyncio.sleep(0.3)
    await stop(task)
    assert 1 <= n <= sched.steps, "at most one trim per step, and some"
    assert len(calls) == n, "idle again: no trim without new steps"
    assert set(calls) == engine.thread_ids, "in the model thread, where the memory was freed"


async def test_heap_trims_can_be_turned_off(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr("streaming_tts.heap.release_free_heap", lambda: calls.append(1) or True)
    engine = FakeEngine()
    sched, task = await running(engine, heap_trim_interval_s=0.0)
    await speak(sched, "s", Sink(), "One two three. Four five six.")
    await asyncio.sleep(0.2)
    await stop(task)
    assert calls == []


def finish_costed(sched: Scheduler, sid: str, cost: float, now: float,
                  audio_ms: float = 4000.0) -> None:
    """A stream of `audio_ms` of audio that cost `cost` s per audio s finishes."""
    sched.meter.open(sid)
    sched.meter.add_audio(sid, audio_ms, now=now)
    sched.meter.record_batch(audio_ms / 1000 * cost, {sid: 1.0}, None)
    sched._finish(StreamState(sid, OPTS, Sink(), PhraseSplitter()))


def test_short_streams_correct_a_pessimistic_warm_up_cost_together():
    # Warm-up ran while another process held the cores: 0.92 s per audio s. A server serving
    # one-line replies (under 2 s of audio each) must still learn what streams cost here.
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.92, cost_half_life_s=0.0)
    now = time.monotonic()
    finish_costed(sched, "a", 0.15, now, audio_ms=800.0)
    finish_costed(sched, "b", 0.15, now, audio_ms=900.0)
    # 1.7 s pooled: not yet a cost of its own.
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.92, rel=0.01)
    finish_costed(sched, "c", 0.30, now, audio_ms=300.0)     # 2.0 s pooled: one cost
    pooled = (0.8 * 0.15 + 0.9 * 0.15 + 0.3 * 0.30) / 2.0
    assert sched._stream_cost == pytest.approx(0.8 * 0.92 + 0.2 * pooled, rel=0.01)
    for i in range(12):
        finish_costed(sched, f"s{i}", 0.15, now, audio_ms=1000.0)
    assert sched.load().capacity_audio_s_per_s > 3.0     # was 1.09: one stream, no second
    # A stream that made no audio (cancelled before its first chunk) adds no cost, and the
    # pool restarts after each cost: a long stream counts alone, as before.
    cost = sched._stream_cost
    sched.meter.open("silent")
    sched.meter.record_batch(0.05, {"silent": 1.0}, None)
    sched._finish(StreamState("silent", OPTS, Sink(), PhraseSplitter()))
    assert sched._stream_cost == cost and sched._short_pool == (0.0, 0.0)
    finish_costed(sched, "long", 0.1, now)
    assert sched._stream_cost == pytest.approx(0.8 * cost + 0.2 * 0.1, rel=0.01)


def test_a_cost_measured_while_slow_returns_to_warm_ups_while_no_stream_finishes():
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.05, cost_half_life_s=30.0)
    now = time.monotonic()
    # Streams that finished while a neighbour held the cores cost 0.25 s per audio s.
    sched._stream_cost, sched._costed_at = 0.25, now
    assert sched.load().capacity_audio_s_per_s == pytest.approx(4.0, rel=0.01)
    sched._costed_at = now - 30.0    # one half-life without a stream finishing
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.15, rel=0.01)
    sched._costed_at = now - 300.0
    assert sched.load().capacity_audio_s_per_s == pytest.approx(20.0, rel=0.01)
    # The next finished stream updates the drawn-back cost, not the stale one.
    sched._costed_at = now - 30.0
    finish_costed(sched, "s", 0.1, now)
    assert sched._stream_cost == pytest.approx(0.8 * 0.15 + 0.2 * 0.1, rel=0.01)


def test_once_streams_have_finished_the_cost_settles_back_to_their_median_not_warm_ups():
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.05, cost_half_life_s=30.0)
    now = time.monotonic()
    for i in range(7):                   # under load streams cost more than warm-up's probe
        finish_costed(sched, f"a{i}", 0.06, now)
    sched._costed_at = now - 300.0       # too few yet: back to warm-up's
    assert sched.load().capacity_audio_s_per_s == pytest.approx(20.0, rel=0.01)
    finish_costed(sched, "a7", 0.06, now)
    sched._costed_at = now - 300.0       # a quiet spell after 8: back to what they cost
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.06, rel=0.01)
    # A slow spell: a few streams at 5x barely move the median, and the estimate returns to it.
    for i in range(5):
        finish_costed(sched, f"slow{i}", 0.30, now)
    assert sched.load().capacity_audio_s_per_s < 1 / 0.15
    sched._costed_at = now - 300.0
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.06, rel=0.01)
    # A lasting change (the host got slower for good) becomes the median in time.
    for i in range(60):
        finish_costed(sched, f"b{i}", 0.08, now)
    sched._costed_at = now - 300.0
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.08, rel=0.01)


def test_a_host_faster_for_good_resets_the_median():
    # A neighbour held the cores for long enough that every cost in the window was taken under
    # it; once it left, the estimate kept going back to that median between finished streams
    # (a chatbot's second context refused ~20 times in 45 s on an idle host).
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.05, cost_half_life_s=30.0)
    now = time.monotonic()
    for i in range(30):
        finish_costed(sched, f"slow{i}", 0.30, now)
    for i in range(7):
        finish_costed(sched, f"fast{i}", 0.06, now)
    sched._costed_at = now - 300.0       # seven say little yet: the slow median holds
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.30, rel=0.01)
    finish_costed(sched, "fast7", 0.06, now)
    sched._costed_at = now - 300.0       # eight all well under it: they are the cost now
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.06, rel=0.01)
    assert len(sched._recent_costs) == 8


def test_without_a_warm_up_cost_or_a_half_life_the_cost_stays():
    sched = new_scheduler(FakeEngine(), cost_half_life_s=30.0)   # no warm-up measurement
    sched._stream_cost, sched._costed_at = 0.25, time.monotonic() - 300.0
    assert sched.load().capacity_audio_s_per_s == pytest.approx(4.0)
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.05, cost_half_life_s=0.0)
    sched._stream_cost, sched._costed_at = 0.25, time.monotonic() - 300.0
    assert sched.load().capacity_audio_s_per_s == pytest.approx(4.0)


class WalkCountingDeque(collections.deque):
    walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()


def test_text_far_ahead_of_speech_is_counted_not_summed_at_each_frame():
    # A client may send text far faster than it is spoken (an LLM's whole answer at once, in
    # tiny frames): thousands of phrases queue. Each text frame asks how much speech the
    # listener has coming; that count is kept as phrases are queued and taken, so a frame
    # costs the same with 10 phrases queued or 2000 (walking them made 40k characters in
    # 2-character frames stall the event loop for 5 s).
    sched = planning_scheduler(FakeEngine(schedule=(8, 64)), ["s"])
    stream = sched._streams["s"]
    stream.phrases = WalkCountingDeque()
    text = "Hi. " * 2000
    for i in range(0, len(text), 2):
        sched.text("s", text[i:i + 2])
    sched._apply_commands()
    assert len(stream.phrases) >= 1900 and stream.phrases.walks == 0
    assert stream.queued_chars == 3 * len(stream.phrases)
    now = time.monotonic()
    for _ in range(20):                 # phrases taken into steps leave the count
        sched._schedule(now)
        stream.inflight_chars, stream.active = 0, None
    assert len(stream.phrases) < 1990
    assert stream.queued_chars == 3 * len(stream.phrases)


def test_code_the_voice_skips_is_not_counted_as_speech_ahead():
    # With read_code false, a code block's phrases are announced but not read: the listener
    # has no speech coming from them, so the splitter still cuts the prose after a long block
    # short.
    sched = new_scheduler(FakeEngine(schedule=(8, 64)), target_step_ms=100.0,
                          initial_frames_per_s=1000.0)
    sched.open("s", dataclasses.replace(OPTS, read_code=False), Sink())
    sched._apply_commands()
    stream = sched._streams["s"]
    sched.text("s", "Look:\n```\n" + "x = 1; y = 2; z = 3\n" * 20 + "```\nDone.")
    sched.end("s")
    sched._apply_commands()
    code = [p for p in stream.phrases if "=" in p.text]
    assert code and all(p.voice == "" for p in code)
    rest = [p for p in stream.phrases if p not in code]
    assert [(p.text, p.voice) for p in rest] == [("Look:", None), ("```", ""), ("Done.", None)]
    assert stream.queued_chars == len("Look:Done.")
    sched._schedule(time.monotonic())
    assert stream.inflight_chars == len("Look:")


async def test_code_left_unread_is_announced_without_a_step_per_phrase():
    # A long code block is cut into many phrases. Each took a model step of its own (with
    # nothing to compute), so the prose after it waited for as many steps: under load, a
    # second per ten phrases. They are now announced as soon as the stream's timeline reaches
    # them, all at once.
    engine = FakeEngine(schedule=(8, 64))
    sched, task = await running(engine)
    sink = Sink()
    sched.open("s", dataclasses.replace(OPTS, read_code=False), sink)
    code = "".join(f"x{i} = f({i}, {i})\n" for i in range(200))
    text = "Look here:\n```\n" + code + "```\nDone now."
    for i in range(0, len(text), 5):                  # an LLM's tokens
        sched.text("s", text[i:i + 5])
    sched.end("s")
    await asyncio.wait_for(sink.done.wait(), 10)
    await stop(task)
    phrases = sink.phrases()
    assert "".join(p.space_before + p.text for p in phrases) == text
    code_phrases = [p for p in phrases if "=" in p.text]
    assert len(code_phrases) > 50 and all(p.start_ms == p.end_ms for p in code_phrases)
    assert [p.text for p in phrases if p.end_ms > p.start_ms] == ["Look here:", "Done now."]
    assert [p.id for p in phrases] == list(range(len(phrases)))
    assert all(a.end_ms <= b.start_ms for a, b in pairwise(phrases))
    steps = sum(1 for kind, _ in engine.calls if kind == "decode")
    assert steps < 20


def test_markup_alone_is_known_to_say_nothing_before_it_is_phonemized():
    # A rule or a table's |---| row is announced with no length without a step of its own,
    # as code left unread is (with markdown on: otherwise the voice reads its symbols).
    sched = planning_scheduler(FakeEngine(schedule=(8, 64)), ["s"])
    stream = sched._streams["s"]
    sched.text("s", "Results:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n---\n\nWow !!! ")
    sched.end("s")
    sched._apply_commands()
    assert {p.text: p.voice for p in stream.phrases} == {
        "Results:": None, "| a | b |": None, "|---|---|": "", "| 1 | 2 |": None, "---": "",
        "Wow !!!": None}


def test_a_text_that_ends_in_code_left_unread_is_done_when_its_speech_is():
    # Its last phrases are announced without a step, so no step's end finishes the stream:
    # `done` waited for the next timer (up to a second) after the last audio.
    sched = new_scheduler(FakeEngine(schedule=(8, 64)), target_step_ms=100.0,
                          initial_frames_per_s=1000.0)
    sink = Sink()
    sched.open("s", dataclasses.replace(OPTS, read_code=False), sink)
    sched.text("s", "Look at this:\n```\nx = 1\ny = 2\n```\n")
    sched.end("s")
    sched._apply_commands()
    for _ in range(20):
        batch = sched._schedule(time.monotonic())
        if not (batch.acoustic or batch.decode):
            break
        sched._update(batch, sched._execute(batch))
    assert sink.kinds()[-1] == "done" and "s" not in sched._streams
    assert [p.text for p in sink.phrases()][0] == "Look at this:"
    assert all(p.start_ms == p.end_ms for p in sink.phrases()[1:])


async def test_a_flood_of_commands_is_applied_in_slices_that_let_the_loop_run():
    # 2000 text frames queued at once (an LLM's answer in tiny tokens): applying them in one
    # go held the event loop, and every other stream on it, for the whole flood.
    engine = FakeEngine()
    sched, task = await running(engine)
    sched.open("s", OPTS, Sink())
    await asyncio.sleep(0.05)
    for _ in range(2000):
        sched.text("s", "Hi. ")
    seen = []
    while sched._commands and len(seen) < 10_000:
        seen.append(len(sched._commands))
        await asyncio.sleep(0)
    await stop(task)
    assert not sched._commands
    assert any(0 < n < 2000 for n in seen), "the loop ran between slices"
    assert all(a - b <= 256 for a, b in pairwise(seen)), "at most a slice at a time"


def test_a_cancelled_stream_stops_counting_as_load_at_once_not_after_the_step():
    # Barge-in: cancel, then at once `start` again. The cancel is applied between steps, and
    # until then the stream still counted: an idle server refused the new start (`overloaded`,
    # retry in 2-4 s), because it did not look idle. What counts is the commands' outcome.
    sched = planning_scheduler(FakeEngine(), ["a"])
    newcomers_waiting(sched, "Hello there.")
    assert sched.load().active_streams == 1 and sched.load().starting_streams == 1
    sched.cancel("a")                     # queued: a step is running
    sched._starting_count = (float("-inf"), 0, 0)
    load = sched.load()
    assert (load.active_streams, load.starting_streams) == (0, 0)
    sched.open("b", OPTS, Sink())         # the new start: opening, not yet registered
    sched.open("c", OPTS, Sink())
    sched.close("c")                      # and one gone before it was ever registered
    sched._starting_count = (float("-inf"), 0, 0)
    load = sched.load()
    assert (load.active_streams, load.starting_streams) == (1, 1)
    sched._apply_commands()
    assert sorted(sched._streams) == ["b"] and sched.stream_count == 1
    assert sched.load().active_streams == 1
    assert not sched._leaving and not sched._opening_ids


@pytest.mark.parametrize("hold_ms", [1000.0, 0.0])
def test_text_past_its_buffer_delay_waits_while_the_listener_has_plenty_coming(hold_ms):
    # Captions typed at 3 words/s: each gap between words passes max_buffer_delay_ms (300).
    # While the listener has over buffer_delay_hold_ms of speech coming, the words wait (and
    # may complete their sentence); once it has less, they are spoken, still before it runs
    # dry. hold 0: the delay alone decides, as before.
    sched = planning_scheduler(FakeEngine(), [], buffer_delay_hold_ms=hold_ms)
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=300.0), Sink())
    sched._apply_commands()
    stream = sched._streams["s"]
    now = time.monotonic()
    stream.anchor, stream.emitted_frames = now - 0.5, round(2000 / sched.frame_ms)  # 1.5 s left
    sched.text("s", "and then the")
    sched._apply_commands()
    assert stream.splitter.pending.strip() == "and then the" and not stream.phrases
    stream.last_text_at = now - 0.4                      # past the 300 ms delay
    sched._tick_streams(now)
    if hold_ms == 0:
        assert [p.text for p in stream.phrases] == ["and then the"]
        return
    assert not stream.phrases, "held: 1.5 s of speech coming"
    assert sched._next_wakeup(now) == pytest.approx(0.5, abs=0.02)   # when 1 s is left
    sched._tick_streams(now + 0.51)
    assert [p.text for p in stream.phrases] == ["and then the"]


def trickle_scheduler(**config: float) -> tuple[Scheduler, StreamState, Callable[..., list[str]]]:
    """A stream whose listener is near dry (0.1 s left), and `typed(text, idle_s)`: the
    phrases cut once `text` has come and no more for `idle_s`."""
    sched = Scheduler(FakeEngine(), phonemizer=FakePhonemizer(), meter=Meter(),
                      splitter_factory=functools.partial(PhraseSplitter, SplitterConfig(
                          function_words=ENGLISH_FUNCTION_WORDS)),
                      config=SchedulerConfig(target_step_ms=100.0, initial_frames_per_s=1000.0,
                                             **config))
    sched.open("s", StreamOptions(params=SynthesisParams(), max_buffer_delay_ms=300.0), Sink())
    sched._apply_commands()
    stream = sched._streams["s"]
    now = time.monotonic()
    stream.anchor, stream.emitted_frames = now - 0.5, round(600 / sched.frame_ms)  # 0.1 s left

    def typed(text: str, idle_s: float) -> list[str]:
        sched.text("s", text)
        sched._apply_commands()
        stream.last_text_at = now - idle_s
        sched._tick_streams(now)
        spoken = [p.text for p in stream.phrases]
        stream.phrases.clear()
        stream.queued_chars = 0
        return spoken
    return sched, stream, typed


def test_text_past_its_delay_is_all_spoken_as_the_contract_says():
    # "if no text arrives for this long, synthesize what is buffered": function words and a
    # lone word too. (With function_word_wait_ms on, "is" waited 1 s more, past a delay the
    # client may have set to 100 ms.)
    sched, stream, typed = trickle_scheduler()
    assert typed("The answer is", 0.2) == []           # within the delay: more may come
    sched._tick_streams(stream.last_text_at + 0.31)    # none came for 310 ms
    assert [p.text for p in stream.phrases] == ["The answer is"]
    stream.phrases.clear()
    stream.queued_chars = 0
    assert typed(" finally", 0.31) == ["finally"]       # one word
    assert typed(" came out of", 0.31) == ["came out of"]
    assert stream.splitter.pending.strip() == ""


def test_trickling_text_past_its_delay_is_cut_before_function_words_and_a_few_words_at_a_time():
    # Opt-in (it bends the contract): captions at 3 words/s to a listener near dry, each gap
    # between words past the 300 ms delay, were spoken a phrase per word ("came out | of their
    # | houses to"), each with its pauses, the word before a cut drawn out. While words still
    # trickle in, a delay cut keeps trailing function words for the next phrase and speaks 3
    # words or more.
    _, stream, typed = trickle_scheduler(function_word_wait_ms=1000.0, delay_min_words=3)
    assert typed("finally", 0.4) == []                  # one word: wait for more
    assert typed(" passed,", 0.4) == ["finally passed,"]  # a mark ends a phrase at once
    assert typed(" the villagers came out of", 0.4) == ["the villagers came out"]
    assert stream.splitter.pending == " of"
    assert typed(" their", 0.4) == []                   # function words alone wait whole
    # Words that stopped coming (function_word_wait_ms, 1 s) are all spoken.
    assert typed("", 1.1) == ["of their"]


async def test_an_idle_server_probes_its_cost_again_and_only_ever_lowers_the_estimate(caplog):
    # Streams that finished while a neighbour held the cores left a high cost, and with no
    # stream finishing nothing corrected it. Once idle for recalibrate_idle_s, the model thread
    # probes again: the estimate drops to 1.3x what the probe read, once per idle spell.
    engine = FakeEngine(schedule=(8, 64), delay_s=0.002)
    probe = measure_stream_cost(FakeEngine(schedule=(8, 64), delay_s=0.002), FakePhonemizer())
    sched, task = await running(engine, recalibrate_idle_s=0.05, initial_stream_cost=50 * probe)
    with caplog.at_level(logging.INFO, logger="streaming_tts.scheduler"):
        await wait_until(lambda: sched._recalibrated and sched._probe is None)
    assert 1 / sched.load().capacity_audio_s_per_s == pytest.approx(1.3 * probe, rel=0.5)
    assert any("idle cost probe" in r.getMessage() for r in caplog.records)
    calls = len(engine.calls)
    await asyncio.sleep(0.2)
    assert len(engine.calls) == calls, "one probe per idle spell"
    # A stream comes and goes: the next idle spell probes again, and a probe reading more
    # than the estimate leaves it alone.
    sched._stream_cost = sched._settled_cost = probe / 100
    await speak(sched, "s", Sink(), "Hello there.")
    await wait_until(lambda: sched._recalibrated and sched._probe is None)
    assert len(engine.calls) > calls + 2
    assert sched._current_cost(time.monotonic()) <= probe / 50
    await stop(task)


async def test_the_model_threads_time_for_no_stream_is_reported_as_overhead():
    # An operator reconciling the model's time: steps are billed to streams; the idle probe
    # and heap trims are reported apart, each with the model thread's time it took.
    class Observer:
        overhead: list[tuple[str, float]] = []

        def on_step(self, *_): pass
        def on_late(self, _sid): pass
        def on_underrun(self, _sid): pass
        def on_overhead(self, kind, seconds): self.overhead.append((kind, seconds))
        def on_stream_ended(self, *_): pass

    engine = FakeEngine(schedule=(8, 64), delay_s=0.005)
    sched = Scheduler(engine, phonemizer=FakePhonemizer(), splitter_factory=PhraseSplitter,
                      meter=Meter(), observer=Observer(),
                      config=SchedulerConfig(recalibrate_idle_s=0.05, heap_trim_interval_s=0.01))
    task = asyncio.create_task(sched.run())
    await speak(sched, "s", Sink(), "Hello there.")
    stream_calls = len(engine.calls)
    await wait_until(lambda: any(k == "cost_probe" for k, _ in Observer.overhead))
    await wait_until(lambda: any(k == "heap_trim" for k, _ in Observer.overhead))
    probe_s = sum(s for k, s in Observer.overhead if k == "cost_probe")
    probe_decodes = sum(kind == "decode" for kind, _ in engine.calls[stream_calls:])
    assert probe_decodes > 0 and probe_s >= probe_decodes * engine.delay_s  # each sleeps 5 ms
    await stop(task)


async def test_every_ended_stream_is_reported_with_where_its_usage_went():
    # An operator sees which compute was billed on the wire (done, cancelled) and which only
    # in the log (a stream closed without either): together, all of the steps' time.
    class Observer:
        steps_s = 0.0
        ended: dict[str, tuple[str, float]] = {}

        def on_step(self, seconds, *_): Observer.steps_s += seconds
        def on_late(self, _sid): pass
        def on_underrun(self, _sid): pass
        def on_overhead(self, *_): pass
        def on_stream_ended(self, reported, usage):
            Observer.ended[usage["chars"]] = (reported, usage["compute_ms"])

    sched = Scheduler(FakeEngine(delay_s=0.02), phonemizer=FakePhonemizer(),
                      splitter_factory=PhraseSplitter, meter=Meter(), observer=Observer())
    task = asyncio.create_task(sched.run())
    long = "This is a long sentence that keeps going. " * 5
    sinks = {sid: Sink() for sid in ("cancelled", "closed")}
    for sid, text in (("cancelled", long), ("closed", long + "!")):
        sched.open(sid, OPTS, sinks[sid])
        sched.text(sid, text)
    await speak(sched, "done", Sink(), "Hello there.")
    await wait_until(lambda: all(sink.audio() for sink in sinks.values()))
    sched.cancel("cancelled")
    sched.close("closed")
    await wait_until(lambda: len(Observer.ended) == 3)
    await stop(task)
    assert {chars: reported for chars, (reported, _) in Observer.ended.items()} == {
        len("Hello there."): "done", len(long): "cancelled", len(long) + 1: "log_only"}
    assert all(compute > 0 for _, compute in Observer.ended.values())
    billed_s = sum(compute for _, compute in Observer.ended.values()) / 1000
    assert billed_s == pytest.approx(Observer.steps_s, abs=0.0005)   # 0.1 ms rounding each


async def test_a_stream_arriving_stops_the_idle_probe_at_its_next_model_call():
    full = FakeEngine(schedule=(8, 64))
    measure_stream_cost(full, FakePhonemizer())
    alone = FakeEngine(schedule=(8, 64))         # what the stream alone takes
    sched, task = await running(alone)
    await speak(sched, "s", Sink(), "Hi.")
    await stop(task)
    engine = FakeEngine(schedule=(8, 64), delay_s=0.05)   # the probe: many 50 ms calls
    sched, task = await running(engine, recalibrate_idle_s=0.01, initial_stream_cost=10.0)
    await wait_until(lambda: sched._probe is not None and engine.calls)
    await speak(sched, "s", Sink(), "Hi.")
    await wait_until(lambda: sched._probe is None)
    assert len(engine.calls) <= len(alone.calls) + 2 < len(alone.calls) + len(full.calls), \
        "the probe stopped at its next call"
    assert sched._current_cost(time.monotonic()) == pytest.approx(10.0), "stopped: no reading"
    await stop(task)


async def wait_until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_due_heap_trim_waits_while_a_listener_owed_audio_holds_little(monkeypatch):
    # A trim can stall the event loop for its length (glibc's arena lock): not while a
    # newcomer waits for its first audio or a listener is near dry; at most 4 intervals.
    submitted: list[str] = []
    sched = planning_scheduler(FakeEngine(), ["new", "old"], heap_trim_interval_s=30.0)

    def submit(fn, *args):
        submitted.append(fn.__name__)
        done = concurrent.futures.Future()
        done.set_result(0.0)
        return done

    monkeypatch.setattr(sched._pool, "submit", submit)
    now = newcomers_waiting(sched, "Hello there.")
    old = sched._streams["old"]
    old.anchor, old.emitted_frames = now, round(1000 / sched.frame_ms)    # holds 1 s
    sched.steps, sched._trimmed_at = 5, now - 31.0
    sched._trim_heap()
    assert submitted == [], "the newcomer has nothing yet"
    new = sched._streams["new"]
    new.anchor, new.emitted_frames = now, round(200 / sched.frame_ms)     # 0.2 s: near dry
    sched._trim_heap()
    assert submitted == []
    new.emitted_frames = round(500 / sched.frame_ms)
    sched._trim_heap()
    assert submitted == ["_release_free_heap"]
    new.emitted_frames = 0                                                # dry again
    sched.steps, sched._trimmed_at = 6, time.monotonic() - 121.0          # 4 intervals late
    sched._trim_heap()
    assert len(submitted) == 2, "deferred at most 4 intervals"


def test_a_timer_check_visits_only_the_streams_whose_time_has_come():
    # 300 listeners hold seconds of audio with nothing owed; one has text waiting. A check
    # visited every stream (~2 ms at 1000 streams, the largest part of the event loop's own
    # work); it now visits the one whose text deadline came, then only while its text is held.
    sched = planning_scheduler(FakeEngine(), [f"s{i}" for i in range(300)], buffer_delay_hold_ms=1000.0)
    now = time.monotonic()
    for stream in sched._streams.values():
        stream.anchor, stream.emitted_frames = now, 500       # 5 s of audio ahead
    visits: list[str] = []
    tick = sched._tick_stream

    def counting(stream, at):
        visits.append(stream.id)
        tick(stream, at)

    sched._tick_stream = counting  # type: ignore[method-assign]
    sched.text("s7", "and then the")
    sched._apply_commands()
    sched._tick_streams(now)
    assert visits == []
    sched._tick_streams(now + 0.06)                            # past its 50 ms delay: held
    sched._tick_streams(now + 0.07)
    assert visits == ["s7", "s7"] and not sched._streams["s7"].phrases
    assert sched._next_wakeup(now + 0.07) == 1.0               # nothing due within a second
    sched._tick_streams(now + 4.0)                             # 1 s of audio left: spoken
    assert [p.text for p in sched._streams["s7"].phrases] == ["and then the"]


def test_a_listener_that_ran_dry_waiting_for_text_is_not_late_when_text_comes():
    # Its player stalled with nothing owed (a pause between an LLM's turns); no timer visits
    # it meanwhile. Its clock resumes when text comes, before that text is owed: not late.
    class Observer:
        late: list[str] = []
        underruns: list[str] = []

        def on_step(self, *_): pass
        def on_late(self, sid): self.late.append(sid)
        def on_underrun(self, sid): self.underruns.append(sid)
        def on_overhead(self, *_): pass
        def on_stream_ended(self, *_): pass

    observer = Observer()
    sched = Scheduler(FakeEngine(), phonemizer=FakePhonemizer(), splitter_factory=PhraseSplitter,
                      meter=Meter(), observer=observer,
                      config=SchedulerConfig(target_step_ms=100.0, initial_frames_per_s=1000.0))
    sched.open("s", OPTS, Sink())
    sched._apply_commands()
    stream = sched._streams["s"]
    stream.anchor, stream.emitted_frames = time.monotonic() - 3.0, 100   # dry for 2 s
    sched._tick_streams(time.monotonic())
    sched.text("s", "Hello there.")
    sched.flush("s")
    sched._apply_commands()
    assert stream.has_work()
    now = time.monotonic()
    sched._tick_streams(now)
    assert observer.late == [] and -50.0 < stream.buffered_ms(now, sched.frame_ms) <= 0.0
    batch = sched._schedule(now)
    assert [a[0] for a in batch.acoustic] == ["s"]
    sched._tick_streams(now + 0.05)                            # while its step runs
    sched._update(batch, sched._execute(batch))
    assert observer.late == [] and stream.buffered_ms(time.monotonic(), sched.frame_ms) > 0
    # Owed audio again: running dry now is late, at every check while it lasts, and one
    # underrun until its next audio.
    stream.anchor -= 10.0
    sched._tick_streams(time.monotonic())
    assert observer.late == ["s"] and observer.underruns == ["s"]
    sched._tick_streams(time.monotonic() + 0.02)
    assert observer.late == ["s", "s"] and observer.underruns == ["s"]
    batch = sched._schedule(time.monotonic())
    sched._update(batch, sched._execute(batch))
    stream.anchor -= 10.0
    sched._tick_streams(time.monotonic())
    assert observer.underruns == ["s", "s"]


def test_a_phrase_phonemized_to_nothing_takes_no_model_step():
    # "!!!" or an emoji the voice does not read: once the text thread has found it has no
    # phonemes, it is announced where the stream's timeline stands, and the phrase after it
    # goes into the same step. It took a step of its own, holding the next phrase back a step.
    sched = planning_scheduler(FakeEngine(schedule=(8, 64)), ["s"])
    stream = sched._streams["s"]
    sink = stream.sink
    sched.text("s", "Well!!! ... Then we go.")
    sched.flush("s")
    sched._apply_commands()
    assert [p.text for p in stream.phrases] == ["Well!!!", "...", "Then we go."]
    read: list[str] = []
    for _ in range(20):
        if stream.phrases and stream.phrases[0].phonemized is not None:
            stream.phrases[0].phonemized.exception(timeout=5)    # the text thread is done with it
        batch = sched._schedule(time.monotonic())
        read += [a[1] for a in batch.acoustic]
        if not (batch.acoustic or batch.decode):
            break
        sched._update(batch, sched._execute(batch))
    assert read == ["Well!!!", "Then we go."]
    assert [(p.id, p.text) for p in sink.phrases()] == [(0, "Well!!!"), (1, "..."), (2, "Then we go.")]
    dots, then = sink.phrases()[1:]
    assert dots.start_ms == dots.end_ms == then.start_ms


CAPTIONS = ("The committee met on Tuesday to talk about the budget. They argued for an hour about "
            "the roads and the bridges. Then they voted on the parks, and the vote was close. ")


def captions_behind(catch_up: float, after_ms: float, own: SynthesisParams) -> tuple[Scheduler, StreamState]:
    """A stream given a paragraph at once: its listener is seconds behind the text."""
    sched = planning_scheduler(FakeEngine(), [], catch_up_after_ms=after_ms)
    sched.open("s", StreamOptions(params=own, max_buffer_delay_ms=50.0, catch_up=catch_up), Sink())
    sched.text("s", CAPTIONS)
    sched._apply_commands()
    stream = sched._streams["s"]
    for phrase in stream.phrases:
        if phrase.phonemized is not None:
            phrase.phonemized.result(timeout=5)
    return sched, stream


@pytest.mark.parametrize(("catch_up", "after_ms", "faster"), [
    (1.5, 500.0, 1.5),     # far behind its text: as fast as its max_speed allows
    (1.0, 500.0, 1.0),     # no max_speed: its own speed, however far behind
    (1.5, 1e6, 1.0),       # not that far behind: its own speed
])
def test_a_stream_far_behind_its_text_speaks_faster_up_to_its_max_speed(catch_up, after_ms, faster):
    # A live feed faster than the voice (captions at 4 words/s) put the listener 9 s further
    # behind the text each minute. With `max_speed` the phrases sent to the model are faster.
    own = SynthesisParams(speaker=2, noise_scale=0.5, length_scale=1.2, noise_w=0.7)
    sched, _ = captions_behind(catch_up, after_ms, own)
    batch = sched._schedule(time.monotonic())
    assert batch.acoustic
    for _, _, params, *_ in batch.acoustic:
        assert params == dataclasses.replace(own, length_scale=pytest.approx(1.2 / faster))


def test_the_speed_up_is_in_proportion_to_the_speech_coming():
    # Beyond `catch_up_after_ms` of speech coming, faster by how far beyond: twice as much
    # coming, twice the speed (up to max_speed, here twice the stream's own).
    own = SynthesisParams()
    base, stream = captions_behind(2.0, 1000.0, own)
    now = time.monotonic()
    coming = (base._ahead_ms(stream, now)
              + len(stream.splitter.pending) * base._frames_per_char * base.frame_ms)
    assert coming > 3000.0   # the paragraph, not yet spoken
    for share, faster in [(1.25, 1.25), (1.0, 1.0), (0.5, 1.0), (1.9, 1.9), (3.0, 2.0)]:
        sched, stream = captions_behind(2.0, coming / share, own)
        assert sched._phrase_params(stream, now).length_scale == pytest.approx(1 / faster, rel=1e-3)


def test_a_long_stream_corrects_the_cost_estimate_while_it_runs():
    # Warm-up ran while the host was busy (0.85 s per audio s); then one chapter was read
    # aloud for minutes at 0.04. Only finished streams corrected the estimate: a second
    # context was refused at "projected load 233%" 25 minutes in. Each 10 s of a live
    # stream's audio now counts as a stream of its own.
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.85, cost_half_life_s=30.0)
    stream = StreamState("chapter", OPTS, Sink(), PhraseSplitter())
    sched.meter.open("chapter")
    frames = round(1000 / sched.frame_ms)          # about a second of audio a chunk
    for _ in range(121):
        sched.meter.record_batch(frames * sched.frame_ms / 1000 * 0.04, {"chapter": 1.0}, None)
        sched._emit_audio(stream, np.zeros(frames * HOP, dtype=np.float32), frames)
    assert len(sched._recent_costs) == 12
    assert sched._settled_cost == pytest.approx(0.04, rel=0.01)
    sched._costed_at -= 300.0                      # a while since the last window
    assert sched.load().capacity_audio_s_per_s == pytest.approx(1 / 0.04, rel=0.02)
    # At its end only what came after its last window counts (nothing twice).
    sched._finish(stream)
    assert len(sched._recent_costs) == 12 and sched._short_pool[0] == pytest.approx(
        frames * sched.frame_ms, rel=0.01)


def test_silence_sent_while_waiting_for_text_is_no_cheap_audio_in_the_estimate():
    # A captions feed is mostly silence filler (no compute): its windows counted that as
    # audio, at a third of speech's cost, and eight of them reset an estimate that finished
    # speech streams had settled (capacity 10 -> 25). The filler is left out of the audio.
    sched = new_scheduler(FakeEngine(), initial_stream_cost=0.10, cost_half_life_s=30.0)
    for _ in range(16):
        sched._add_cost(5000.0, 500.0)
    stream = StreamState("captions", OPTS, Sink(), PhraseSplitter())
    sched.meter.open("captions")
    frames = round(1000 / sched.frame_ms)
    for second in range(90):                       # 30% speech at 0.10, 70% filler
        if second % 10 < 3:
            sched.meter.record_batch(frames * sched.frame_ms / 1000 * 0.10, {"captions": 1.0}, None)
            sched._emit_audio(stream, np.zeros(frames * HOP, dtype=np.float32), frames)
        else:
            sched._emit_silence(stream, 1000.0)
    assert len(sched._recent_costs) == 16 + 2     # 27 s of speech: two windows
    assert sched._settled_cost == pytest.approx(0.10, rel=0.01)
    assert sched.load().capacity_audio_s_per_s == pytest.approx(10.0, rel=0.02)
