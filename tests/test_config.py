"""Configuration: the shipped TOML files load, default.toml documents every key and matches the
built-in defaults, CLI overrides win, and mistakes are errors that name the key."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from pathlib import Path

import pytest
import tomllib

from server.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ServerConfig,
    add_config_arguments,
    load_config,
    overrides_from_args,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GPU_PATH = CONFIGS / "gpu.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_default_toml_equals_the_built_in_defaults() -> None:
    assert DEFAULT_CONFIG_PATH == CONFIGS / "default.toml"
    cfg = load_config(DEFAULT_CONFIG_PATH, {})
    assert cfg == load_config() == ServerConfig()
    assert cfg.engine.device == "cpu" and cfg.engine.chunk_schedule == (24, 64, 128, 256)
    assert cfg.admission.max_streams == 16 and cfg.admission.max_load == 0.75
    assert cfg.engine.voices_dir is None  # "" in TOML
    assert not cfg.metering.has_tariff


def test_default_toml_lists_and_documents_every_key() -> None:
    raw = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    for section in fields(ServerConfig):
        names = {f.name for f in fields(getattr(ServerConfig(), section.name))}
        assert set(raw[section.name]) == names, section.name
        for name in names:
            (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{name} =")]
            assert lines[index - 1].startswith("#"), f"{section.name}.{name} has no comment"


def test_cpu_bf16_profile_loads_and_keeps_unlisted_defaults() -> None:
    cfg = load_config(CONFIGS / "cpu-bf16.toml", {})
    assert (cfg.engine.device, cfg.engine.dtype) == ("cpu", "bfloat16")
    assert cfg.admission.max_streams > ServerConfig().admission.max_streams
    assert cfg.scheduler == ServerConfig().scheduler and cfg.limits == ServerConfig().limits


def test_gpu_profile_loads_and_keeps_unlisted_defaults() -> None:
    cfg = load_config(GPU_PATH, {})
    assert (cfg.engine.device, cfg.engine.dtype) == ("cuda", "float16")
    assert cfg.admission.max_streams > ServerConfig().admission.max_streams
    assert cfg.scheduler.max_batch_chunks > ServerConfig().scheduler.max_batch_chunks
    assert cfg.limits == ServerConfig().limits
    assert cfg.server == replace(ServerConfig().server, front_ends=4)   # a GIL won't do
    assert cfg.audio.encode_threads == 0      # auto: a GPU serves more streams than 2 threads encode


def test_encode_threads_zero_means_the_usable_cores_less_two(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(None, {"audio.encode_threads": 3}).audio.encode_workers == 3
    auto = load_config(None, {"audio.encode_threads": 0}).audio
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert auto.encode_workers == 14
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert auto.encode_workers == 1


def test_front_ends_share_the_cores_left_for_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = load_config(None, {"audio.encode_threads": 0}).audio
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    # 16 cores: the back end's loop and model thread, 4 front-end loops, 10 left: 2 each.
    assert auto.workers_per_process(4) == 2 and auto.workers_per_process(0) == 14
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert auto.workers_per_process(2) == 1
    assert load_config(None, {"audio.encode_threads": 3}).audio.workers_per_process(4) == 3


def test_overrides_win_over_the_file() -> None:
    cfg = load_config(GPU_PATH, {
        "host": "0.0.0.0", "port": 9001, "voice": "en_GB-x-low", "max_streams": 3,
        "api_keys": ["k1", "k2"], "log_level": "debug", "limits.contexts_per_socket": 2,
        "device": None,  # a flag that was not given changes nothing
    })
    assert (cfg.server.host, cfg.server.port, cfg.server.log_level) == ("0.0.0.0", 9001, "DEBUG")
    assert cfg.server.api_keys == ("k1", "k2")
    assert cfg.engine.voice == "en_GB-x-low" and cfg.engine.device == "cuda"
    assert cfg.admission.max_streams == 3 and cfg.limits.contexts_per_socket == 2


def test_cli_flags_become_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(GPU_PATH), "--port", "8123", "--api-key", "a",
                              "--api-key", "b", "--max-streams", "7", "--device", "cuda"])
    overrides = overrides_from_args(args)
    assert overrides == {"server.port": 8123, "server.api_keys": ["a", "b"],
                         "admission.max_streams": 7, "engine.device": "cuda"}
    cfg = load_config(args.config, overrides)
    assert (cfg.server.port, cfg.server.api_keys, cfg.admission.max_streams) == (
        8123, ("a", "b"), 7)


def test_unknown_keys_are_rejected_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, "[admission]\nmax_streem = 4\n[enigne]\ndevice = 'cpu'\n")
    with pytest.raises(ConfigError, match=r"admission\.max_streem") as info:
        load_config(path, {})
    assert "[enigne]" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_config(None, {"server.prot": 1})
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(None, {"bogus": 1})


@pytest.mark.parametrize(("toml", "needle"), [
    ("[server]\nport = '8000'", "server.port must be an integer, got str"),
    ("[server]\nport = 80.0", "server.port must be an integer, got float"),
    ("[server]\napi_keys = 'secret'", "server.api_keys must be a list"),
    ("[engine]\nchunk_schedule = [16, 'x']", r"engine.chunk_schedule\[1\] must be an integer"),
    ("[engine]\nthreads = true", "engine.threads must be an integer, got bool"),
    ("[admission]\nmax_load = 'high'", "admission.max_load must be a finite number"),
    # TOML's inf and nan: accepted by the range checks before ("> 0"), then the server broke
    # at run time (an infinite heartbeat or send deadline, a price the tariff refused).
    ("[limits]\nheartbeat_s = inf", "limits.heartbeat_s must be a finite number, got float inf"),
    ("[metering]\nprice_per_kwh = inf", "metering.price_per_kwh must be a finite number"),
    ("[scheduler]\nlookahead_ms = nan", "scheduler.lookahead_ms must be a finite number"),
    ("server = 1", r"\[server\] must be a table"),
])
def test_wrong_types_are_named(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, toml), {})


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"port": 70000}, "server.port must be 0..65535"),
    ({"device": "tpu"}, "engine.device must be"),
    ({"engine.dtype": "float16"}, "float16 needs a cuda device"),
    ({"engine.chunk_schedule": []}, "engine.chunk_schedule must be a non-empty list"),
    ({"admission.max_load": 1.5}, r"admission.max_load must be in \(0, 1\]"),
    ({"log_level": "LOUD"}, "server.log_level must be one of"),
    ({"scheduler.max_batch_chunks": 9}, r"must be <= engine.max_batch \(8\)"),
    ({"audio.encode_threads": -1}, r"audio.encode_threads must be >= 0 \(0: auto\)"),
    ({"scheduler.lead_in_search_ms": -5.0}, "scheduler.lead_in_search_ms must be >= 0"),
])
def test_out_of_range_values_are_named(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_float_fields_accept_integers_and_paths_are_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[limits]\nidle_timeout_s = 30\n"
                                      "[engine]\nvoices_dir = 'voices'\n"), {})
    assert cfg.limits.idle_timeout_s == 30.0 and isinstance(cfg.limits.idle_timeout_s, float)
    assert cfg.engine.voices_dir == Path("voices")


def test_unreadable_or_invalid_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml", {})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\n"), {})


def test_as_dict_masks_api_keys() -> None:
    cfg = load_config(None, {"api_keys": ["secret"]})
    assert cfg.as_dict()["server"]["api_keys"] == ["***"]
    assert cfg.as_dict(redact=False)["server"]["api_keys"] == ("secret",)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_cuda_without_a_gpu_is_one_clear_error_and_exit_2(caplog: pytest.LogCaptureFixture) -> None:
    import run_server

    assert run_server.device_problem("cpu") is None
    with caplog.at_level("ERROR", logger="run_server"):
        assert run_server.main(["--device", "cuda", "--port", "0"]) == 2
    [record] = [r for r in caplog.records if r.name == "run_server"]
    assert "use --device cpu" in record.getMessage() and record.exc_info is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_cuda_n_is_a_device_flag_like_in_the_file(caplog: pytest.LogCaptureFixture) -> None:
    import run_server

    with caplog.at_level("ERROR", logger="run_server"):     # accepted, then found missing here
        assert run_server.main(["--device", "cuda:1", "--port", "0"]) == 2
    assert "device 'cuda:1'" in caplog.text


def test_a_missing_voice_file_is_named_and_not_blamed_on_the_port(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import run_server

    missing = tmp_path / "nowhere.onnx"
    with caplog.at_level("ERROR", logger="run_server"):
        assert run_server.main(["--voice", str(missing), "--port", "0"]) == 2
    [record] = [r for r in caplog.records if r.name == "run_server"]
    assert str(missing) in record.getMessage() and "cannot serve" not in record.getMessage()


def test_a_bad_flag_is_blamed_on_the_command_line_and_a_bad_file_on_the_file(tmp_path: Path) -> None:
    good = write(tmp_path, "[server]\nport = 8001\n")
    with pytest.raises(ConfigError, match=r"^command line: server\.port"):
        load_config(None, {"port": 70000})
    with pytest.raises(ConfigError, match=r"with the command-line options: server\.port"):
        load_config(good, {"port": 70000})
    bad = write(tmp_path, "[server]\nport = 70000\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: server\.port"):
        load_config(bad, {"port": 8001})   # the flag would fix it, but the file is wrong
