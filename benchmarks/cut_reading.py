"""How a phrase cut inside a clause for first audio sounds: its last word read as the end of a
sentence, or, read on into a word never heard (`scheduler.read_on`), as inside one.

Each sentence of the fixed text (benchmarks/texts.py) and a few replies an LLM opens with are
cut where a first phrase is cut early: after the first three words or more, at the first word
that is no function word and carries no punctuation ("The old lighthouse | keeper ..."). The
cut phrase is read three ways, offline with the real phonemizer, acoustic model and vocoder,
each with the same seeds:

  alone     the phrase by itself, as the server read it before `read_on`
  read_on   the phrase read on into "could", its audio ending with its last word (as sent)
  whole     the whole sentence: the reading a listener expects

and for the cut phrase's last word it reports against `whole`:

  length      its length (as its `words` item: the space before it, its phonemes, the pad
              after them) as a ratio to its length in `whole`, mean over cuts and seeds
  spectrum    mean absolute difference (dB) of its log spectrum (86 Hz - 4 kHz, 46 ms windows,
              time-normalized to 24 steps) against the word in `whole`, over every pair of seeds;
              `whole_vs_whole`: the same between two seeds of `whole`, the floor
  end_dbfs    for read_on only: the level of the last frame sent, median and loudest
              (where the audio stops: a loud one would click)

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

from benchmarks.offline import default_voice_models, seeded_args  # noqa: E402
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


def read(engine, ph, seed: int, word: int) -> dict[str, Any]:
    """One reading: the word's length (frames: the space before it, its phonemes and the pad
    after them, as its `words` item), its log spectrum (its phonemes only), and the level of
    the last frame sent."""
    from streaming_tts.engine import AcousticJob
    from streaming_tts.params import SynthesisParams

    res = engine.acoustic([AcousticJob(ids=ph.ids, params=SynthesisParams(), seed=seed)])[0]
    audio = engine.decode_whole(res.z)
    cum = np.concatenate([[0], np.cumsum(res.durations)])
    w = ph.words[word]
    hop = engine.hop_length
    sent_end = int(cum[ph.words[-1].end_id]) if ph.read_on_from is not None else res.num_frames
    last = audio[(sent_end - 1) * hop: sent_end * hop].astype(np.float64)
    return {"length": int(cum[w.end_id] - cum[w.first_id]),
            "spectrum": log_spectrum(audio[int(cum[w.first_id]) * hop: int(cum[w.end_id - 1]) * hop]),
            "end_dbfs": float(20 * np.log10(np.sqrt(np.mean(last ** 2)) + 1e-12))}


def spectral_distance(a: list[np.ndarray], b: list[np.ndarray], same: bool = False) -> float:
    pairs = itertools.combinations(range(len(a)), 2) if same else itertools.product(
        range(len(a)), range(len(b)))
    return float(np.mean([np.mean(np.abs(a[i] - b[j])) for i, j in pairs]))


def measure(seeds: list[int], sentences: list[str]) -> dict[str, Any]:
    from streaming_tts.text.splitter import function_words_for, read_on_word_for

    voice, engine, phonemizer = default_voice_models()
    more = phonemizer.phonemize(read_on_word_for(voice.config.language))
    function_words = function_words_for(voice.config.language)
    ratios: dict[str, list[float]] = {"alone": [], "read_on": []}
    distances: dict[str, list[float]] = {"alone": [], "read_on": [], "whole_vs_whole": []}
    ends, cuts = [], []
    for sentence in sentences:
        found = cut_of(sentence, function_words)
        if found is None:
            continue
        text, k = found
        cuts.append(text)
        alone = phonemizer.phonemize(text)
        readings = {"alone": alone, "read_on": phonemizer.read_on(alone, more),
                    "whole": phonemizer.phonemize(sentence)}
        got = {name: [read(engine, ph, seed, k) for seed in seeds] for name, ph in readings.items()}
        whole_len = statistics.mean(r["length"] for r in got["whole"])
        whole_spec = [r["spectrum"] for r in got["whole"]]
        for name in ("alone", "read_on"):
            ratios[name].append(statistics.mean(r["length"] for r in got[name]) / whole_len)
            distances[name].append(spectral_distance([r["spectrum"] for r in got[name]], whole_spec))
        distances["whole_vs_whole"].append(spectral_distance(whole_spec, whole_spec, same=True))
        ends.extend(r["end_dbfs"] for r in got["read_on"])
    return {"cuts": cuts, "seeds": seeds,
            "length_ratio": {k: round(statistics.mean(v), 3) for k, v in ratios.items()},
            "spectrum_db": {k: round(statistics.mean(v), 2) for k, v in distances.items()},
            "read_on_end_dbfs": {"median": round(statistics.median(ends), 1),
                                 "loudest": round(max(ends), 1)}}


def main(argv: list[str] | None = None) -> int:
    args = seeded_args(__doc__, [0, 1, 2, 3], argv)
    r = measure(args.seeds, SENTENCES + REPLIES)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{len(r['cuts'])} cuts x {len(args.seeds)} seeds, e.g. " + " | ".join(r["cuts"][:3]))
    print("the cut phrase's last word against the whole sentence's:")
    for name in ("alone", "read_on"):
        print(f"  {name:8s} length x{r['length_ratio'][name]:.2f}  spectrum "
              f"{r['spectrum_db'][name]:.2f} dB")
    print(f"  (whole against whole, other seeds: spectrum {r['spectrum_db']['whole_vs_whole']:.2f} dB)")
    e = r["read_on_end_dbfs"]
    print(f"read_on: the last frame sent at {e['median']} dBFS (median), {e['loudest']} loudest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
