"""The phrasing benchmark's listener: when a listener hears each word, stalls included; and a
run that counts what it claims to."""

import argparse
import asyncio

import pytest

from benchmarks.phrasing import TEXTS, Listener, measure


def test_the_listener_hears_on_time_and_later_after_running_dry() -> None:
    sink = Listener(sample_rate=22050)
    sink.audio = [(100.0, 0.0), (100.2, 500.0), (101.0, 1000.0)]   # the third 0.5 s late
    hears = sink.hears()
    assert hears(0.0) == pytest.approx(100.0)
    assert hears(700.0) == pytest.approx(100.7)
    assert hears(1200.0) == pytest.approx(101.2)      # after the stall of 0.5 s


def test_a_whole_text_run_counts_its_phrases_and_cuts() -> None:
    args = argparse.Namespace(wps=[0.0], texts=["chat"], config=None, real_vocoder=False,
                              delay_ms=300.0)
    [run] = asyncio.run(measure(args))
    assert run["phrases"] == len(run["texts"]) >= 4
    assert " ".join(run["texts"]).split() == TEXTS["chat"].split()   # every word, once
    # All the text at once: cuts at punctuation only, "Sure!" the first phrase.
    assert run["texts"][0] == "Sure!" and run["mid_clause"] == run["after_function_word"] == 0
    assert run["audio_ms"] >= 0.95 * run["offline_ms"] > 0
    assert 0 < run["lag_p50_s"] <= run["lag_max_s"]


def test_a_reply_full_of_numbers_never_parts_a_number_from_its_unit() -> None:
    # All at once: the eager first cut (delayed flushes: tests/test_splitter.py).
    args = argparse.Namespace(wps=[0.0], texts=["numbers"], config=None, real_vocoder=False,
                              delay_ms=300.0)
    for run in asyncio.run(measure(args)):
        assert " ".join(run["texts"]).split() == TEXTS["numbers"].split()
        for phrase in run["texts"][:-1]:
            last = phrase.split()[-1]
            assert not last[-1].isdigit(), run["texts"]    # "5 | km", "$30 | for", "11 | pm"
