"""The browser client, end to end: a real server, headless Chromium, the page a person uses.

What a listener would notice: the paragraph is spoken to the end without a gap while it is still
being typed in (words per second), the caption highlight follows the voice, Stop goes silent at
once, a full server is waited for and retried as the server suggests (or, with `?retry_s=0`,
said in words at once), and a wrong API token says so in words. When things go wrong: a stream
the page gives up on is cancelled on the server, a stalled or slow connection is said in words
(and what had arrived is still heard), a server that is starting is waited for, blocked audio
asks for a click, and the keyboard can stop speech.

Bad networks are made deterministically, not with sleeps: Playwright's WebSocket route sits
between the page and the server (`SocketProxy`), holds back what the server sends or closes
the page's side with the server's close code; HTTP routes answer late or never.

Runs only where /usr/bin/chromium (Debian's package) and the `playwright` Python package exist;
Playwright never downloads a browser here. Headless Chromium has no sound card, but its
AudioContext still renders in real time to a fake output, so the AudioWorklet's counters are
real playback numbers.

The server is started once for the module as
    python run_server.py --host 127.0.0.1 --port PORT --max-streams 1 --api-key KEY
so that one held stream fills it (refusal test) and every request must carry the token.
Set TTS_UPDATE_SCREENSHOT=1 to refresh web_client/screenshot.png (the README picture).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")

ROOT = Path(__file__).resolve().parent.parent
WEB_CLIENT = ROOT / "web_client"
if not (WEB_CLIENT / "node_modules" / "@msgpack" / "msgpack" / "dist.esm" / "index.mjs").exists():
    pytest.skip("web_client dependencies missing: run `npm ci` in web_client/",
                allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
API_KEY = "browser-test-key"
STARTUP_TIMEOUT_S = 300.0   # load and warm-up: ~30 s on a quiet 2-core machine, minutes on a busy one
AUTH_MESSAGE = "Authentication failed: check the API token"
CAPACITY_RE = re.compile(r"Server is at capacity — try again in (\d+ s|a few seconds)")
WAITING_RE = re.compile(r"Server is at capacity — retrying in \d+ s")
RETRY_HINT_MAX_S = 4  # the server's default hints: admission.retry_after_s 2 + jitter 0..2

# ~40 words, several sentences: several phrases, each with word timings.
PARAGRAPH = (
    "Streaming speech starts before the sentence is finished. Each word arrives the way a "
    "language model writes it, one after another. The server turns phrases into audio while "
    "more text is still coming in, so the listener hears the first words almost at once and "
    "the voice never stops."
)
LONG_TEXT = " ".join([PARAGRAPH] * 4)


# ----------------------------------------------------------------------------------------------
# The server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    """run_server.py in a subprocess, its log in a file."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [
            sys.executable, "run_server.py",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-streams", "1",
            "--api-key", API_KEY,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if _http_get(f"{self.url}/healthz", timeout=2.0)[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # A first SIGTERM lets live streams finish (server.drain_s); a second stops at once.
            for timeout in (3, 15):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                    return
                except subprocess.TimeoutExpired:
                    pass
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def timer_audit_errors(self, since: int) -> list[str]:
        """Lines the scheduler's timer audit logged after byte `since` (tests/conftest.py turns
        it on for servers started from the tests too)."""
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if "timer audit:" in line]

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def status(self) -> dict[str, Any] | None:
        code, body = _http_get(f"{self.url}/v1/status?token={API_KEY}")
        return json.loads(body) if code == 200 else None

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until a previous test's streams are gone (the server allows only one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is None:
                time.sleep(1.0)  # no status endpoint: give disconnects a moment
                return
            if not status.get("active_streams"):
                return
            time.sleep(0.2)
        pytest.fail(f"server still has active streams: {self.status()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server") / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------
# The browser

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


class Client:
    """One page of the web client, with helpers that read what a person would see."""

    def __init__(self, page: Any, server: Server, url: str | None = None) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(str(err)))
        page.goto(url or server.url + "/")

    def login(self, token: str = API_KEY) -> None:
        self.page.fill("#token", token)
        self.page.press("#token", "Tab")  # "change" reloads the voices with the token

    def wait_voices(self) -> None:
        self.page.wait_for_function(
            "() => { const v = document.querySelector('#voice');"
            " return v.options.length > 0 && v.value !== ''; }",
            timeout=10_000,
        )

    def speak(self, text: str, wps: float) -> None:
        self.page.fill("#text", text)
        self.page.fill("#wps", str(wps))
        self.page.click("#speak")

    def stats(self) -> dict[str, str]:
        return self.page.eval_on_selector("#stats", "e => ({...e.dataset})")

    def alert(self) -> str:
        return self.page.inner_text("#message").strip()

    def current_word_index(self) -> int:
        return int(self.page.eval_on_selector("#captions", "e => e.dataset.currentIndex"))

    def wait_played_ms(self, ms: int, timeout_ms: int = 60_000) -> None:
        self.page.wait_for_function(
            f"() => Number(document.querySelector('#stats').dataset.playedMs) > {ms}"
            " || document.querySelector('#stats').dataset.state === 'error'",
            timeout=timeout_ms,
        )
        assert self.stats()["state"] != "error", self.alert()


@pytest.fixture()
def client(browser: Any, server: Server) -> Iterator[Client]:
    server.wait_idle()
    log_at = server.log_size()
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    try:
        yield Client(context.new_page(), server)
    finally:
        context.close()
    missed = server.timer_audit_errors(log_at)
    assert not missed, "the server's scheduler left streams unarmed:\n" + "\n".join(missed[:10])


# ----------------------------------------------------------------------------------------------
# Tests

def test_page_lists_voices_and_server_status(client: Client, server: Server) -> None:
    page = client.page
    assert page.inner_text("label[for=text]").strip() == "Text"
    client.login()
    client.wait_voices()
    code, body = _http_get(f"{server.url}/v1/voices?token={API_KEY}")
    assert code == 200
    voice_ids = [v["id"] for v in json.loads(body)]
    options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
    assert options == voice_ids
    # The server panel polls /v1/status every 2 s.
    page.wait_for_function(
        "() => /^\\d+\\/1 streams$/.test(document.querySelector('#server-streams').textContent)",
        timeout=6_000,
    )
    # A server draining says so (its voice is still loaded: `ready` stays true).
    draining = {"active_streams": 1, "max_streams": 1, "capacity_load": 0.1,
                "vram_used_bytes": None, "vram_total_bytes": None, "gpu_power_w": None,
                "retry_after_s": 2, "ready": True, "status": "shutting_down"}
    polled = re.compile(r".*/v1/status(\?.*)?$")
    page.route(polled, lambda route: route.fulfill(json=draining))
    page.wait_for_function(
        "() => document.querySelector('#server-capacity').textContent"
        " === 'shutting down: no new streams'", timeout=6_000,
    )
    page.unroute(polled)
    assert client.errors == []


def test_streamed_paragraph_plays_to_the_end_with_captions(
    client: Client, tmp_path: Path,
) -> None:
    client.login()
    client.wait_voices()
    client.speak(PARAGRAPH, wps=15)

    seen: list[int] = []  # caption highlight index over time
    trace: list[str] = []  # what the player reported, to show where an underrun came
    at_1s = None  # the stats by the time 1 s of audio had played
    shot_taken = False
    t0 = deadline = time.monotonic()
    deadline += 120
    stats = client.stats()
    while stats["state"] not in ("done", "error") and time.monotonic() < deadline:
        trace.append(f"{time.monotonic() - t0:.1f}s {stats.get('state')} played {stats.get('playedMs')} "
                     f"buffered {stats.get('bufferedMs')} underruns {stats.get('underruns')} "
                     f"late {stats.get('lateArrivals')}")
        if at_1s is None and float(stats.get("playedMs") or 0) >= 1000:
            at_1s = stats
        seen.append(client.current_word_index())
        words = client.page.eval_on_selector_all(".word", "ws => ws.length")
        if not shot_taken and words and seen[-1] >= words // 2:
            client.page.screenshot(path=str(tmp_path / "speaking.png"), full_page=True)
            if os.environ.get("TTS_UPDATE_SCREENSHOT"):
                client.page.screenshot(path=str(WEB_CLIENT / "screenshot.png"))
            shot_taken = True
        time.sleep(0.1)
        stats = client.stats()
    client.page.screenshot(path=str(tmp_path / "done.png"), full_page=True)

    assert stats["state"] == "done", f"state {stats['state']}: {client.alert()}"
    # The usage panel shows `done.usage`: model time and the encoders' CPU time, measured.
    for field in ("#usage-compute", "#usage-encode"):
        shown = client.page.text_content(field) or ""
        assert shown.endswith(" ms") and float(shown[:-3]) > 0, (field, shown)
    audio_ms = float(stats["audioMs"])  # usage.audio_ms from `done`
    assert audio_ms > 5_000, "a 40-word paragraph should be several seconds of speech"
    assert float(stats["playedMs"]) >= 0.9 * audio_ms
    # Once playing, it never runs dry unless audio came late: the page decodes and queues what
    # arrives in time. Whether the audio itself comes in time is the model's speed on this CPU,
    # which the load benchmark measures (late messages), not a test: on 2026-12-01, with the
    # 2-core host at half its usual speed and the suite's other work, 2 runs in ~8 ran dry once
    # in their first second, and one full-suite run on 2026-12-02 ran dry once later on. An
    # underrun with no late audio to explain it is the page's own fault, and fails here.
    assert at_1s is not None, "\n".join(trace)
    dry_after_1s = int(stats["underruns"]) - int(at_1s["underruns"])
    late_after_1s = int(stats["lateArrivals"]) - int(at_1s["lateArrivals"])
    assert int(at_1s["underruns"]) <= max(1, int(at_1s["lateArrivals"])), "\n".join(trace)
    assert dry_after_1s <= late_after_1s, "\n".join(trace)
    assert stats["ttfaMs"] != "" and float(stats["ttfaMs"]) > 0

    n_words = client.page.eval_on_selector_all(".word", "ws => ws.length")
    assert n_words >= 30, "word timings should cover the paragraph"
    moved = [i for i in seen if i >= 0]
    assert moved, "the current-word highlight never appeared"
    assert max(moved) >= n_words - 3, "the highlight should reach the last words"
    assert len(set(moved)) >= n_words // 2, "the highlight should step through the words"
    assert moved == sorted(moved), "the highlight should only move forward"
    assert client.alert() == ""
    assert client.errors == []


def test_captions_show_markdown_text_as_written_with_each_word_once(client: Client) -> None:
    # The voice reads "**bold**," as "bold," (start.markdown), and the words say what was read.
    # The captions showed such a word twice: "Here is bold, **bold**, and ...".
    text = "Here is **bold**, and _italic_ text. See [the docs](https://x.io/a) now."
    client.login()
    client.wait_voices()
    client.speak(text, wps=30)
    client.page.wait_for_function(
        "() => ['done', 'error'].includes(document.querySelector('#stats').dataset.state)",
        timeout=60_000)
    assert client.stats()["state"] == "done", client.alert()
    shown = client.page.inner_text("#captions")
    assert " ".join(shown.split()) == text
    words = client.page.eval_on_selector_all(
        ".word", "ws => ws.map(w => [w.dataset.word, w.textContent])")
    assert [w for w, _ in words][:5] == ["Here", "is", "bold,", "and", "italic"]
    assert ("bold,", "bold") in [tuple(w) for w in words]          # highlighted inside the marks
    assert sum(1 for _, t in words if "bold" in t) == 1
    assert client.errors == []


def test_code_blocks_left_unread_are_still_in_the_captions(client: Client) -> None:
    text = "Run this:\n```sh\nmake all\n```\nThen wait a minute."
    client.login()
    client.wait_voices()
    client.page.uncheck("#read-code")
    client.speak(text, wps=30)
    client.page.wait_for_function(
        "() => ['done', 'error'].includes(document.querySelector('#stats').dataset.state)",
        timeout=60_000)
    assert client.stats()["state"] == "done", client.alert()
    assert " ".join(client.page.inner_text("#captions").split()) == " ".join(text.split())
    words = client.page.eval_on_selector_all(".word", "ws => ws.map(w => w.dataset.word)")
    assert words == ["Run", "this:", "Then", "wait", "a", "minute."]
    assert client.errors == []


def test_markup_and_written_forms_can_be_read_as_written(client: Client) -> None:
    # Both are on by default (the server's defaults, not sent); unchecked, `start` says so,
    # and the voice reads what was written: the words then name "**bold**" whole.
    sent: list[dict] = []

    def on_socket(ws: Any) -> None:
        ws.on("framesent", lambda payload: sent.append(
            msgpack.unpackb(payload) if isinstance(payload, bytes) else {"text": payload}))

    client.page.on("websocket", on_socket)
    client.login()
    client.wait_voices()
    text = "Here is **bold** for $5."
    client.speak(text, wps=0)
    client.page.wait_for_function(
        "() => ['done', 'error'].includes(document.querySelector('#stats').dataset.state)",
        timeout=60_000)
    starts = [m for m in sent if m.get("type") == "start"]
    assert len(starts) == 1 and not {"markdown", "normalize", "read_code"} & starts[0].keys()
    read = client.page.eval_on_selector_all(".word", "ws => ws.map(w => w.dataset.word)")
    assert "bold" in read

    client.page.uncheck("#markdown")
    client.page.uncheck("#normalize")
    client.speak(text, wps=0)
    client.page.wait_for_function(
        "() => ['done', 'error'].includes(document.querySelector('#stats').dataset.state)"
        " && document.querySelectorAll('.word').length > 0", timeout=60_000)
    assert client.stats()["state"] == "done", client.alert()
    starts = [m for m in sent if m.get("type") == "start"]
    assert len(starts) == 2 and starts[1]["markdown"] is False and starts[1]["normalize"] is False
    assert "read_code" not in starts[1]
    read = client.page.eval_on_selector_all(".word", "ws => ws.map(w => w.dataset.word)")
    assert "**bold**" in read and "bold" not in read, read
    assert " ".join(client.page.inner_text("#captions").split()) == text
    assert client.errors == []


def test_stop_goes_silent_within_100_ms(client: Client) -> None:
    client.login()
    client.wait_voices()
    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(1500)

    # Click Stop inside the page and sample the worklet's counters against the page's clock.
    samples = client.page.evaluate(
        """async () => {
          const stats = document.querySelector('#stats');
          const t0 = performance.now();
          document.querySelector('#stop').click();
          const out = [];
          while (performance.now() - t0 < 1000) {
            out.push({t: performance.now() - t0, played: Number(stats.dataset.playedMs),
                      peak: Number(stats.dataset.outputPeak), state: stats.dataset.state});
            await new Promise((r) => setTimeout(r, 5));
          }
          return out;
        }"""
    )
    last_change = max(
        (s["t"] for prev, s in zip(samples, samples[1:]) if s["played"] != prev["played"]),
        default=0.0,
    )
    assert last_change <= 100, f"played position still advanced {last_change:.0f} ms after Stop"
    assert samples[-1]["state"] == "idle"
    loud = [s for s in samples if s["t"] > 150 and s["peak"] > 0]
    assert not loud, f"audio output after Stop: {loud[:3]}"

    # No late audio: audio the server had already sent for the cancelled stream is not played.
    frozen = samples[-1]["played"]
    assert "Cancelled" in client.page.inner_text("#notice")
    # The usage panel shows what the cut reply used (`cancelled.usage`).
    shown = client.page.text_content("#usage-compute") or ""
    assert shown.endswith(" ms") and float(shown[:-3]) > 0, shown
    assert float(client.stats()["audioMs"]) >= 1500
    time.sleep(1.0)
    stats = client.stats()
    assert float(stats["playedMs"]) == frozen
    assert stats["bufferedMs"] == "0"
    assert stats["state"] == "idle"
    assert client.alert() == ""
    assert client.errors == []


def _hold_the_only_stream(browser: Any, server: Server) -> Client:
    """Another listener takes the server's one stream; slow typing keeps it open a long time."""
    holder = Client(browser.new_page(viewport={"width": 1100, "height": 1000}), server)
    holder.login()
    holder.wait_voices()
    holder.speak(LONG_TEXT, wps=1)
    holder.wait_played_ms(200)
    return holder


def _release(holder: Client) -> None:
    holder.page.click("#stop")
    holder.page.close()


def _wait_state(client: Client, state: str, timeout_ms: int = 20_000, retries: int = 0) -> None:
    client.page.wait_for_function(
        f"() => {{ const d = document.querySelector('#stats').dataset;"
        f" return d.state === '{state}' && Number(d.retries) >= {retries}; }}",
        timeout=timeout_ms,
    )


def test_full_server_is_retried_until_a_stream_frees(
    browser: Any, client: Client, server: Server, tmp_path: Path,
) -> None:
    holder = _hold_the_only_stream(browser, server)
    try:
        client.login()
        client.wait_voices()
        client.speak(PARAGRAPH, wps=0)  # refused before the upgrade (HTTP 503)
        _wait_state(client, "waiting")
        client.page.screenshot(path=str(tmp_path / "waiting.png"), full_page=True)
        assert WAITING_RE.fullmatch(client.page.inner_text("#notice").strip())
        assert client.alert() == "", "a refusal that will be retried is not an error"
        assert not client.page.is_disabled("#stop")
        # It tries again after the server's hint, is refused again, and keeps waiting.
        _wait_state(client, "waiting", timeout_ms=15_000, retries=1)
        assert holder.stats()["state"] == "streaming", "the held stream must be unaffected"
    finally:
        _release(holder)
    # The slot is free: the next try gets it and the paragraph plays.
    client.wait_played_ms(500, timeout_ms=30_000)
    assert client.alert() == ""
    assert "retrying" not in _notice(client), "the countdown is over once it plays"
    assert int(client.stats()["retries"]) >= 1
    # Time to first audio counts from Speak, the waits for room included (>= 1 s each).
    assert float(client.stats()["ttfaMs"]) >= 1000 * int(client.stats()["retries"])
    assert client.errors == []


def test_stop_while_waiting_cancels_the_retry(
    browser: Any, client: Client, server: Server,
) -> None:
    client.login()
    client.wait_voices()
    client.speak("Hello.", wps=0)  # opens the page's socket, which later starts reuse
    _wait_state(client, "done", timeout_ms=30_000)
    holder = _hold_the_only_stream(browser, server)
    try:
        client.speak(PARAGRAPH, wps=0)  # refused after the upgrade: `error` overloaded
        _wait_state(client, "waiting")
        assert WAITING_RE.fullmatch(client.page.inner_text("#notice").strip())
        client.page.click("#stop")
        assert client.stats()["state"] == "idle"
        assert client.page.inner_text("#notice").strip() == "Cancelled"
    finally:
        _release(holder)
    server.wait_idle()
    time.sleep(RETRY_HINT_MAX_S + 1)  # past any retry the page could have had pending
    stats = client.stats()
    assert stats["state"] == "idle" and stats["retries"] == "0"
    assert (server.status() or {}).get("active_streams") == 0, "a cancelled wait must not start"
    assert client.alert() == ""
    assert client.errors == []


def test_full_server_without_retries_shows_capacity_message(
    browser: Any, client: Client, server: Server, tmp_path: Path,
) -> None:
    client.page.goto(server.url + "/?retry_s=0")  # the page gives up at the first refusal
    holder = _hold_the_only_stream(browser, server)
    try:
        client.login()
        client.wait_voices()
        client.speak(PARAGRAPH, wps=0)
        client.page.wait_for_function(
            "() => document.querySelector('#message').textContent !== ''", timeout=20_000,
        )
        client.page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)
        assert CAPACITY_RE.fullmatch(client.alert()), client.alert()
        assert client.page.get_attribute("#message", "role") == "alert"
        assert client.page.is_visible("#message")
        assert client.stats()["state"] == "error"
        assert holder.stats()["state"] == "streaming", "the held stream must be unaffected"
    finally:
        _release(holder)


def test_captions_follow_the_speech_without_scrolling_the_page(client: Client) -> None:
    # On a small screen the captions box is below the controls: following the heard word
    # scrolled the whole page to it, pulling a reader away from the text and the controls.
    page = client.page
    page.set_viewport_size({"width": 400, "height": 700})
    client.login()
    client.wait_voices()
    client.speak(PARAGRAPH, wps=0)
    page.evaluate("window.scrollTo(0, 0)")
    client.wait_played_ms(3_000)
    assert page.evaluate("window.scrollY") == 0
    # Played out, the highlight is gone; the captions hold the whole text (a code block's
    # indentation included: the box keeps the text's own spacing).
    _wait_state(client, "done", timeout_ms=60_000)
    assert page.eval_on_selector_all(".word.current", "ws => ws.length") == 0
    assert client.errors == []


def test_a_playing_page_rewrites_its_figures_a_few_times_a_second_and_idle_asks_no_frames(
    client: Client,
) -> None:
    # Each figure written into the page repaints it, captions and all: the stats were rewritten
    # at every audio message and player report (~70 times a second) and the caption loop asked
    # for a frame 60 times a second even with nothing playing.
    page = client.page
    page.add_init_script(
        "window.__frames = 0; const raf = window.requestAnimationFrame.bind(window);"
        " window.requestAnimationFrame = (cb) => { window.__frames += 1; return raf(cb); };"
    )
    page.reload()
    client.login()
    client.wait_voices()
    frames = page.evaluate("window.__frames")
    time.sleep(1.0)
    assert page.evaluate("window.__frames") == frames, "an idle page asked for frames"

    client.speak(PARAGRAPH, wps=0)
    client.wait_played_ms(500)
    page.evaluate(
        """() => {
          window.__writes = 0; window.__reports = 0;
          new MutationObserver((ms) => { window.__writes += ms.length; }).observe(
            document.querySelector('#stat-buffered'),
            {childList: true, characterData: true, subtree: true});
          new MutationObserver((ms) => { window.__reports += ms.length; }).observe(
            document.querySelector('#stats'),
            {attributes: true, attributeFilter: ['data-buffered-ms']});
        }"""
    )
    frames = page.evaluate("window.__frames")
    time.sleep(2.0)
    writes, reports = page.evaluate("[window.__writes, window.__reports]")
    assert page.evaluate("window.__frames") > frames + 30, "the highlight stopped following"
    # The exact figure (data-*) follows every report; the words a person reads, 4 times a second.
    assert reports >= 20, reports
    assert 1 <= writes <= 2.0 / 0.25 + 2, (writes, reports)

    _wait_state(client, "done", timeout_ms=60_000)
    time.sleep(0.3)
    frames = page.evaluate("window.__frames")
    time.sleep(1.0)
    assert page.evaluate("window.__frames") == frames, "the page kept asking for frames when done"
    assert client.errors == []


TONE_HZ = 441.25   # at 48 kHz, 0.2 s after a start is 88.25 cycles: the tone's crest
TONE_STEP = 0.5 * 2 * 3.141592653589793 * TONE_HZ / 48000   # its largest step at half scale


def _render_player(page: Any, schedule: list[tuple[float, list[dict]]]) -> np.ndarray:
    """Half a second of the page's own player worklet, rendered offline at 48 kHz: at each
    (time, messages) the rendering is suspended, the messages posted (`{"tone": n}`: `push`
    n samples of a half-scale sine at TONE_HZ from phase 0; with `"crest": true`, a cosine:
    from 0.5 at once), and it resumes a moment later (a
    worklet's messages arrive when they arrive: only a suspended rendering waits for them)."""
    out = page.evaluate(
        """async ({schedule, hz}) => {
          const rate = 48000, ctx = new OfflineAudioContext(1, rate / 2, rate);
          await ctx.audioWorklet.addModule('static/player-worklet.js');
          const node = new AudioWorkletNode(ctx, 'player-processor');
          node.connect(ctx.destination);
          const tone = (n, crest) => Float32Array.from(
            {length: n}, (_, i) => 0.5 * Math.sin(2 * Math.PI * hz * i / rate + (crest ? Math.PI / 2 : 0)));
          for (const [t, messages] of schedule) {
            ctx.suspend(t).then(() => {
              for (const m of messages) {
                node.port.postMessage(m.tone ? {type: 'push', gen: m.gen, samples: tone(m.tone, m.crest)}
                                             : m);
              }
              setTimeout(() => ctx.resume(), 100);
            });
          }
          return Array.from((await ctx.startRendering()).getChannelData(0));
        }""",
        {"schedule": schedule, "hz": TONE_HZ},
    )
    return np.asarray(out, dtype=np.float64)


def _sounding_ms(out: np.ndarray) -> tuple[float, float]:
    """Where the output first and last has sound, in ms."""
    loud = np.flatnonzero(np.abs(out) > 1e-6)
    return loud[0] / 48.0, loud[-1] / 48.0


@pytest.mark.parametrize("cut", ["clear", "reset"])
def test_stop_or_a_new_stream_fades_the_sound_out_rather_than_click(client: Client,
                                                                     cut: str) -> None:
    # A tone from 50 ms, cut 200 ms later at its crest by Stop ("clear") or a new stream
    # ("reset"). Cut at once, the output stepped by 0.5 in one sample (a click); faded over
    # 5 ms, no step is larger than the tone's own.
    start = [{"type": "reset", "gen": 1, "startupSamples": 480}, {"gen": 1, "tone": 48000}]
    stop = ({"type": "clear", "gen": 1} if cut == "clear"
            else {"type": "reset", "gen": 2, "startupSamples": 480})
    out = _render_player(client.page, [(0.05, start), (0.25, [stop])])
    first, last = _sounding_ms(out)
    assert 50 <= first <= 55 and 250 <= last <= 250 + 3 + 5 + 1, (first, last)
    assert np.max(np.abs(np.diff(out))) <= 1.5 * TONE_STEP


def test_sound_resuming_after_the_listener_ran_dry_fades_in(client: Client) -> None:
    # 100 ms of tone, the player runs dry (that stop is unfaded: nothing is left to fade), and
    # at 300 ms more arrives, from its crest (0.5 at once). Resumed at once (mid-word, as a
    # rule) it stepped by 0.5 in one sample; faded in over 5 ms, by no more than the tone.
    start = [{"type": "reset", "gen": 1, "startupSamples": 480}, {"gen": 1, "tone": 4800}]
    more = [{"gen": 1, "tone": 4800, "crest": True}]
    out = _render_player(client.page, [(0.05, start), (0.3, more)])
    resumed = out[int(0.3 * 48000):int(0.39 * 48000)]   # before it runs dry again
    first, _ = _sounding_ms(resumed)
    assert first <= 5, first
    assert np.max(np.abs(np.diff(resumed))) <= 1.5 * TONE_STEP
    assert np.max(np.abs(resumed)) > 0.49                 # then the tone itself, whole


def test_wrong_token_says_authentication_failed(client: Client) -> None:
    # No token at all: the page asks for one (it said "Authentication failed" at Speak), and
    # the voice list says why it is empty (it said "Loading voices…" for ever).
    client.page.wait_for_function(
        "() => document.querySelector('#voice').textContent === 'No voices: API token needed'",
        timeout=10_000,
    )
    client.speak("Hello there.", wps=0)
    client.page.wait_for_function(
        "() => document.querySelector('#stats').dataset.state === 'error'", timeout=10_000,
    )
    assert client.alert() == "This server needs an API token: enter it above"
    client.login("not-the-key")
    client.speak("Hello there.", wps=0)
    client.page.wait_for_function(
        "() => document.querySelector('#stats').dataset.state === 'error'", timeout=10_000,
    )
    assert client.alert() == AUTH_MESSAGE
    assert client.page.is_visible("#message")


# ----------------------------------------------------------------------------------------------
# When things go wrong

def _wait_alert(client: Client, timeout_ms: int = 20_000) -> str:
    client.page.wait_for_function(
        "() => document.querySelector('#message').textContent !== ''", timeout=timeout_ms)
    return client.alert()


def _notice(client: Client) -> str:
    return client.page.inner_text("#notice").strip()


def _active_streams_drop_to_zero(client: Client, server: Server, timeout_s: float) -> bool:
    """Poll /v1/status while the page stays open (its routes keep being served meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (server.status() or {}).get("active_streams") == 0:
            return True
        client.page.wait_for_timeout(200)
    return False


class SocketProxy:
    """Playwright's WebSocket route between the page and the server. `hold` keeps back what
    the server sends (a stalled network path: the server itself carries on), `release` hands
    it over; `sent` has what the page sent, decoded. Python forwards each message, so the test
    waits in Playwright calls (`wait_for_function`, `wait_for_timeout`), never `time.sleep`."""

    def __init__(self, page: Any) -> None:
        self.hold = False
        self.held: list[Any] = []
        self.sent: list[dict[str, Any]] = []
        self.page_side: Any = None
        page.route_web_socket(re.compile(r".*/v1/stream.*"), self._route)

    def _route(self, ws: Any) -> None:
        server = ws.connect_to_server()
        self.page_side = ws

        def from_page(message: Any) -> None:
            if isinstance(message, bytes):
                self.sent.append(msgpack.unpackb(message))
            server.send(message)

        def from_server(message: Any) -> None:
            if self.hold:
                self.held.append(message)
            else:
                ws.send(message)

        ws.on_message(from_page)
        server.on_message(from_server)

    def release(self) -> None:
        self.hold = False
        for message in self.held:
            self.page_side.send(message)
        self.held.clear()

    def sent_types(self, ctx: str) -> list[str]:
        return [m.get("type") for m in self.sent if m.get("ctx") == ctx]

    def first_ctx(self) -> str:
        return next(m["ctx"] for m in self.sent if m.get("type") == "start")


def test_error_mid_stream_cancels_the_stream_on_the_server(
    client: Client, server: Server,
) -> None:
    # text_too_long while the page is still feeding words: the stream stays live on the server
    # (protocol §3), so the page must cancel it, or it holds the server's only slot (the next
    # Speak, this user's or anyone's, is refused) until the tab is closed.
    proxy = SocketProxy(client.page)
    client.login()
    client.wait_voices()
    client.speak("Hello there, " + "x" * 100_001 + " and more words to come after it.", wps=10)
    alert = _wait_alert(client, timeout_ms=30_000)
    assert alert.startswith("The text is too long for one stream"), alert
    assert client.stats()["state"] == "error"
    ctx = proxy.first_ctx()
    assert proxy.sent_types(ctx)[-1] == "cancel", proxy.sent_types(ctx)
    assert _active_streams_drop_to_zero(client, server, timeout_s=5.0), \
        f"the page left its stream live on the server: {server.status()}"
    assert "Cancelled" not in _notice(client), "the cancel after an error is not a Stop"

    # The slot is free for the next Speak (--max-streams 1). A server fault in it is said in
    # words, not as "Server error (internal): ...".
    client.speak(PARAGRAPH, wps=2)
    client.wait_played_ms(100)
    starts = [m for m in proxy.sent if m.get("type") == "start"]
    ctx = starts[-1]["ctx"]
    # Words 500 ms apart ask for the time three words take, lest each be a phrase of its own;
    # at 10 words per second the server's default delay is left alone.
    assert starts[-1]["max_buffer_delay_ms"] == 1500 and "max_buffer_delay_ms" not in starts[0]
    proxy.page_side.send(msgpack.packb(
        {"type": "error", "ctx": ctx, "code": "internal", "message": "model step failed"}))
    # What had arrived is heard first (a server shutting down sends this before it closes:
    # the page cut the audio it held mid-word), then the error is said.
    played = float(client.stats()["playedMs"] or 0)
    if "playing the audio already received" in _notice(client):
        client.wait_played_ms(int(played) + 40)
    assert _wait_alert(client) == "The server failed while speaking: model step failed. Try again"
    assert client.stats()["state"] == "error"
    assert _active_streams_drop_to_zero(client, server, timeout_s=5.0)
    assert client.errors == []


def _record_notices(client: Client) -> None:
    """Keep every text the page's notice shows, in `window.notices`."""
    client.page.evaluate(
        """() => {
          window.notices = [];
          const el = document.querySelector('#notice');
          new MutationObserver(() => window.notices.push(el.textContent))
            .observe(el, {childList: true, characterData: true, subtree: true});
        }"""
    )


def test_a_pause_in_the_text_is_no_stall_and_no_underrun(client: Client) -> None:
    # Words 2.5 s apart: the server speaks them three at a time and says nothing between, the
    # listener dry meanwhile. That is a pause in the text (an LLM calling a tool, a user
    # thinking), not a network stall: the page said "Connection stalled", counted each pause
    # as an underrun, then "too slowly", and after 30 s would cancel a healthy stream.
    client.login()
    client.wait_voices()
    _record_notices(client)
    client.speak("Slowly the keeper climbed all the stairs", wps=0.4)
    _wait_state(client, "done", timeout_ms=60_000)
    notices = client.page.evaluate("() => window.notices")
    assert not [n for n in notices if "stalled" in n or "too slowly" in n], notices
    # The pauses are no underruns. One counted is the server's audio coming late (a loaded
    # host: a CI run saw one, after `end`), and the page says so beside it.
    stats = client.stats()
    assert int(stats["underruns"]) <= int(stats["lateArrivals"]), stats
    assert client.alert() == ""
    assert client.errors == []


def test_a_reply_cut_by_a_new_one_says_what_it_used(client: Client) -> None:
    # Speak while a reply plays (barge-in): its `cancelled` comes after the new one began, and
    # the page dropped it with its usage.
    client.login()
    client.wait_voices()
    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(1000)
    client.page.evaluate(
        """() => { document.querySelector('#text').value = 'And now something else.';
                   document.querySelector('#speak').click(); }"""
    )
    client.page.wait_for_function(
        "() => !document.querySelector('#usage-cut').hidden", timeout=10_000)
    cut = client.page.eval_on_selector("#usage-cut", "e => ({...e.dataset, text: e.textContent})")
    assert float(cut["computeMs"]) > 0 and cut["text"].startswith("The reply cut short used")
    _wait_state(client, "done", timeout_ms=30_000)
    assert not client.page.is_hidden("#usage-cut"), "kept beside the new reply's usage"
    assert client.page.text_content("#usage-chars") == str(len("And now something else."))
    client.speak("Hello.", wps=0)   # a Speak that cuts nothing clears it
    assert client.page.is_hidden("#usage-cut")
    _wait_state(client, "done", timeout_ms=30_000)
    assert client.errors == []


def test_a_start_refused_as_the_server_shuts_down_says_so(client: Client) -> None:
    # Not "Server is at capacity — retrying": the socket closes next.
    proxy = SocketProxy(client.page)
    client.login()
    client.wait_voices()
    proxy.hold = True                      # the server's `ready` is held back ...
    client.speak("Hello there.", wps=0)
    client.page.wait_for_function("() => document.querySelector('#stats').dataset.state"
                                  " === 'streaming'", timeout=10_000)
    client.page.wait_for_timeout(300)
    ctx = proxy.first_ctx()
    proxy.page_side.send(msgpack.packb(    # ... and a refusal comes in its place
        {"type": "error", "ctx": ctx, "code": "overloaded", "retry_after_s": 2,
         "message": "server is shutting down"}))
    assert _wait_alert(client) == "The server is shutting down; try again in a moment"
    assert client.stats()["state"] == "error" and client.stats()["retries"] == "0"
    proxy.release()
    assert client.errors == []


def test_stalled_connection_is_reported_then_the_stream_cancelled(
    client: Client, server: Server,
) -> None:
    # The network path stalls (nothing arrives, nothing is closed): the page says so once the
    # listener has heard everything, and gives up after ?stall_s, cancelling the stream. A
    # status poll that never gets an answer shows "status unavailable" instead of freezing.
    proxy = SocketProxy(client.page)
    client.page.goto(server.url + "/?stall_s=7")
    client.login()
    client.wait_voices()
    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(300)
    proxy.hold = True
    client.page.route(re.compile(r".*/v1/status.*"), lambda route: None)  # never answered
    client.page.wait_for_function(
        "() => document.querySelector('#notice').textContent.startsWith('Connection stalled')",
        timeout=15_000,
    )
    assert client.stats()["state"] == "streaming" and client.alert() == ""
    assert client.page.inner_text("#stat-state").strip() == "connection stalled"
    client.page.wait_for_function(
        "() => document.querySelector('#server-streams').textContent === 'status unavailable'",
        timeout=10_000,
    )
    alert = _wait_alert(client, timeout_ms=15_000)
    assert alert.startswith("The server stopped answering"), alert
    assert client.stats()["state"] == "error"
    assert client.page.is_disabled("#stop")
    ctx = proxy.first_ctx()
    assert proxy.sent_types(ctx)[-1] == "cancel", proxy.sent_types(ctx)
    assert client.errors == []


def test_slow_link_says_so_and_what_arrived_plays_before_the_error(
    client: Client, server: Server,
) -> None:
    # A link too slow for the stream: the listener runs dry again and again (here: the proxy
    # holds the server's messages back until the player underruns), and then the server closes
    # the socket as a slow consumer (1008). The page says it is buffering, plays out what it
    # had received, then says why it stopped. PCM asks for the voice's own rate, not 48 kHz.
    proxy = SocketProxy(client.page)
    client.login()
    client.wait_voices()
    voice = client.page.eval_on_selector("#voice", "s => s.value")
    code, body = _http_get(f"{server.url}/v1/voices?token={API_KEY}")
    rate = next(v["sample_rate"] for v in json.loads(body) if v["id"] == voice)
    client.page.select_option("#format", "pcm_s16le")
    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(300)
    assert client.page.inner_text("#stat-format").strip() == f"PCM {rate / 1000:g} kHz"
    underruns = int(client.stats()["underruns"])
    for _ in range(2):
        proxy.hold = True
        underruns += 1
        client.page.wait_for_function(
            f"() => Number(document.querySelector('#stats').dataset.underruns) >= {underruns}",
            timeout=15_000,
        )
        if underruns >= 2:  # underruns that repeat: said in words while it is dry
            client.page.wait_for_function(
                "() => document.querySelector('#notice').textContent"
                ".startsWith('The audio is arriving too slowly')",
                timeout=5_000,
            )
        proxy.release()
        played = float(client.stats()["playedMs"])
        client.wait_played_ms(played + 500, timeout_ms=15_000)
    assert client.alert() == ""
    # Each time it ran dry, the audio held back came late, and the page tells so.
    assert int(client.stats()["lateArrivals"]) >= 2
    # ... and the cushion a restart waits for doubled each time (80 ms at first): fewer,
    # longer pauses on a link that keeps falling behind, rather than a stutter.
    assert int(client.stats()["cushionMs"]) >= min(1000, 80 * 2 ** underruns)
    assert "audio came late" in client.page.inner_text("#stat-underruns")

    client.page.wait_for_function(  # the server keeps up to 1.5 s ahead of the listener
        "() => Number(document.querySelector('#stats').dataset.bufferedMs) >= 400",
        timeout=20_000,
    )
    proxy.page_side.close(code=1008, reason="slow consumer")
    stats = client.stats()
    played_at_close, buffered_at_close = float(stats["playedMs"]), float(stats["bufferedMs"])
    client.page.wait_for_function(
        "() => document.querySelector('#notice').textContent.startsWith('Connection lost')",
        timeout=5_000,
    )
    assert client.alert() == "", "what has arrived plays before the error shows"
    alert = _wait_alert(client, timeout_ms=15_000)
    assert alert.startswith("The connection is too slow for this audio stream"), alert
    stats = client.stats()
    assert stats["state"] == "error"
    assert float(stats["playedMs"]) >= played_at_close + 0.8 * buffered_at_close, \
        (played_at_close, buffered_at_close, stats)
    assert client.errors == []


def test_starting_server_is_waited_for_and_voices_reload_when_ready(
    client: Client, server: Server,
) -> None:
    # A server still loading its voice refuses the upgrade with 503 "server is not ready
    # (loading the voice)" and lists its voices as not loaded. Routes play that server here.
    # The page must say "starting" (not "at capacity"), wait past ?retry_s (the window for a
    # full server), and reload the voices once /v1/status says ready.
    page = client.page
    starting = True
    code, body = _http_get(f"{server.url}/v1/voices?token={API_KEY}")
    voices = [dict(v, loaded=False) for v in json.loads(body)]
    status = {"active_streams": 0, "max_streams": 1, "capacity_load": None,
              "vram_used_bytes": None, "vram_total_bytes": None, "gpu_power_w": None,
              "retry_after_s": 1, "ready": False}
    refusal = {"error": {"code": "overloaded", "retry_after_s": 1,
                         "message": "server is not ready (loading the voice)"}}

    def answer(body_json: Any, status_code: int = 200) -> Any:
        def handler(route: Any) -> None:
            if not starting:
                route.continue_()
            else:
                route.fulfill(status=status_code, json=body_json,
                              headers={"Retry-After": "1"} if status_code == 503 else None)
        return handler

    page.route(re.compile(r".*/v1/voices(\?.*)?$"), answer(voices))
    page.route(re.compile(r".*/v1/status(\?.*)?$"), answer(status))
    page.route(re.compile(r".*/v1/stream(\?.*)?$"), answer(refusal, 503))
    page.route_web_socket(
        re.compile(r".*/v1/stream.*"),
        lambda ws: ws.close() if starting else ws.connect_to_server(),
    )
    page.goto(server.url + "/?retry_s=1")
    client.login()
    client.wait_voices()
    assert "not loaded" in page.inner_text("#voice")
    client.speak("Hello there.", wps=0)
    _wait_state(client, "waiting", timeout_ms=10_000)
    assert re.fullmatch(r"Server is starting \(loading the voice\) — retrying in \d+ s",
                        _notice(client)), _notice(client)
    _wait_state(client, "waiting", timeout_ms=15_000, retries=2)  # past ?retry_s=1
    assert client.alert() == ""
    assert "starting" in page.inner_text("#server-capacity")

    starting = False  # ready: the routes pass everything to the real server from now on
    page.wait_for_function(
        "() => !document.querySelector('#voice').textContent.includes('not loaded')",
        timeout=10_000,
    )
    _wait_state(client, "done", timeout_ms=60_000)
    assert client.alert() == ""
    assert client.errors == []


def test_audio_blocked_by_autoplay_policy_asks_for_a_click(
    browser: Any, server: Server,
) -> None:
    # Without a user gesture the AudioContext cannot start (Chromium's default autoplay
    # policy). The page asks for a click within ~1 s instead of "connecting…" for ever, takes
    # no server slot meanwhile, and plays once clicked. Nothing here may evaluate script in the
    # page (Playwright's evaluate counts as a gesture): the page reports through the console.
    strict = browser.browser_type.launch(
        executable_path=str(CHROMIUM), headless=True,
        args=[a for a in CHROMIUM_ARGS if not a.startswith("--autoplay-policy")],
    )
    try:
        page = strict.new_page()
        page.add_init_script(
            "document.addEventListener('DOMContentLoaded', () => {"
            f"  const token = document.querySelector('#token'); token.value = '{API_KEY}';"
            "  token.dispatchEvent(new Event('change'));"
            "  const say = (what) => console.log(what);"
            "  new MutationObserver(() => say('notice: ' + document.querySelector('#notice')"
            "    .textContent)).observe(document.querySelector('#notice'), {childList: true});"
            "  new MutationObserver(() => say('state: ' + document.querySelector('#stats')"
            "    .dataset.state)).observe(document.querySelector('#stats'),"
            "    {attributes: true, attributeFilter: ['data-state']});"
            "  document.querySelector('#text').value = 'Hello, nobody clicked.';"
            "  const go = setInterval(() => { if (document.querySelector('#voice').value) {"
            "    clearInterval(go); document.querySelector('#compose').requestSubmit(); } }, 100);"
            "});"
        )
        with page.expect_console_message(
            lambda m: m.text.startswith("notice: ") and "click anywhere" in m.text, timeout=15_000,
        ):
            page.goto(server.url + "/")
        assert (server.status() or {}).get("active_streams") == 0
        with page.expect_console_message(lambda m: m.text == "state: done", timeout=60_000):
            page.mouse.click(5, 5)  # a user gesture: the audio may start now
    finally:
        strict.close()


def test_keyboard_stop_keeps_focus_escape_stops_and_highlight_contrast(
    client: Client,
) -> None:
    page = client.page
    client.login()
    client.wait_voices()
    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(300)
    page.focus("#stop")
    page.keyboard.press("Enter")
    assert client.stats()["state"] == "idle"
    # Stop is disabled once pressed: the focus must not fall to <body> (keyboard users lose
    # their place); it goes to Speak.
    assert page.evaluate("document.activeElement.id") == "speak"

    client.speak(LONG_TEXT, wps=0)
    client.wait_played_ms(300)
    page.focus("#text")
    page.keyboard.press("Escape")
    _wait_state(client, "idle", timeout_ms=2_000)

    # The current word's text against its highlight, light and dark: WCAG AA wants 4.5:1.
    def luminance(rgb: list[float]) -> float:
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
               for c in (v / 255 for v in rgb)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        fg, bg = page.evaluate(
            """() => {
              const w = document.createElement('span');
              w.className = 'word current';
              w.textContent = 'word';
              document.querySelector('#captions').append(w);
              const s = getComputedStyle(w);
              const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
              const out = [rgb(s.color), rgb(s.backgroundColor)];
              w.remove();
              return out;
            }"""
        )
        lo, hi = sorted([luminance(fg), luminance(bg)])
        contrast = (hi + 0.05) / (lo + 0.05)
        assert contrast >= 4.5, f"{scheme}: current word {fg} on {bg} is {contrast:.2f}:1"
    assert client.errors == []


def test_token_goes_in_a_header_and_a_401_stops_the_status_poll(
    client: Client, server: Server,
) -> None:
    page = client.page
    requests: list[Any] = []
    page.on("request", lambda r: requests.append(r))
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.reload()  # no token yet: /v1/status answers 401
    page.wait_for_function(
        "() => document.querySelector('#server-streams').textContent.includes('token')",
        timeout=10_000,
    )
    page.wait_for_timeout(2.5 * 2000)  # two more poll periods
    polls = [r for r in requests if "/v1/status" in r.url]
    assert len(polls) == 1, f"{len(polls)} status requests after a 401 without a token"

    client.login()
    client.wait_voices()
    page.wait_for_function(
        "() => /^\\d+\\/1 streams$/.test(document.querySelector('#server-streams').textContent)",
        timeout=6_000,
    )
    client.speak("Hello.", wps=0)
    _wait_state(client, "done", timeout_ms=30_000)
    api = [r for r in requests if "/v1/" in r.url]
    assert not [r.url for r in api if "token=" in r.url], "the token belongs in a header"
    authorized = [r for r in api if r.headers.get("authorization") == f"Bearer {API_KEY}"]
    assert {"/v1/voices", "/v1/status"} <= {urllib.parse.urlsplit(r.url).path
                                             for r in authorized}
    assert sockets and all(f"token={API_KEY}" in url for url in sockets)
    assert client.errors == []


# ----------------------------------------------------------------------------------------------
# Behind a reverse proxy, under a path prefix

class PrefixProxy:
    """A reverse proxy that serves the server under `prefix`, as nginx's
    `location /tts/ { proxy_pass http://127.0.0.1:8000/; }` (with the Upgrade headers) does:
    GET /tts/x?q goes to the server's /x?q, a WebSocket upgrade too, frames and close codes
    forwarded both ways. Anything outside the prefix is answered 404 and kept in `outside`, so
    a page that asks the proxy's root for something is caught. Runs its own event loop in a
    thread (the tests are synchronous)."""

    def __init__(self, upstream: str, prefix: str = "/tts/") -> None:
        self.upstream = upstream
        self.prefix = prefix
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.inside: list[str] = []
        self.outside: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: Any = None
        self.session: Any = None

    def __enter__(self) -> PrefixProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        from aiohttp import ClientSession, web

        self.session = ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        if not request.path.startswith(self.prefix):
            self.outside.append(request.path_qs)
            return web.Response(status=404, text="not under the proxy's prefix")
        self.inside.append(request.path_qs)
        target = self.upstream + request.path_qs[len(self.prefix) - 1:]
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "origin", "accept", "cache-control")}
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._socket(request, target, headers)
        async with self.session.request(request.method, target, headers=headers,
                                        data=await request.read()) as resp:
            body = await resp.read()
            keep = ("content-type", "content-encoding", "retry-after", "cache-control")
            return web.Response(
                status=resp.status, body=body,
                headers={k: v for k, v in resp.headers.items() if k.lower() in keep})

    async def _socket(self, request: Any, target: str, headers: dict[str, str]) -> Any:
        from aiohttp import WSMsgType, WSServerHandshakeError, web

        headers.pop("origin", None)
        headers.pop("Origin", None)
        try:
            upstream = await self.session.ws_connect(
                target.replace("http", "ws", 1), headers=headers,
                origin=request.headers.get("Origin"))
        except WSServerHandshakeError as err:  # refused before the upgrade: say it as HTTP
            return web.Response(status=err.status, text=err.message)
        page = web.WebSocketResponse()
        await page.prepare(request)

        async def relay(source: Any, sink: Any, close: Any) -> None:
            async for msg in source:
                if msg.type == WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await sink.send_str(msg.data)
            await close()

        tasks = [asyncio.ensure_future(relay(page, upstream, upstream.close)),
                 asyncio.ensure_future(relay(upstream, page, lambda: page.close(
                     code=upstream.close_code or 1000)))]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await upstream.close()
        return page


def test_page_under_a_path_prefix_behind_a_proxy_speaks_to_the_end(
    browser: Any, server: Server,
) -> None:
    # An operator serves the client at https://host/tts/ (the proxy strips /tts). Every URL the
    # page uses must stay under /tts/: its scripts and styles, the API, the WebSocket. They
    # were absolute (/static/app.js, /v1/stream), so the page loaded without its script.
    server.wait_idle()
    with PrefixProxy(server.url, "/tts/") as proxy:
        context = browser.new_context(viewport={"width": 1100, "height": 1000})
        try:
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            client = Client(page, server, url=proxy.url + "/tts/")
            client.login()
            try:
                client.wait_voices()
            except sync_api.TimeoutError:
                pytest.fail(f"no voices; asked outside /tts/: {proxy.outside}")
            page.wait_for_function(  # the status poll goes through the prefix too
                "() => /^\\d+\\/1 streams$/.test("
                "document.querySelector('#server-streams').textContent)",
                timeout=6_000,
            )
            text = "Hello from behind a proxy. The page lives under a prefix."
            client.speak(text, wps=10)
            _wait_state(client, "done", timeout_ms=60_000)
            assert client.alert() == ""
            assert " ".join(page.inner_text("#captions").split()) == text
            assert page.eval_on_selector_all(".word", "ws => ws.length") == len(text.split())
            assert float(client.stats()["playedMs"]) > 1000
            assert proxy.outside == [], proxy.outside
            assert sockets and all(
                url.startswith(f"ws://127.0.0.1:{proxy.port}/tts/v1/stream") for url in sockets
            ), sockets
            page_urls = [u for u in requests if not u.startswith("data:")]
            assert all(u.startswith(proxy.url + "/tts/") for u in page_urls), page_urls
            assert {"/tts/static/app.js", "/tts/static/style.css", "/tts/v1/voices",
                    "/tts/v1/status"} <= {urllib.parse.urlsplit(u).path for u in page_urls}
            assert client.errors == []
        finally:
            context.close()
