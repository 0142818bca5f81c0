"""What the offline benchmarks (cut_reading.py, word_onsets.py) share: the default voice's
phonemizer, acoustic model and vocoder in this process, and their command line."""

from __future__ import annotations

import argparse

import numpy as np


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


def read_whole(engine, ids, seed: int):
    """One reading of `ids` with the voice's defaults and `seed`, decoded whole: the acoustic
    result, the audio, and each id's start frame (one extra: the end)."""
    from streaming_tts.engine import AcousticJob
    from streaming_tts.params import SynthesisParams

    res = engine.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), seed=seed)])[0]
    return res, engine.decode_whole(res.z), np.concatenate([[0], np.cumsum(res.durations)])


def frame_rms_db(audio: np.ndarray, hop: int) -> np.ndarray:
    """The level (dBFS) of each whole frame of `hop` samples."""
    n = len(audio) // hop
    frames = audio[: n * hop].reshape(n, hop).astype(np.float64)
    return 20 * np.log10(np.sqrt(np.mean(frames ** 2, axis=1)) + 1e-12)
