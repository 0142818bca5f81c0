"""What the offline benchmarks (cut_reading.py, word_onsets.py) share: the default voice's
phonemizer, acoustic model and vocoder in this process, and their command line."""

from __future__ import annotations

import argparse


def default_voice_models():
    """The default voice, its engine (not warmed up: these runs time nothing) and phonemizer."""
    from streaming_tts.engine import Engine
    from streaming_tts.text.phonemes import Phonemizer
    from streaming_tts.voices import VoiceRegistry

    voice = VoiceRegistry().default()
    engine = Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate)
    return voice, engine, Phonemizer(voice.config)


def seeded_args(doc: str, seeds: list[int], argv: list[str] | None) -> argparse.Namespace:
    """`--seeds` (the noise seeds each phrase is read with) and `--json`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)
