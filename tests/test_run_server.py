"""run_server.py as an operator runs it: real signals to a real process.

SIGTERM with a stream live: the stream is heard to its `done`, /healthz turns 503 at once so a
load balancer sends new users elsewhere, and the process exits 0 once the stream has finished.
(The drain's rules, a second signal and the timeout are tested in-process in test_server.py.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300.0   # load and warm-up: ~30 s on a quiet 2-core machine
TEXT = ("This sentence keeps the voice busy for a few seconds, so that the server has a live "
        "stream to wait for when it is told to stop.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _healthy(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            async with http.get(url + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass   # not listening yet
        await asyncio.sleep(0.5)
    raise AssertionError(f"not healthy after {STARTUP_TIMEOUT_S} s")


def test_sigterm_lets_the_live_stream_finish_then_exits_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "run_server.py", "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        asyncio.run(_speak_through_a_sigterm(url, proc))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "draining: 1 live stream(s)" in text and "drained: every live stream finished" in text
    assert "Traceback" not in text and "server stopped" in text


async def _speak_through_a_sigterm(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        await _healthy(http, url, proc)
        # Warm-up and its cost probes took the model thread's time for no stream: counted.
        async with http.get(url + "/metrics") as resp:
            metrics = await resp.text()
        for kind in ("warmup", "cost_probe"):
            series = f'tts_model_overhead_seconds_total{{kind="{kind}"}} '
            value = next(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith(series))
            assert value > 0.01, (kind, value)
        ws = await http.ws_connect(url.replace("http", "ws") + "/v1/stream")
        for msg in ({"type": "start", "ctx": "s"}, {"type": "text", "ctx": "s", "text": TEXT},
                    {"type": "end", "ctx": "s"}):
            await ws.send_bytes(msgpack.packb(msg))
        kinds = []
        while not kinds or kinds[-1] != "audio":
            kinds.append(msgpack.unpackb((await ws.receive(timeout=120)).data)["type"])
        proc.send_signal(signal.SIGTERM)
        for _ in range(50):       # the signal is handled between two loop iterations
            async with http.get(url + "/healthz") as resp:
                health = resp.status, (await resp.json())["status"]
            if health != (200, "ok"):
                break
            await asyncio.sleep(0.1)
        assert health == (503, "shutting_down")
        while (frame := await ws.receive(timeout=120)).type is aiohttp.WSMsgType.BINARY:
            kinds.append(msgpack.unpackb(frame.data)["type"])
        assert kinds[-1] == "done" and "error" not in kinds
        assert (frame.type, frame.data) == (aiohttp.WSMsgType.CLOSE, 1001)


def test_port_0_logs_the_port_the_system_chose(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "run_server.py", "--host", "127.0.0.1",
                                 "--port", "0", "--log-level", "INFO"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        line = next(x for x in log.read_text().splitlines() if "listening on" in x)
        port = int(line.split("listening on http://127.0.0.1:")[1].split(";")[0])
        assert port > 0
        # That port is the server's: it answers (503 while the voice is still loading).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


def test_openmp_threads_spin_briefly_unless_the_environment_says_otherwise() -> None:
    # libgomp reads GOMP_SPINCOUNT as PyTorch loads: run_server sets it from the config first
    # (BENCHMARKS.md, "OpenMP threads that spin"); a fresh interpreter shows what it sets.
    import os

    code = ("import os, sys, run_server\n"
            "from server.config import load_config\n"
            "run_server._openmp_spin(load_config(None, {}))\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n")
    root = Path(__file__).resolve().parent.parent

    def spin(**env: str) -> str:
        base = {k: v for k, v in os.environ.items()
                if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**base, **env},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert spin() == "10000 False"                        # set before PyTorch is loaded
    assert spin(GOMP_SPINCOUNT="500") == "500 False"      # the operator's own wins
    assert spin(OMP_WAIT_POLICY="PASSIVE") == "None False"
