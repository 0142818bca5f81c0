"""Command line: `python -m streaming_tts synth ...` and `python -m streaming_tts voices`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import wave
from pathlib import Path

import numpy as np

from .engine import AcousticJob, Engine, EngineConfig, SynthesisParams
from .text.phonemes import Phonemizer
from .text.splitter import PhraseSplitter
from .voices import UnknownVoiceError, VoiceInfo, VoiceRegistry

log = logging.getLogger("streaming_tts")

_SENTENCE_MODE_MS = 1e9   # tell the splitter plenty of audio is buffered: cut at sentence ends
_BATCH = 8                 # sentences synthesized together


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--voices-dir", type=Path, default=None, help="directory of extra Piper voices")
    common.add_argument("--log-level", default="WARNING")
    ap = argparse.ArgumentParser(prog="python -m streaming_tts",
                                 description="Offline synthesis and voice listing.")
    sub = ap.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", parents=[common], help="synthesize a text file into a 16-bit WAV")
    synth.add_argument("--text-file", type=Path, required=True)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--voice", default=None, help="voice id or path to a .onnx file")
    synth.add_argument("--speaker", type=int, default=0, help="speaker id (multi-speaker voices)")
    synth.add_argument("--speed", type=float, default=1.0, help="0.5 .. 2.0")
    synth.add_argument("--noise-scale", type=float, default=None, help="voice default if omitted")
    synth.add_argument("--noise-w", type=float, default=None, help="voice default if omitted")
    synth.add_argument("--seed", type=int, default=None, help="fix the noise for repeatable output")
    synth.add_argument("--literal", action="store_true",
                       help='read "$5", "Dr.", "5 km" as espeak-ng does (default: as a person says them)')
    synth.add_argument("--device", default="cpu", help="cpu or cuda")
    sub.add_parser("voices", parents=[common], help="list available voices")
    return ap


def split_sentences(text: str) -> list[str]:
    splitter = PhraseSplitter()
    phrases = splitter.push(text, buffered_ms=_SENTENCE_MODE_MS) + splitter.flush()
    return [p.strip() for p in phrases if p.strip()]


def synthesize_text(engine: Engine, phonemizer: Phonemizer, text: str, params: SynthesisParams,
                    seed: int | None = None, normalize: bool = True) -> np.ndarray:
    """Sentences phonemized, synthesized in batches and concatenated, float32 mono."""
    ids = []
    for sentence in split_sentences(text):
        try:
            ids.append(phonemizer.phonemize(sentence, normalize=normalize).ids)
        except ValueError:
            log.debug("skipping unspeakable sentence %r", sentence)
    if not ids:
        raise ValueError("the text has nothing to speak")
    parts = []
    for i in range(0, len(ids), _BATCH):
        jobs = [AcousticJob(x, params, seed=None if seed is None else seed + i + k)
                for k, x in enumerate(ids[i:i + _BATCH])]
        for res in engine.acoustic(jobs):
            parts.append(engine.decode_whole(res.z, speaker=params.speaker))
    return np.concatenate(parts)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def params_for(voice: VoiceInfo, args: argparse.Namespace) -> SynthesisParams:
    if not 0.5 <= args.speed <= 2.0:
        raise ValueError(f"--speed must be between 0.5 and 2.0, got {args.speed}")
    cfg = voice.config
    if not 0 <= args.speaker < max(cfg.num_speakers, 1):
        raise ValueError(f"--speaker {args.speaker} out of range: the voice has {cfg.num_speakers}")
    return SynthesisParams(
        speaker=args.speaker,
        noise_scale=cfg.noise_scale if args.noise_scale is None else args.noise_scale,
        length_scale=cfg.length_scale / args.speed,
        noise_w=cfg.noise_w if args.noise_w is None else args.noise_w)


def cmd_synth(args: argparse.Namespace, registry: VoiceRegistry) -> int:
    if not args.text_file.is_file():
        raise FileNotFoundError(f"text file not found: {args.text_file}")
    text = args.text_file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{args.text_file} is empty")
    voice = registry.resolve(args.voice) if args.voice else registry.default()
    params = params_for(voice, args)
    t0 = time.perf_counter()
    engine = Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate,
                              config=EngineConfig(device=args.device))
    audio = synthesize_text(engine, Phonemizer(voice.config), text, params, seed=args.seed,
                            normalize=not args.literal)
    write_wav(args.out, audio, voice.sample_rate)
    seconds = len(audio) / voice.sample_rate
    # The command's result, on stdout like `voices` (the log, on stderr, is for problems).
    sys.stdout.write(f"wrote {args.out}: {seconds:.2f} s of audio at {voice.sample_rate} Hz "
                     f"in {time.perf_counter() - t0:.2f} s\n")
    return 0


def cmd_voices(registry: VoiceRegistry) -> int:
    for v in registry.voices():
        speakers = f", {len(v.speakers)} speakers" if v.speakers else ""
        default = " (default)" if v.id == registry.default().id else ""
        sys.stdout.write(f"{v.id}\t{v.language}\t{v.sample_rate} Hz\t{v.quality or '-'}{speakers}{default}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        registry = VoiceRegistry(args.voices_dir)
        if args.command == "voices":
            return cmd_voices(registry)
        return cmd_synth(args, registry)
    except (FileNotFoundError, UnknownVoiceError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
