"""What reading written forms as said (`start.normalize`) costs on the text thread.

Phonemizing runs in the scheduler's text thread ahead of each phrase's model step, so what
normalization adds there is added to a listener's first audio. For two texts, an LLM's reply
full of forms espeak-ng misreads (`LLM_REPLY`) and plain prose (benchmarks/texts.py), this
reports per word the time of `read_aloud` alone and of the phonemizer with and without it
(medians over `--reps` passes, sentence by sentence as the server phonemizes phrases), and how
many words read differently. With `--nemo`, NVIDIA's WFST normalizer (`nemo_text_processing`,
not a dependency; install it in another environment and point `--nemo-python` at it) is timed
on the same sentences, grammar build or cache load included, for comparison.

    python benchmarks/normalize.py --json [--reps 20] [--nemo --nemo-python /path/to/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.texts import SENTENCES  # noqa: E402
from streaming_tts.text.normalize import read_aloud  # noqa: E402
from streaming_tts.text.phonemes import Phonemizer  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402

LLM_REPLY = [
    "Sure! The plan costs $1,234.56 a year, or about $103 a month.",
    "Dr. Smith vs. Mr. Jones: the case was settled in the 1990s for $2.5 million.",
    "The trail is 5 km long, climbs 300 ft, and takes 2 hrs at 20°C.",
    "Download the 8GB image from https://www.example.com/downloads?id=42 today.",
    "Call (555) 123-4567 before 2026-12-01 to book pages 10-20 of the report.",
    "It runs 3x faster on a 3.5GHz chip 😀, roughly 1/2 the cost of last year's #1 model.",
]

_NEMO_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from nemo_text_processing.text_normalization.normalize import Normalizer
n = Normalizer(input_case="cased", lang="en", cache_dir=sys.argv[1])
load = time.perf_counter() - t0
sentences, reps = json.loads(sys.argv[2]), int(sys.argv[3])
per = []
for s in sentences:
    n.normalize(s)
    times = []
    for _ in range(reps):
        t = time.perf_counter(); n.normalize(s); times.append(time.perf_counter() - t)
    per.append(min(times))
print(json.dumps({"load_s": load, "sentence_ms": [1000 * t for t in per]}))
"""


def _per_word_us(fn, sentences: list[str], reps: int) -> float:
    """Median over passes of the time per word of fn over all sentences, in microseconds."""
    words = sum(len(s.split()) for s in sentences)
    passes = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in sentences:
            fn(s)
        passes.append((time.perf_counter() - t0) / words * 1e6)
    return statistics.median(passes)


def measure(texts: dict[str, list[str]], reps: int) -> dict:
    phonemizer = Phonemizer(VoiceRegistry().default().config)
    out = {}
    for name, sentences in texts.items():
        for s in sentences:                      # warm: espeak's first calls are slower
            phonemizer.phonemize(s, normalize=True)
        tokens = [s.split() for s in sentences]
        changed = sum(r != t for toks in tokens for r, t in zip(read_aloud(toks), toks))
        out[name] = {
            "words": sum(map(len, tokens)),
            "words_read_differently": changed,
            "read_aloud_us_per_word": round(_per_word_us(lambda s: read_aloud(s.split()),
                                                         sentences, reps), 1),
            "phonemize_us_per_word": round(_per_word_us(phonemizer.phonemize, sentences, reps), 1),
            "phonemize_normalized_us_per_word": round(_per_word_us(
                lambda s: phonemizer.phonemize(s, normalize=True), sentences, reps), 1),
        }
    return out


def nemo(python: str, sentences: list[str], reps: int, cache_dir: str) -> dict:
    done = subprocess.run([python, "-c", _NEMO_SCRIPT, cache_dir, json.dumps(sentences), str(reps)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ms = result["sentence_ms"]
    return {"load_s": round(result["load_s"], 1), "sentence_ms_min": round(min(ms), 1),
            "sentence_ms_max": round(max(ms), 1), "sentence_ms_median": round(statistics.median(ms), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--nemo", action="store_true", help="also time nemo_text_processing")
    ap.add_argument("--nemo-python", default=sys.executable,
                    help="a Python with nemo_text_processing installed")
    ap.add_argument("--nemo-cache", default="/tmp/nemo-cache", help="its grammar cache")
    args = ap.parse_args(argv)
    out = measure({"llm_reply": LLM_REPLY, "prose": SENTENCES}, args.reps)
    if args.nemo:
        out["nemo_llm_reply"] = nemo(args.nemo_python, LLM_REPLY, min(args.reps, 5), args.nemo_cache)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
