"""`benchmarks/captions.py`: a caption feed's lines, when each is sent, when a real-time player
hears it, and how far behind the feed that is. Its figures (BENCHMARKS.md) are only as good as
this arithmetic; then one short feed through the real server."""

from __future__ import annotations

import pytest

from benchmarks.captions import (Playback, caption_lines, feed, line_latencies, report,
                                  send_times, slope)
from benchmarks.texts import PARAGRAPH
from streaming_tts.engine import Engine
from tests.helpers.app import running


def test_lines_hold_every_word_in_order_within_their_lengths() -> None:
    words = PARAGRAPH.split()
    lines = caption_lines(words, seed=3)
    assert " ".join(lines).split() == words
    assert all(5 <= len(line.split()) <= 10 for line in lines[:-1])
    assert lines == caption_lines(words, seed=3) != caption_lines(words, seed=4)


def test_a_line_is_sent_once_the_words_before_it_were_said() -> None:
    assert send_times(["a b c", "d e", "f"], wps=2.0) == [0.0, 1.5, 2.5]


def test_the_player_plays_in_order_and_waits_for_audio_not_yet_come() -> None:
    player = Playback()
    player.receive(0.0, 500.0, now=1.0)     # heard from 1.0 to 1.5
    player.receive(500.0, 500.0, now=1.2)   # came early: heard from 1.5
    player.receive(1000.0, 500.0, now=3.0)  # came late: the player waited from 2.0 to 3.0
    assert player.played_at(0.0) == 1.0
    assert player.played_at(750.0) == pytest.approx(1.75)
    assert player.played_at(1100.0) == pytest.approx(3.1)
    assert player.audio_s == 1.5
    with pytest.raises(ValueError):
        player.played_at(1500.0)


def test_a_lines_latency_is_from_its_sending_to_its_first_word_heard() -> None:
    player = Playback()
    player.receive(0.0, 2000.0, now=0.1)
    player.receive(2000.0, 2000.0, now=3.0)
    # Line 1 (2 words) sent at 0, its first word at 0 ms; line 2 sent at 1.0, its first word
    # (the third) at 2500 ms, heard 0.5 s after the player resumed at 3.0.
    lat = line_latencies(["a b", "c"], [0.0, 1.0], [0.0, 900.0, 2500.0], player)
    assert lat == pytest.approx([0.1, 2.5])


def test_the_slope_is_how_much_further_behind_each_second() -> None:
    assert slope([0, 1, 2, 3], [1.0, 1.5, 2.0, 2.5]) == pytest.approx(0.5)
    assert slope([0, 1, 2], [0.2, 0.1, 0.2]) == pytest.approx(0.0)
    assert slope([5, 5], [1.0, 2.0]) == 0.0


@pytest.mark.asyncio
async def test_a_short_feed_through_the_server_is_heard_line_by_line(engine: Engine) -> None:
    lines = caption_lines(PARAGRAPH.split(), seed=1)[:3]
    async with running(engine, {"limits.max_text_chars": 1000}) as r:
        got = await feed(r.url("/v1/stream"), lines, wps=6.0, start={"max_speed": 1.5})
    out = report(lines, got["sent"], got["received"], wps=6.0, max_speed=1.5)
    assert out["lines"] == 3 and out["words"] == sum(len(line.split()) for line in lines)
    # Each line is heard after it was sent, and within the speech of the lines before it.
    assert 0 < out["latency_p50_s"] <= out["latency_max_s"] < out["audio_s"]
    assert out["audio_s"] > 0.2 * out["words"] and out["phrases"] >= 3
