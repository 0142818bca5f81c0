"""Build `.device/`: what a GPU machine with bare Python 3.12 needs to run the CUDA tests and
benchmarks (`scripts/device_check.sh`), within the device tool's 64 MiB for everything carried.

Its image has torch (CUDA), aiohttp, msgpack, uvloop, numpy, onnx, prometheus-client,
nvidia-ml-py and pytest; the rest travels here:
- wheels for Python 3.12 / manylinux x86-64, at the versions installed in this .venv:
  espeakng-loader (espeak-ng and its data), phonemizer, dlinfo, soxr, opuslib, pytest-asyncio,
  pytest-aiohttp;
- the Debian package libopus0 (for opuslib);
- the default voice as a half-precision copy (30 MiB instead of 60; the voice package's wheel
  alone would not fit): `STREAMING_TTS_DEFAULT_VOICE` points the server and tests at it.

    .venv/bin/python scripts/device_bundle.py          # then carry ".device" in the run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streaming_tts.models.onnx_weights import write_half_precision_voice  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402

BINARY_WHEELS = ("espeakng-loader", "phonemizer", "dlinfo", "soxr", "pytest-asyncio", "pytest-aiohttp")
SOURCE_ONLY = ("opuslib",)          # no wheel on PyPI: built here (pure Python)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_BYTES = 60 * 2**20            # leaves room for the repository in the tool's 64 MiB


def pinned(name: str) -> str:
    return f"{name}=={importlib.metadata.version(name)}"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".device")
    args = ap.parse_args()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    wheels, debs, voice_dir = out / "whl", out / "deb", out / "voice"

    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", *platform_args, "-d", str(wheels), *map(pinned, BINARY_WHEELS))
    pip("wheel", "-q", "--no-deps", "-w", str(wheels), *map(pinned, SOURCE_ONLY))

    debs.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "libopus0"], cwd=tmp)
        if got.returncode != 0:
            raise SystemExit("apt-get download libopus0 failed: run `apt-get update` first")
        for deb in Path(tmp).glob("*.deb"):
            shutil.move(str(deb), debs / deb.name)

    voice = VoiceRegistry().default()
    write_half_precision_voice(voice.onnx_path, voice_dir / voice.onnx_path.name)
    shutil.copy(voice.config_path, voice_dir / voice.config_path.name)

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.relative_to(out)}")
    print(f"{total / 2**20:7.2f} MiB in {out}")
    if total > LIMIT_BYTES:
        raise SystemExit(f"{out} is over {LIMIT_BYTES / 2**20:.0f} MiB: it would not travel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
