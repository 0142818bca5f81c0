"""The normalization benchmark counts what it claims to."""

from benchmarks.normalize import LLM_REPLY, measure
from benchmarks.texts import SENTENCES


def test_it_times_both_texts_and_counts_the_words_read_differently() -> None:
    out = measure({"llm_reply": LLM_REPLY, "prose": SENTENCES[:3]}, reps=1)
    reply, prose = out["llm_reply"], out["prose"]
    assert reply["words"] == sum(len(s.split()) for s in LLM_REPLY)
    assert reply["words_read_differently"] >= 15      # the reply is made of such forms
    assert prose["words_read_differently"] == 0       # ordinary prose reads as written
    for run in (reply, prose):
        assert 0 < run["read_aloud_us_per_word"] and 0 < run["phonemize_us_per_word"]
        assert 0 < run["phonemize_normalized_us_per_word"]
