"""Voice configs and the voice registry: what a user sees when listing and picking voices."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from streaming_tts.voices import (
    DEFAULT_VOICE_ENV,
    UnknownVoiceError,
    VoiceConfig,
    VoiceConfigError,
    VoiceInfo,
    VoiceRegistry,
)

DEFAULT_ID = "en_US-joe-medium"


def add_voice(
    voices_dir: Path, default_voice: VoiceInfo, name: str, **changes: Any
) -> Path:
    """Drop a copy of the default voice into `voices_dir` as `name` (model symlinked, config
    copied with `changes` applied at the top level)."""
    voices_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = voices_dir / f"{name}.onnx"
    onnx_path.symlink_to(default_voice.onnx_path)
    config = json.loads(default_voice.config_path.read_text(encoding="utf-8"))
    config.update(changes)
    (voices_dir / f"{name}.onnx.json").write_text(json.dumps(config), encoding="utf-8")
    return onnx_path


def write_config(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def minimal_config() -> dict[str, Any]:
    return {
        "audio": {"sample_rate": 16000},
        "espeak": {"voice": "en-us"},
        "phoneme_id_map": {"_": [0], "^": [1], "$": [2], "a": [3]},
    }


# --- the default voice ---------------------------------------------------------------------


def test_registry_lists_the_installed_default_voice() -> None:
    registry = VoiceRegistry()
    assert registry.default_id == DEFAULT_ID
    assert registry.ids() == [DEFAULT_ID]
    voice = registry.default()
    assert voice.onnx_path.is_file() and voice.config_path.is_file()
    assert voice.config_path.name == f"{DEFAULT_ID}.onnx.json"
    assert (voice.language, voice.sample_rate, voice.quality) == ("en_US", 22050, "medium")
    assert voice.speakers == []


def test_default_voice_config_matches_the_voice_file(default_voice: VoiceInfo) -> None:
    config = default_voice.config
    assert config.espeak_voice == "en-us"
    assert config.phoneme_type == "espeak"
    assert (config.num_symbols, config.num_speakers) == (256, 1)
    assert (config.noise_scale, config.length_scale, config.noise_w) == (0.667, 1.0, 0.8)
    assert config.phoneme_id_map["_"] == [0]
    assert config.phoneme_id_map["^"] == [1]
    assert config.phoneme_id_map["$"] == [2]
    assert config.hop_length == 256


# --- voices dropped in a directory ---------------------------------------------------------


def test_registry_finds_a_voice_dropped_in_its_directory(
    tmp_path: Path, default_voice: VoiceInfo
) -> None:
    add_voice(tmp_path / "en" / "GB", default_voice, "en_GB-test-low",
              audio={"sample_rate": 16000, "quality": "low"},
              language={"code": "en_GB"})
    registry = VoiceRegistry(tmp_path)
    assert registry.ids() == ["en_GB-test-low", DEFAULT_ID]
    voice = registry.get("en_GB-test-low")
    assert (voice.language, voice.sample_rate, voice.quality) == ("en_GB", 16000, "low")
    assert registry.default_id == DEFAULT_ID
    assert [v.id for v in registry.voices()] == registry.ids()


def test_model_without_config_is_not_listed(tmp_path: Path, default_voice: VoiceInfo) -> None:
    (tmp_path / "lonely.onnx").symlink_to(default_voice.onnx_path)
    assert VoiceRegistry(tmp_path).ids() == [DEFAULT_ID]


def test_broken_voice_is_skipped_with_a_warning(
    tmp_path: Path, default_voice: VoiceInfo, caplog: pytest.LogCaptureFixture
) -> None:
    add_voice(tmp_path, default_voice, "good-voice")
    (tmp_path / "broken.onnx").symlink_to(default_voice.onnx_path)
    (tmp_path / "broken.onnx.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="streaming_tts.voices"):
        registry = VoiceRegistry(tmp_path)
    assert registry.ids() == [DEFAULT_ID, "good-voice"]
    assert "broken.onnx" in caplog.text


def test_missing_voices_dir_warns_and_keeps_the_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="streaming_tts.voices"):
        registry = VoiceRegistry(tmp_path / "nowhere")
    assert registry.ids() == [DEFAULT_ID]
    assert "nowhere" in caplog.text


def test_multi_speaker_voice_lists_speakers_in_id_order(
    tmp_path: Path, default_voice: VoiceInfo
) -> None:
    add_voice(tmp_path, default_voice, "two-speakers",
              num_speakers=2, speaker_id_map={"zoe": 0, "adam": 1})
    assert VoiceRegistry(tmp_path).get("two-speakers").speakers == ["zoe", "adam"]


# --- resolve ------------------------------------------------------------------------------


def test_resolve_accepts_an_id_or_a_path(tmp_path: Path, default_voice: VoiceInfo) -> None:
    registry = VoiceRegistry()
    assert registry.resolve(DEFAULT_ID) == default_voice
    elsewhere = add_voice(tmp_path, default_voice, "my-voice")
    for key in (elsewhere, str(elsewhere), str(elsewhere) + ".json"):
        voice = registry.resolve(key)
        assert voice.id == "my-voice"
        assert voice.onnx_path == elsewhere
        assert voice.sample_rate == 22050


def test_resolve_unknown_id_lists_the_known_ids(tmp_path: Path, default_voice: VoiceInfo) -> None:
    add_voice(tmp_path, default_voice, "other-voice")
    registry = VoiceRegistry(tmp_path)
    with pytest.raises(UnknownVoiceError) as info:
        registry.resolve("no-such-voice")
    message = str(info.value)
    assert "no-such-voice" in message
    assert DEFAULT_ID in message and "other-voice" in message
    assert info.value.known == [DEFAULT_ID, "other-voice"]
    assert isinstance(info.value, ValueError)


def test_resolve_missing_path_says_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx"):
        VoiceRegistry().resolve(tmp_path / "nothing.onnx")


def test_resolve_model_without_config_names_the_config(
    tmp_path: Path, default_voice: VoiceInfo
) -> None:
    onnx_path = tmp_path / "bare.onnx"
    shutil.copyfile(default_voice.config_path, tmp_path / "unrelated.json")
    onnx_path.symlink_to(default_voice.onnx_path)
    with pytest.raises(VoiceConfigError, match=r"bare\.onnx\.json"):
        VoiceRegistry().resolve(onnx_path)


# --- config errors ---------------------------------------------------------------------------


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VoiceConfigError, match="not found"):
        VoiceConfig.from_json(tmp_path / "absent.onnx.json")


def test_config_bad_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx.json"
    path.write_text('{"audio": {"sample_rate": 22050},', encoding="utf-8")
    with pytest.raises(VoiceConfigError, match=r"bad\.onnx\.json.*not valid JSON"):
        VoiceConfig.from_json(path)


def test_config_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(VoiceConfigError, match="JSON object"):
        VoiceConfig.from_json(write_config(tmp_path / "list.onnx.json", [1, 2]))


@pytest.mark.parametrize(("drop", "key"), [
    (("audio", "sample_rate"), "audio.sample_rate"),
    (("audio",), "audio.sample_rate"),
    (("espeak", "voice"), "espeak.voice"),
    (("phoneme_id_map",), "phoneme_id_map"),
])
def test_config_missing_key_is_named(tmp_path: Path, drop: tuple[str, ...], key: str) -> None:
    data = minimal_config()
    parent = data
    for part in drop[:-1]:
        parent = parent[part]
    del parent[drop[-1]]
    path = write_config(tmp_path / "v.onnx.json", data)
    with pytest.raises(VoiceConfigError, match=f"missing key '{key}'") as info:
        VoiceConfig.from_json(path)
    assert "v.onnx.json" in str(info.value)


def test_config_wrong_type_is_a_config_error(tmp_path: Path) -> None:
    data = minimal_config()
    data["audio"]["sample_rate"] = "fast"
    with pytest.raises(VoiceConfigError, match=r"v\.onnx\.json"):
        VoiceConfig.from_json(write_config(tmp_path / "v.onnx.json", data))


def test_minimal_config_gets_piper_defaults(tmp_path: Path) -> None:
    config = VoiceConfig.from_json(write_config(tmp_path / "v.onnx.json", minimal_config()))
    assert config.sample_rate == 16000
    assert config.num_symbols == 4  # largest id + 1 when the file does not say
    assert (config.noise_scale, config.length_scale, config.noise_w) == (0.667, 1.0, 0.8)
    assert (config.num_speakers, config.speakers, config.quality) == (1, [], None)
    assert config.language == "en-us"  # the espeak voice when there is no language section


# --- a half-precision copy, and the default voice from elsewhere ----------------------------


def test_a_half_precision_copy_is_half_the_size_and_speaks_the_same(
    tmp_path: Path, default_voice: VoiceInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from streaming_tts.engine import Engine, SynthesisParams
    from streaming_tts.models.onnx_weights import write_half_precision_voice
    from streaming_tts.text.phonemes import Phonemizer

    half = tmp_path / f"{DEFAULT_ID}.onnx"
    size = write_half_precision_voice(default_voice.onnx_path, half)
    shutil.copy(default_voice.config_path, tmp_path / f"{DEFAULT_ID}.onnx.json")
    assert size < 0.55 * default_voice.onnx_path.stat().st_size
    # A machine without the voice package names the copy as its default voice.
    monkeypatch.setenv(DEFAULT_VOICE_ENV, str(half))
    assert VoiceRegistry().default().onnx_path == half
    ids = Phonemizer(default_voice.config).phonemize("A copy at half the size.").ids
    quiet = SynthesisParams(noise_scale=0.0, noise_w=0.0)
    full = Engine.from_file(default_voice.onnx_path, sample_rate=default_voice.sample_rate)
    copy = Engine.from_file(half, sample_rate=default_voice.sample_rate)
    a, b = full.synthesize(ids, quiet, seed=0), copy.synthesize(ids, quiet, seed=0)
    assert a.shape == b.shape           # same durations: the same phrase timing
    snr_db = 10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2))
    assert snr_db > 25.0, snr_db        # 29 dB measured: weights rounded to fp16
