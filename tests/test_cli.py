"""`python -m streaming_tts synth|voices` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from streaming_tts.cli import main, split_sentences

ROOT = Path(__file__).resolve().parent.parent


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "in.txt"
    p.write_text("Good morning. The weather is calm today, with light wind from the west.")
    return p


def test_synth_writes_a_16_bit_wav_at_the_voice_rate(tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "out.wav"
    assert main(["synth", "--text-file", str(text_file), "--out", str(out), "--seed", "1"]) == 0
    rate, pcm = read_wav(out)
    assert rate == 22050
    assert 2.5 < len(pcm) / rate < 8.0          # two short sentences
    assert np.abs(pcm).max() > 3000             # speech, not silence


def test_speed_and_noise_options_change_the_audio(tmp_path: Path, text_file: Path) -> None:
    base, fast = tmp_path / "a.wav", tmp_path / "b.wav"
    common = ["--text-file", str(text_file), "--noise-scale", "0", "--noise-w", "0"]
    assert main(["synth", *common, "--out", str(base)]) == 0
    assert main(["synth", *common, "--out", str(fast), "--speed", "2.0"]) == 0
    _, a = read_wav(base)
    _, b = read_wav(fast)
    assert len(b) < 0.65 * len(a)


def test_clear_errors(tmp_path: Path, text_file: Path, capsys) -> None:
    out = str(tmp_path / "x.wav")
    assert main(["synth", "--text-file", str(tmp_path / "missing.txt"), "--out", out]) == 2
    assert "text file not found" in capsys.readouterr().err
    assert main(["synth", "--text-file", str(text_file), "--out", out, "--voice", "nobody"]) == 2
    assert "unknown voice 'nobody'" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["synth", "--text-file", str(empty), "--out", out]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["synth", "--text-file", str(text_file), "--out", out, "--speed", "5"]) == 2
    assert "--speed" in capsys.readouterr().err


def test_voices_lists_the_default_voice() -> None:
    proc = subprocess.run([sys.executable, "-m", "streaming_tts", "voices"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "en_US-joe-medium" in proc.stdout and "(default)" in proc.stdout


def test_sentences_are_split_at_sentence_ends_only() -> None:
    assert split_sentences("Dr. Smith paid 3.14 dollars. Then he left!") == [
        "Dr. Smith paid 3.14 dollars.", "Then he left!"]


def test_server_logging_never_waits_for_a_stalled_stderr() -> None:
    # The event loop logs every stream's lifecycle; a write to a pipe nobody drains blocks.
    # Lines go through a bounded queue to a writer thread; when it is full they are dropped
    # and counted, and the count is logged once there is room again.
    import logging
    import threading
    import time

    import run_server

    class Stalled:
        def __init__(self) -> None:
            self.go, self.lines = threading.Event(), []

        def write(self, text: str) -> None:
            self.go.wait()
            self.lines.append(text)

        def flush(self) -> None:
            pass

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stalled = Stalled()
    writer = run_server.setup_logging("INFO", stream=stalled, force=True)
    assert writer is not None
    try:
        log = logging.getLogger("server.session")
        done = threading.Event()

        def burst() -> None:
            for i in range(run_server.LOG_QUEUE_LINES + 50):
                log.info("stream s%d opened", i)
            done.set()

        threading.Thread(target=burst, daemon=True).start()
        assert done.wait(30), "logging blocked on a stalled stderr"
        stalled.go.set()                      # stderr is read again
        queued = root.handlers[0].queue
        for _ in range(3000):
            if queued.empty():
                break
            time.sleep(0.01)
        log.info("after")
    finally:
        writer.stop()
        assert root.handlers == []          # its handler is off the root logger again
        root.handlers[:], root.level = saved
    text = "".join(stalled.lines)
    assert "stream s0 opened" in text and "after" in text
    assert "log line(s) dropped: stderr was not read" in text
    assert text.count("opened") < run_server.LOG_QUEUE_LINES + 50


def test_an_unparsable_http_request_is_one_info_line_without_the_clients_bytes() -> None:
    # aiohttp logged each at ERROR with a traceback quoting the request's first 100 bytes (a
    # URL's ?token= among them): free log flooding for any client.
    import io
    import logging

    from aiohttp.http_exceptions import LineTooLong

    import run_server

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    writer = run_server.setup_logging("INFO", stream=out, force=True)
    assert writer is not None
    try:
        aio = logging.getLogger("aiohttp.server")
        try:
            raise LineTooLong(b"/v1/stream?token=SECRET" + b"a" * 9000, 8190)
        except LineTooLong as exc:
            aio.error("Error handling request from %s", "10.0.0.7", exc_info=exc)
        try:
            raise RuntimeError("a bug in a handler")
        except RuntimeError as exc:
            aio.error("Error handling request from %s", "10.0.0.8", exc_info=exc)
    finally:
        writer.stop()
        root.handlers[:], root.level = saved
    lines = out.getvalue().splitlines()
    bad = [line for line in lines if "10.0.0.7" in line]
    assert len(bad) == 1 and " INFO " in bad[0] and "LineTooLong (400), refused" in bad[0]
    assert "SECRET" not in out.getvalue()
    assert any("10.0.0.8" in line and " ERROR " in line for line in lines)   # bugs stay errors
    assert "RuntimeError: a bug in a handler" in out.getvalue()


def test_a_flood_of_unparsable_requests_is_logged_within_the_limit() -> None:
    import logging

    from aiohttp.http_exceptions import LineTooLong

    import run_server

    now = [0.0]
    limit = run_server._BadRequestFilter(lines=2, window_s=10.0, clock=lambda: now[0])

    def bad_request() -> logging.LogRecord:
        try:
            raise LineTooLong(b"x" * 9000, 8190)
        except LineTooLong as exc:
            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                     "Error handling request from %s", ("10.0.0.7",),
                                     (type(exc), exc, exc.__traceback__))
    assert [limit.filter(bad_request()) for _ in range(5)] == [True, True, False, False, False]
    now[0] = 10.0                                 # the next window: logged again, with a count
    record = bad_request()
    assert limit.filter(record)
    assert record.getMessage().endswith("; 3 more bad request(s) before it were not logged")


def test_api_tokens_are_masked_in_the_access_log() -> None:
    import logging

    import run_server

    for query, masked in [("x=1&token=k-SECRET&y=2", "x=***&token=***&y=***"),
                          ("tok%65n=k-SECRET", "tok%65n=***"),     # aiohttp reads "token"
                          ("TOKEN=k-SECRET", "TOKEN=***")]:        # refused, but a key
        record = logging.LogRecord(
            "aiohttp.access", logging.INFO, __file__, 1, '%s "%s" %s "%s"',
            ("127.0.0.1", f"GET /v1/stream?{query} HTTP/1.1", 101,
             f"http://example.org/?{query}"), None)
        assert run_server._RedactTokens().filter(record)
        assert record.getMessage() == (f'127.0.0.1 "GET /v1/stream?{masked} HTTP/1.1" 101 '
                                       f'"http://example.org/?{masked}"')
