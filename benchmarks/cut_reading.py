"""How phrases cut inside a clause for first audio sound: the cut phrase read as a sentence's
end and the next as a sentence's start, or, read across the cut (`scheduler.read_across`), as
the inside of one sentence.

Each sentence of the fixed text (benchmarks/texts.py) and a few replies an LLM opens with are
cut where a first phrase is cut early: after the first three words or more, at the first word
that is no function word and carries no punctuation ("The old lighthouse | keeper ..."). Each
side is read offline with the real phonemizer, acoustic model and vocoder, each with the same
seeds, and compared with the same word in the whole sentence read at once:

  last_word   the cut phrase's last word: the phrase `alone` (as before read_across), or
              `read_on` into "could", its audio ending with its last word (as sent now)
  next_word   the next phrase's first word: the rest of the sentence `alone`, or `read_from`
              the cut phrase's last word, its audio starting at the space before its first
              word (as sent now)

For each: the word's length (its phonemes and the pad after them) as a ratio to its length in
the whole sentence (mean over cuts and seeds), and the mean absolute difference (dB) of its log
spectrum (86 Hz - 4 kHz, 46 ms windows, time-normalized to 24 steps) from the word in the
whole sentence over every pair of seeds; `whole_vs_whole`: the same between two seeds of the
whole sentence, the floor. And where the audio is cut: the level of the last frame sent of a
phrase read on (a loud one would click) and of the first frame sent of one read from (before
the server's 5 ms fade-in).

    python benchmarks/cut_reading.py --seeds 0 1 2 3 --json
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.offline import (default_voice_models, frame_rms_db, read_whole,  # noqa: E402
                               seeded_args)
from benchmarks.texts import SENTENCES  # noqa: E402

REPLIES = ["I think the best way to start is with a quick summary of the plan.",
           "Here is a short list of the steps you will need.",
           "Let me look into that for you right away.",
           "We should probably leave before the traffic gets worse.",
           "The quarterly report arrived on time this morning."]
MIN_WORDS = 3
SPECTRUM_STEPS = 24


def cut_of(sentence: str, function_words: frozenset[str]) -> tuple[str, int] | None:
    """The sentence's first words up to the first cut a first phrase may end at (at least
    MIN_WORDS, its last word no function word and without punctuation), and that word's
    index; None if there is none before its last word."""
    words = sentence.split()
    for k in range(MIN_WORDS - 1, len(words) - 1):
        word = words[k]
        if word.isalpha() and word.lower() not in function_words:
            return " ".join(words[: k + 1]), k
    return None


def log_spectrum(audio: np.ndarray) -> np.ndarray:
    """Log magnitude (dB) over 86 Hz - 4 kHz, 1024-sample windows every 128, resampled in time
    to SPECTRUM_STEPS steps."""
    n, step = 1024, 128
    window = np.hanning(n)
    frames = []
    for i in range(0, max(1, len(audio) - n), step):
        x = np.pad(audio[i:i + n], (0, max(0, n - len(audio[i:i + n]))))
        frames.append(20 * np.log10(np.abs(np.fft.rfft(x * window)) + 1e-5))
    spec = np.array(frames)[:, 4:186]
    t = np.linspace(0, len(spec) - 1, SPECTRUM_STEPS)
    return np.stack([np.interp(t, np.arange(len(spec)), spec[:, j])
                     for j in range(spec.shape[1])], axis=1)


def read(engine, ph, seed: int, word: int, skip: set[int]) -> dict[str, Any]:
    """One reading: the word's length (frames from its first phoneme, ids in `skip` (space,
    pad) passed over, to the end of the pad after its last), its log spectrum (its phonemes),
    and the levels of the first and last frames sent (read from / read on)."""
    _, audio, cum = read_whole(engine, ph.ids, seed)
    db = frame_rms_db(audio, engine.hop_length)
    w = ph.words[word]
    first = w.first_id
    while first < w.end_id - 1 and ph.ids[first] in skip:
        first += 1
    hop = engine.hop_length
    return {"length": int(cum[w.end_id] - cum[first]),
            "spectrum": log_spectrum(audio[int(cum[first]) * hop: int(cum[w.end_id - 1]) * hop]),
            "end_dbfs": float(db[int(cum[ph.words[-1].end_id]) - 1]),
            "start_dbfs": float(db[int(cum[ph.read_from])]) if ph.read_from is not None else None}


def spectral_distance(a: list[np.ndarray], b: list[np.ndarray], same: bool = False) -> float:
    pairs = itertools.combinations(range(len(a)), 2) if same else itertools.product(
        range(len(a)), range(len(b)))
    return float(np.mean([np.mean(np.abs(a[i] - b[j])) for i, j in pairs]))


class Comparison:
    """One word's readings against its reading in the whole sentence, over the cuts."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.ratios: dict[str, list[float]] = {n: [] for n in names}
        self.distances: dict[str, list[float]] = {n: [] for n in (*names, "whole_vs_whole")}

    def add(self, got: dict[str, list[dict[str, Any]]]) -> None:
        whole_len = statistics.mean(r["length"] for r in got["whole"])
        whole_spec = [r["spectrum"] for r in got["whole"]]
        for name in self.names:
            self.ratios[name].append(statistics.mean(r["length"] for r in got[name]) / whole_len)
            self.distances[name].append(
                spectral_distance([r["spectrum"] for r in got[name]], whole_spec))
        self.distances["whole_vs_whole"].append(spectral_distance(whole_spec, whole_spec, True))

    def report(self) -> dict[str, Any]:
        return {"length_ratio": {k: round(statistics.mean(v), 3) for k, v in self.ratios.items()},
                "spectrum_db": {k: round(statistics.mean(v), 2) for k, v in self.distances.items()}}


def levels(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "loudest": round(max(values), 1)}


def measure(seeds: list[int], sentences: list[str]) -> dict[str, Any]:
    from streaming_tts.text.splitter import function_words_for, read_on_word_for

    voice, engine, phonemizer = default_voice_models()
    ids = voice.config.phoneme_id_map
    skip = {*ids[" "], *ids["_"]}
    more = phonemizer.phonemize(read_on_word_for(voice.config.language))
    function_words = function_words_for(voice.config.language)
    last, following = Comparison(("alone", "read_on")), Comparison(("alone", "read_from"))
    ends, starts, cuts = [], [], []
    for sentence in sentences:
        found = cut_of(sentence, function_words)
        if found is None:
            continue
        text, k = found
        cuts.append(text)
        words = sentence.split()
        whole = phonemizer.phonemize(sentence)
        alone, rest = phonemizer.phonemize(text), phonemizer.phonemize(" ".join(words[k + 1:]))
        for comparison, readings in (
                (last, {"alone": (alone, k), "read_on": (phonemizer.read_on(alone, more), k),
                        "whole": (whole, k)}),
                (following, {"alone": (rest, 0), "whole": (whole, k + 1), "read_from": (
                    phonemizer.read_from(phonemizer.phonemize(words[k]), rest), 0)})):
            got = {name: [read(engine, ph, seed, at, skip) for seed in seeds]
                   for name, (ph, at) in readings.items()}
            comparison.add(got)
            ends.extend(r["end_dbfs"] for r in got.get("read_on", []))
            starts.extend(r["start_dbfs"] for r in got.get("read_from", []))
    return {"cuts": cuts, "seeds": seeds, "last_word": last.report(),
            "next_word": following.report(), "read_on_end_dbfs": levels(ends),
            "read_from_start_dbfs": levels(starts)}


def main(argv: list[str] | None = None) -> int:
    args = seeded_args(__doc__, [0, 1, 2, 3], argv)
    r = measure(args.seeds, SENTENCES + REPLIES)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{len(r['cuts'])} cuts x {len(args.seeds)} seeds, e.g. " + " | ".join(r["cuts"][:3]))
    for key, title, names in (("last_word", "the cut phrase's last word", ("alone", "read_on")),
                              ("next_word", "the next phrase's first word", ("alone", "read_from"))):
        c = r[key]
        print(f"{title}, against the whole sentence's:")
        for name in names:
            print(f"  {name:9s} length x{c['length_ratio'][name]:.2f}  spectrum "
                  f"{c['spectrum_db'][name]:.2f} dB")
        print(f"  (whole against whole, other seeds: spectrum {c['spectrum_db']['whole_vs_whole']:.2f} dB)")
    e, s0 = r["read_on_end_dbfs"], r["read_from_start_dbfs"]
    print(f"read_on: the last frame sent at {e['median']} dBFS (median), {e['loudest']} loudest")
    print(f"read_from: the first frame sent at {s0['median']} dBFS (median), {s0['loudest']} "
          "loudest (before the 5 ms fade-in)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
