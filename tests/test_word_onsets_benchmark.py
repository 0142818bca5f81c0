"""The word-onset benchmark: it finds where a word's sound starts, and what it reports."""

import numpy as np

from benchmarks.word_onsets import first_above, frame_rms_db, measure, measure_phrase, summary


def test_a_sounds_start_is_the_first_frame_above_the_threshold() -> None:
    hop = 4
    audio = np.concatenate([np.full(2 * hop, 1e-5), np.full(hop, 0.01), np.full(hop, 0.5)])
    db = frame_rms_db(audio.astype(np.float32), hop)
    assert db.round().tolist() == [-100, -100, -40, -6]
    assert first_above(db, 0, 4, -50.0) == 2
    assert first_above(db, 0, 4, -30.0) == 3
    assert first_above(db, 3, 4, -50.0) == 3 and first_above(db, 0, 2, -50.0) is None


def test_the_summary_counts_late_and_early_in_ms() -> None:
    s = summary([0, 1, -1, 5, -3], frame_ms=10.0)
    assert s == {"count": 5, "median_ms": 0.0, "latest_ms": 50.0, "earliest_ms": -30.0,
                 "within_one_frame": 0.6}
    assert summary([], 10.0) == {"count": 0}


def test_the_first_word_of_the_old_lighthouse_is_late_by_the_durations_not_as_sent(
        engine, default_phonemizer) -> None:
    # The durations start "The" 3-6 frames after its "Th" sounds; the start sent is its sound's.
    found = measure_phrase(engine, default_phonemizer,
                           "The old lighthouse keeper climbed the spiral stairs, every evening.", 1)
    [late], [sent] = found["first_durations"], found["first_sent"]
    assert late >= 3 and abs(sent) <= 1
    assert len(found["after_comma"]) == 1


def test_a_run_reports_each_kind_of_word() -> None:
    result = measure([1], ["Sure, I can help.", "The old lighthouse, at dusk."])
    assert result["phrases"] == 2 and result["frame_ms"] > 11
    assert result["first_durations"]["count"] == result["first_sent"]["count"] == 2
    assert result["after_comma"]["count"] == 2
    assert result["first_sent"]["within_one_frame"] == 1.0
