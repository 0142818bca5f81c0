"""Where the server cuts phrases when text arrives at a given pace, and what the cuts cost.

Text that arrives at about the voice's own pace (live captions at 3 words/s, a slow LLM at 5)
is cut into phrases by timers (`max_buffer_delay_ms`, the first-phrase wait) as much as by
punctuation, and every cut costs the listener a pause and a drawn-out word before it. This runs
the server's own scheduler and splitter (built by `server.model.build_scheduler` from the
config, so the voice's function words apply) with the real phonemizer and acoustic model, and
the vocoder replaced by an instant one (the server of a fast GPU; `--real-vocoder` keeps it),
feeds each text word by word at each pace, and reports per run:

  phrases      phrases spoken
  mid_clause   phrases (but the last) that end in no punctuation: cuts a reader would not make
  after_function_word  of those, cuts right after a function word ("of", "the", "to")
  single_word  phrases of one word
  audio_ms     the stream's audio (pauses at cuts, and silence while text waits, included),
               against `offline_ms`, the sentences synthesized whole
  lag_p50_s, lag_max_s  from a word's arrival to the listener hearing it (a listener playing
               from the first audio in real time, pausing when it runs dry)
  ttfa_ms      first text to first audio

    python benchmarks/phrasing.py --wps 3 5 15 0 --json      # 0: all the text at once
    python benchmarks/phrasing.py --wps 3 --delay-ms 1000     # a client's max_buffer_delay_ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import load_config  # noqa: E402
from server.model import LoadedModel, build_scheduler, load_engine  # noqa: E402
from streaming_tts.cli import split_sentences  # noqa: E402
from streaming_tts.engine import AcousticJob, Engine, SynthesisParams  # noqa: E402
from streaming_tts.scheduler import Scheduler  # noqa: E402
from streaming_tts.stream import PhraseEvent, StreamOptions  # noqa: E402
from streaming_tts.text.phonemes import Phonemizer  # noqa: E402
from streaming_tts.text.splitter import function_words_for  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402

TEXTS = {
    "story": ("When the storm finally passed, the villagers came out of their houses to inspect "
              "the damage. Several roofs had been torn away, and the old bridge over the river "
              "was gone. Nobody had been hurt, which everyone agreed was a small miracle. By "
              "evening, neighbours were already sharing tools, food and dry blankets with each "
              "other."),
    "chat": ("Sure! Here is a quick summary of the report. The results of the study show that "
             "most people prefer shorter meetings, and that they are more productive in the "
             "morning. Well, to be honest, I think the meeting could have been an email. Yes, I "
             "think the team agrees with that."),
    # An LLM's answer full of numbers with units, prices and times: where a cut may not fall.
    "numbers": ("It is 5 km from the station, about 12 minutes on foot. Tickets cost $4.50, or "
                "$30 for a week. The last train leaves at 11 pm, and the first one at 6 am. We "
                "got 3 GB of photos from the trip, and 1,200 people came to the show."),
}
_ENDS_IN_MARK = re.compile(r"[.,;:!?\u2026\u2013\u2014][\"'\u201d\u2019)\]]*$")


@dataclass
class Listener:
    """The stream's sink: what a client would receive, with arrival times."""

    sample_rate: int
    phrases: list[PhraseEvent] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)   # (arrival, pts_ms)
    usage: dict | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_phrase(self, phrase: PhraseEvent) -> None:
        self.phrases.append(phrase)

    def on_audio(self, samples: np.ndarray, pts_ms: float) -> None:
        self.audio.append((time.monotonic(), pts_ms))

    def on_done(self, usage: dict) -> None:
        self.usage = usage
        self.done.set()

    def on_cancelled(self, usage: dict | None) -> None:
        self.done.set()

    def on_error(self, code: str, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")

    def hears(self) -> callable:
        """Wall time at which a listener playing from the first audio hears timeline ms."""
        t0, stall, marks = self.audio[0][0], 0.0, []
        for arrival, pts in self.audio:
            due = t0 + pts / 1000.0 + stall
            stall += max(0.0, arrival - due)
            marks.append((pts, stall))

        def at(ms: float) -> float:
            behind = max((s for pts, s in marks if pts <= ms), default=0.0)
            return t0 + ms / 1000.0 + behind
        return at


def offline_ms(engine: Engine, phonemizer: Phonemizer, text: str, params: SynthesisParams) -> float:
    """The text's sentences synthesized whole, one after another (as `synth` does)."""
    frames = 0
    for sentence in split_sentences(text):
        ids = phonemizer.phonemize(sentence).ids
        frames += engine.acoustic([AcousticJob(ids=ids, params=params, seed=0)])[0].num_frames
    return frames * engine.frame_ms


async def feed(scheduler: Scheduler, name: str, text: str, wps: float, params: SynthesisParams,
               sample_rate: int, function_words: frozenset[str], delay_ms: float) -> dict:
    sink = Listener(sample_rate)
    scheduler.open(name, StreamOptions(params=params, max_buffer_delay_ms=delay_ms), sink)
    words = text.split(" ")
    start = time.monotonic()
    if wps:
        arrivals = []
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(1.0 / wps)
            arrivals.append(time.monotonic())
            scheduler.text(name, word if i == 0 else " " + word)
    else:
        scheduler.text(name, text)
        arrivals = [start] * len(words)
    scheduler.end(name)
    await asyncio.wait_for(sink.done.wait(), 300)
    hears = sink.hears()
    spoken = [w for p in sink.phrases for w in p.words]
    lags = [hears(w[1]) - arrived for w, arrived in zip(spoken, arrivals)]
    cuts = [p.text for p in sink.phrases[:-1] if not _ENDS_IN_MARK.search(p.text)]
    return {
        "phrases": len(sink.phrases),
        "mid_clause": len(cuts),
        "after_function_word": sum(c.split()[-1].lower() in function_words for c in cuts),
        "single_word": sum(len(p.text.split()) == 1 for p in sink.phrases),
        "audio_ms": round(sink.usage["audio_ms"]),
        "lag_p50_s": round(statistics.median(lags), 2),
        "lag_max_s": round(max(lags), 2),
        "ttfa_ms": round((sink.audio[0][0] - start) * 1000.0),
        "texts": [p.text for p in sink.phrases],
    }


async def measure(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(Path(args.config) if args.config else None)
    voice = VoiceRegistry(cfg.engine.voices_dir).resolve(cfg.engine.voice)
    engine = load_engine(voice, cfg)
    engine.warmup(max_batch=1)
    phonemizer = Phonemizer(voice.config)
    if not args.real_vocoder:
        def instant(jobs):
            return [np.zeros((j.end - j.start) * engine.hop_length, np.float32) for j in jobs]
        engine.decode = instant
    params = SynthesisParams(noise_scale=0.0, noise_w=0.0, length_scale=voice.config.length_scale)
    scheduler = build_scheduler(LoadedModel(engine, phonemizer, None), cfg, observer=None,
                                power_reader=lambda: None)
    task = asyncio.create_task(scheduler.run())
    words = function_words_for(voice.language)
    results = []
    try:
        for name in args.texts:
            text = TEXTS[name]
            reference = offline_ms(engine, phonemizer, text, params)
            for wps in args.wps:
                run = await feed(scheduler, f"{name}-{wps}", text, wps, params,
                                 voice.sample_rate, words, args.delay_ms)
                results.append({"text": name, "wps": wps, "offline_ms": round(reference), **run})
    finally:
        task.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wps", type=float, nargs="+", default=[3.0, 5.0, 15.0, 0.0],
                        help="paces in words per second (0: all the text at once)")
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--config", help="server config (default: configs/default.toml's values)")
    parser.add_argument("--delay-ms", type=float, default=300.0,
                        help="the stream's max_buffer_delay_ms (default 300, the protocol's)")
    parser.add_argument("--real-vocoder", action="store_true",
                        help="decode audio for real (phrase choices then follow this host's speed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(f"{r['text']:5s} {r['wps']:4.0f} words/s: {r['phrases']:2d} phrases, "
              f"{r['mid_clause']:2d} cut mid-clause ({r['after_function_word']} after a function "
              f"word), {r['single_word']:2d} of one word; audio {r['audio_ms']} ms "
              f"(whole sentences {r['offline_ms']}); lag p50 {r['lag_p50_s']} s, max "
              f"{r['lag_max_s']} s; first audio {r['ttfa_ms']} ms")
        print("    " + " | ".join(r["texts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
