"""How well `words` timings line up with the sound: each word's start against where its sound
starts in the audio, offline (the real phonemizer, acoustic model and vocoder; each phrase
decoded whole, with a fixed seed).

Where a word follows silence its sound's start can be read off the audio; elsewhere words run
into each other and there is nothing to compare with. So two kinds of word are measured:

  first       a phrase's first word, after the voice's lead-in (silence, -70 to -95 dBFS):
              its sound starts at the phrase's first frame above -50 dBFS. Reported for the
              start the model's durations give (`durations`) and for the one the server sends
              (`sent`: moved to its sound in the pad before it, `_first_word_onset`).
  after_comma a word after a comma inside the phrase: its sound starts at the first frame above
              -40 dBFS from the end of the word before (the comma's pause can hold that word's
              fading tail and a breath above -50 dBFS). Only the durations place these.

For each: the count, and the error (word start - sound start, in frames and ms; positive: the
caption lights late) as median, the largest late and early, and the share within one frame.

    python benchmarks/word_onsets.py --seeds 1 2 3 --json
"""

from __future__ import annotations

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

# Phrases a reply opens with or a cut leaves at a phrase's start: "s", "sh", "th", vowels,
# stops, glides and nasals first.
OPENINGS = [
    "The quarterly report arrived.", "Sure, I can help with that.", "So, what happened next?",
    "Please hold on, I will check.", "Yes, of course.", "Today the weather is fine.",
    "My name is Joe.", "Well, that depends.", "Can you hear me now?",
    "It was late, and the rain kept falling.", "Hello there, friend.",
    "Nine out of ten, at least.", "Five people, then four, then three.", "Thanks, goodbye.",
    "Visit us soon, okay?", "Zero, one, two.",
]
SOUND_FIRST_DBFS = -50.0
SOUND_AFTER_COMMA_DBFS = -40.0
LOOK_PAST_FRAMES = 10      # a word's sound is looked for up to this far past its durations' start


def first_above(db: np.ndarray, lo: int, hi: int, threshold: float) -> int | None:
    loud = np.flatnonzero(db[lo:hi] > threshold)
    return lo + int(loud[0]) if len(loud) else None


def measure_phrase(engine, phonemizer, text: str, seed: int) -> dict[str, list[int]]:
    """Errors in frames (word start - sound start) of one phrase's words that follow silence."""
    from streaming_tts.scheduler import _first_word_onset, _NewPhrase

    ph = phonemizer.phonemize(text)
    res, audio, cum = read_whole(engine, ph.ids, seed)
    db = frame_rms_db(audio, engine.hop_length)
    out: dict[str, list[int]] = {"first_durations": [], "first_sent": [], "after_comma": []}
    if not ph.words:
        return out
    first = ph.words[0]
    start = int(cum[first.first_id])
    sound = first_above(db, 0, start + LOOK_PAST_FRAMES, SOUND_FIRST_DBFS)
    if sound is not None:
        new = _first_word_onset(_NewPhrase(text, ph, res, [(0, res.num_frames)], audio),
                                engine.hop_length)
        sent = start if new.first_word_at is None else min(start, new.first_word_at)
        out["first_durations"].append(start - sound)
        out["first_sent"].append(sent - sound)
    for before, word in zip(ph.words, ph.words[1:]):
        if not before.text.endswith(","):
            continue
        start = int(cum[word.first_id])
        sound = first_above(db, int(cum[before.end_id]), start + LOOK_PAST_FRAMES,
                            SOUND_AFTER_COMMA_DBFS)
        if sound is not None:
            out["after_comma"].append(start - sound)
    return out


def summary(errors: list[int], frame_ms: float) -> dict[str, Any]:
    if not errors:
        return {"count": 0}
    return {"count": len(errors),
            "median_ms": round(statistics.median(errors) * frame_ms, 1),
            "latest_ms": round(max(errors) * frame_ms, 1),
            "earliest_ms": round(min(errors) * frame_ms, 1),
            "within_one_frame": round(sum(abs(e) <= 1 for e in errors) / len(errors), 3)}


def measure(seeds: list[int], texts: list[str]) -> dict[str, Any]:
    _, engine, phonemizer = default_voice_models()
    errors: dict[str, list[int]] = {"first_durations": [], "first_sent": [], "after_comma": []}
    for text in texts:
        for seed in seeds:
            for kind, found in measure_phrase(engine, phonemizer, text, seed).items():
                errors[kind].extend(found)
    return {"frame_ms": round(engine.frame_ms, 3), "phrases": len(texts), "seeds": seeds,
            **{kind: summary(found, engine.frame_ms) for kind, found in errors.items()}}


def main(argv: list[str] | None = None) -> int:
    args = seeded_args(__doc__, [1, 2, 3], argv)
    result = measure(args.seeds, OPENINGS + SENTENCES)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['phrases']} phrases x {len(args.seeds)} seeds; one frame = {result['frame_ms']} ms")
    for kind in ("first_durations", "first_sent", "after_comma"):
        s = result[kind]
        if not s["count"]:
            print(f"  {kind:16s} none")
            continue
        print(f"  {kind:16s} n={s['count']:3d}  median {s['median_ms']:6.1f} ms  late up to "
              f"{s['latest_ms']:6.1f}  early up to {s['earliest_ms']:6.1f}  within a frame "
              f"{100 * s['within_one_frame']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
