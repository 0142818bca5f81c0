"""The scheduler under any interleaving of its commands (hypothesis): several streams get text
fragments, flushes, ends, cancels and closes in random order, with pauses and a model that is
instant or slow, as a session would pass them on. Whatever the order:

- every stream that was not closed ends exactly once (`done`, `cancelled` only if it was
  cancelled, an `internal` error only if the model failed on one of its phrases), and nothing
  follows its end; a closed stream gets nothing after `close`;
- a finished stream's captions hold every character it was sent and its usage counts them; a
  cancelled or failed stream's captions are a beginning of its text;
- the audio timeline is contiguous and every phrase's frames are there, once, in order;
- no model call is bigger than the configured batches;
- once all streams are gone the scheduler holds nothing of them (streams, timers, plans, meter).

The made-up engine and checks are `tests/test_scheduler.py`'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming_tts.engine import SynthesisParams
from streaming_tts.stream import StreamOptions
from tests.test_scheduler import FakeEngine, Sink, check_timeline, new_scheduler

SIDS = ("s0", "s1", "s2")
# Words and punctuation split anywhere, text with nothing to speak in it ("!!!"), and
# Markdown: markup, code fences (left unread with read_code off).
FRAGMENTS = st.one_of(st.text(alphabet="abcdefghij .,!?;:'-12\n", min_size=1, max_size=9),
                      st.sampled_from(["!!! ", " --- ", "... ", "  ", "\n\n", "\n```\n",
                                       "``", "`x` ", "**b** ", "# ", "| - |\n", "你好。",
                                       "「引用」、", "Dr.", " 3.14 ", "e.g. ",
                                       "https://a.b/c ", "…", "\u200b", "\t"]))
OPS = st.one_of(
    st.tuples(st.just("text"), st.sampled_from(SIDS), FRAGMENTS),
    st.tuples(st.sampled_from(["flush", "end", "cancel", "close"]), st.sampled_from(SIDS)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.002, 0.02, 0.06])),
)
MAX_PHRASES, MAX_CHUNKS = 2, 3   # small batches, so that a burst must be split


@dataclass
class Driven:
    """What the test sent one stream, as a session would: start, then text / flush / end
    while it is open; cancel and close at any time."""

    sink: Sink = field(default_factory=Sink)
    sent: str = ""
    ended: bool = False
    cancelled: bool = False
    closed_at: int | None = None      # events the sink had when the stream was closed


async def _play(ops: list[tuple], delay_s: float, options: dict[str, StreamOptions],
                arriving_step_ms: float, poison_letters: int | None, lookahead_ms: float) -> None:
    engine = FakeEngine(schedule=(2, 4, 8), delay_s=delay_s)
    if poison_letters is not None:   # the model fails on every phrase of this many letters
        engine.poison_ids = 3 + 2 * poison_letters     # FakePhonemizer: 2 ids a letter, 3 more
    # A lookahead far beyond the texts' audio (nothing waits for a listener to play its
    # audio), or short enough that the listeners' clocks pace the work.
    sched = new_scheduler(engine, lookahead_ms=lookahead_ms, max_batch_phrases=MAX_PHRASES,
                          max_batch_chunks=MAX_CHUNKS, arriving_step_ms=arriving_step_ms)
    task = asyncio.create_task(sched.run())
    streams: dict[str, Driven] = {}

    def stream(sid: str) -> Driven:
        """A stream starts with the first command for it, as a session's `start` would."""
        if sid not in streams:
            streams[sid] = Driven()
            sched.open(sid, options[sid], streams[sid].sink)
        return streams[sid]

    try:
        for op in ops:
            if op[0] == "wait":
                await asyncio.sleep(op[1])
                continue
            kind, sid = op[0], op[1]
            d = stream(sid)
            live = d.closed_at is None and not d.cancelled
            if kind == "close" and d.closed_at is None:
                sched.close(sid)
                d.closed_at = len(d.sink.events)
            elif kind == "cancel" and live:
                sched.cancel(sid)
                d.cancelled = True
            elif live and not d.ended:
                if kind == "text":
                    sched.text(sid, op[2])
                    d.sent += op[2]
                elif kind == "flush":
                    sched.flush(sid)
                elif kind == "end":
                    sched.end(sid)
                    d.ended = True
        for sid in SIDS:
            d = stream(sid)
            if d.closed_at is None and not d.cancelled and not d.ended:
                sched.end(sid)
                d.ended = True
        waiting = [d.sink.done.wait() for d in streams.values() if d.closed_at is None]
        await asyncio.wait_for(asyncio.gather(*waiting), 20)
        await asyncio.sleep(0.05)   # anything still to come (there must be none) comes now
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    for sid, d in streams.items():
        kinds = d.sink.kinds()
        if d.closed_at is not None:
            assert len(d.sink.events) == d.closed_at, (sid, kinds[d.closed_at:])
            continue
        errors = [e for e in d.sink.events if e[0] == "error"]
        assert poison_letters is not None or not errors, (sid, errors)
        assert all(e[1] == "internal" for e in errors), (sid, errors)
        ends = [k for k in kinds if k in ("done", "cancelled", "error")]
        assert len(ends) == 1 and kinds[-1] == ends[0], (sid, kinds)
        assert ends[0] != "cancelled" or d.cancelled, (sid, kinds)
        phrases = d.sink.phrases()
        assert [p.id for p in phrases] == list(range(len(phrases)))
        captions = "".join(p.space_before + p.text for p in phrases)
        if ends[0] == "done":
            assert captions == d.sent.rstrip(), (sid, captions, d.sent)
            assert d.sink.events[-1][1]["chars"] == len(d.sent)
        else:
            assert d.sent.startswith(captions), (sid, captions, d.sent)
        if d.sink.audio():
            check_timeline(d.sink)
    for kind, n in engine.calls:
        assert n <= (MAX_PHRASES if kind == "acoustic" else MAX_CHUNKS), engine.calls
    assert sched.stream_count == 0 and not sched._streams and len(sched._timers) == 0
    assert not (sched._dirty or sched._ready or sched._held or sched._arriving)
    assert not any(sid in sched.meter for sid in SIDS)


OPTIONS = st.builds(
    StreamOptions, params=st.just(SynthesisParams()),
    max_buffer_delay_ms=st.sampled_from([0.0, 50.0, 1000.0]), words=st.booleans(),
    markdown=st.booleans(), read_code=st.booleans(), catch_up=st.sampled_from([1.0, 1.5, 2.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=40), delay_s=st.sampled_from([0.0, 0.003]),
       options=st.fixed_dictionaries({sid: OPTIONS for sid in SIDS}),
       arriving_step_ms=st.sampled_from([0.0, 60.0]),
       poison_letters=st.one_of(st.none(), st.integers(1, 6)),
       lookahead_ms=st.sampled_from([60_000.0, 300.0]))
def test_any_interleaving_of_commands_ends_every_stream_once_and_leaves_nothing(
    ops: list[tuple], delay_s: float, options: dict[str, StreamOptions], arriving_step_ms: float,
    poison_letters: int | None, lookahead_ms: float,
) -> None:
    asyncio.run(_play(ops, delay_s, options, arriving_step_ms, poison_letters, lookahead_ms))
