"""The cut-reading benchmark: where it cuts, and a run that compares what it claims to."""

import numpy as np

from benchmarks.cut_reading import SPECTRUM_STEPS, cut_of, log_spectrum, measure
from streaming_tts.text.splitter import ENGLISH_FUNCTION_WORDS


def test_the_cut_is_after_three_words_at_the_first_that_is_no_function_word() -> None:
    fw = ENGLISH_FUNCTION_WORDS
    assert cut_of("The old lighthouse keeper climbed the stairs.", fw) == ("The old lighthouse", 2)
    assert cut_of("He carried a small brass lantern.", fw) == ("He carried a small", 3)
    assert cut_of("From the top, the whole bay spread out.", fw) == ("From the top, the whole", 4)
    assert cut_of("It is so.", fw) is None          # no cut before its last word


def test_a_log_spectrum_has_its_steps_and_sees_a_tone() -> None:
    t = np.arange(22050 // 4) / 22050
    spec = log_spectrum((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert spec.shape == (SPECTRUM_STEPS, 182)
    assert int(np.argmax(spec[SPECTRUM_STEPS // 2])) + 4 == round(1000 * 1024 / 22050)


def test_a_run_compares_each_reading_with_the_whole_sentence() -> None:
    r = measure([0, 1], ["The quarterly report arrived on time this morning.",
                         "Here is a short list of the steps you will need."])
    assert r["cuts"] == ["The quarterly report", "Here is a short"]
    last, nxt = r["last_word"], r["next_word"]
    # Read alone, the last word is drawn out; read on, it is about its length in the sentence.
    assert last["length_ratio"]["alone"] > 1.2 > last["length_ratio"]["read_on"] > 0.8
    assert last["spectrum_db"]["read_on"] < last["spectrum_db"]["alone"]
    # Read from the word before it, the next phrase's first word is nearer its reading in the
    # sentence than read alone.
    assert nxt["spectrum_db"]["read_from"] < nxt["spectrum_db"]["alone"]
    assert set(nxt["length_ratio"]) == {"alone", "read_from"}
    assert last["spectrum_db"]["whole_vs_whole"] > 0 and nxt["spectrum_db"]["whole_vs_whole"] > 0
    assert r["read_on_end_dbfs"]["median"] < -40
    assert r["read_from_start_dbfs"]["median"] < 0
