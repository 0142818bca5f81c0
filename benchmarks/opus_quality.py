"""Opus quality against CPU: what each encoder complexity costs and how it sounds.

`audio.opus_complexity` trades the host's CPU for quality, and on a GPU host with hundreds of
streams Opus is most of the host's own work (BENCHMARKS.md, "The host path"). This benchmark
synthesizes the benchmark paragraph with the real default voice, one stream per sentence, and
sends each through the server's own `OpusStreamEncoder` (48 kHz, 20 ms frames, VOIP, fed in
128-frame chunks as the scheduler emits them) and libopus's decoder. It scores the decoded
speech against the same speech resampled to 48 kHz without a codec, by PESQ wideband (ITU-T
P.862.2, MOS-LQO from 1.0 to 4.64; both sides resampled to 16 kHz), and times the encoding (CPU
time per audio second, best of 3).

    python benchmarks/opus_quality.py --json
    python benchmarks/opus_quality.py --complexity 0 2 5 10 --bitrate 16000 32000

PESQ comes from the `pesq` package (a wrapper of the ITU reference code), which the project
does not depend on: install it for this benchmark (`pip install pesq`; it builds a C
extension). Without it the benchmark stops with that message. PESQ was made for telephone and
wideband speech codecs; it ranks settings of one codec on the same speech well, and says
nothing of 16-48 kHz content above its 8 kHz band.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.texts import SENTENCES  # noqa: E402

OUT_RATE = 48000
PESQ_RATE = 16000
CHUNK_FRAMES = 128   # the scheduler's largest decode chunk


def round_trip(speech: np.ndarray, in_rate: int, *, complexity: int, bitrate: int,
               chunk: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One stream through the server's Opus encoder and libopus's decoder.

    Returns (reference, decoded, encode CPU seconds): the reference is the speech resampled to
    48 kHz by the same resampler, without the codec; the decoded audio is aligned to it (the
    encoder's lookahead dropped) and as long."""
    import opuslib

    from streaming_tts.audio.encode import OpusStreamEncoder
    from streaming_tts.audio.resample import StreamResampler

    pieces = [speech[i:i + chunk] for i in range(0, len(speech), chunk)]
    ref_rs = StreamResampler(in_rate, OUT_RATE)
    reference = np.concatenate([ref_rs.process(p) for p in pieces] + [ref_rs.process(
        np.zeros(0, np.float32), last=True)])
    enc = OpusStreamEncoder(in_rate=in_rate, out_rate=OUT_RATE, bitrate=bitrate,
                            complexity=complexity)
    t0 = time.thread_time()
    packets = [pkt for p in pieces for pkt in enc.encode(p)] + list(enc.finish())
    cpu = time.thread_time() - t0
    dec = opuslib.Decoder(OUT_RATE, 1)
    decoded = np.concatenate([np.frombuffer(dec.decode_float(pkt, enc.frame_size), np.float32)
                              for pkt in packets])
    decoded = decoded[enc.lookahead:enc.lookahead + len(reference)]
    if len(decoded) < len(reference):   # finish() pads through the lookahead, so never short
        raise AssertionError(f"decoded {len(decoded)} samples, reference {len(reference)}")
    return reference, decoded, cpu


def pesq_wb(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PESQ wideband MOS-LQO of `decoded` against `reference` (both 48 kHz)."""
    import soxr
    from pesq import pesq

    ref16 = soxr.resample(reference, OUT_RATE, PESQ_RATE)
    deg16 = soxr.resample(decoded, OUT_RATE, PESQ_RATE)
    return float(pesq(PESQ_RATE, ref16, deg16, "wb"))


def synthesize(sentences: list[str]) -> tuple[list[np.ndarray], int, int]:
    """Each sentence, spoken whole by the default voice on CPU (float32); with the voice's
    sample rate and samples per frame."""
    from server.config import load_config
    from server.model import load_engine
    from streaming_tts.engine import AcousticJob, SynthesisParams
    from streaming_tts.text.phonemes import Phonemizer
    from streaming_tts.voices import VoiceRegistry

    cfg = load_config(None, {"engine.device": "cpu", "engine.dtype": "float32"})
    voice = VoiceRegistry(cfg.engine.voices_dir).resolve(cfg.engine.voice)
    engine = load_engine(voice, cfg)
    phonemizer = Phonemizer(voice.config)
    speech = []
    for text in sentences:
        job = AcousticJob(ids=phonemizer.phonemize(text).ids, params=SynthesisParams(), seed=0)
        speech.append(np.asarray(engine.decode_whole(engine.acoustic([job])[0].z), np.float32))
    return speech, voice.sample_rate, engine.hop_length


def measure(speech: list[np.ndarray], rate: int, complexity: int, bitrate: int,
            hop: int) -> dict:
    scores, cpu_best, audio_s = [], [], 0.0
    for s in speech:
        best = float("inf")
        for _ in range(3):
            reference, decoded, cpu = round_trip(s, rate, complexity=complexity, bitrate=bitrate,
                                                 chunk=CHUNK_FRAMES * hop)
            best = min(best, cpu)
        cpu_best.append(best)
        audio_s += len(s) / rate
        scores.append(pesq_wb(reference, decoded))
    return {"complexity": complexity, "bitrate": bitrate,
            "pesq_wb_mean": round(float(np.mean(scores)), 3),
            "pesq_wb_min": round(float(np.min(scores)), 3),
            "encode_ms_per_audio_s": round(1000 * sum(cpu_best) / audio_s, 2),
            "sentences": len(speech), "audio_s": round(audio_s, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--complexity", type=int, nargs="+", default=[0, 2, 5, 8, 10])
    ap.add_argument("--bitrate", type=int, nargs="+", default=[16000, 24000, 32000])
    ap.add_argument("--sentences", type=int, default=len(SENTENCES))
    ap.add_argument("--json", action="store_true", help="one JSON line per setting")
    args = ap.parse_args()
    try:
        import pesq  # noqa: F401
    except ImportError:
        sys.stderr.write("opus_quality.py needs the `pesq` package: pip install pesq\n")
        return 2
    speech, rate, hop = synthesize(SENTENCES[: args.sentences])
    for bitrate in args.bitrate:
        for complexity in args.complexity:
            row = measure(speech, rate, complexity, bitrate, hop)
            print(json.dumps(row) if args.json else json.dumps(row, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
