"""A small protocol-v1 client for tests and manual checks (aiohttp WebSocket + msgpack).

    async with aiohttp.ClientSession() as http:
        client = await ProtocolClient.connect(http, "ws://127.0.0.1:8000/v1/stream")
        result = await client.speak("Hello there.", format="pcm_s16le", sample_rate=16000)
        result.done["usage"]
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

Msg = dict[str, Any]


@dataclass
class Utterance:
    """Every message one context received, split by type."""

    ctx: str
    ready: Msg | None = None
    phrases: list[Msg] = field(default_factory=list)
    words: list[Msg] = field(default_factory=list)
    audio: list[Msg] = field(default_factory=list)
    done: Msg | None = None
    errors: list[Msg] = field(default_factory=list)
    cancelled: Msg | None = None
    order: list[str] = field(default_factory=list)  # message types in arrival order

    def add(self, msg: Msg) -> None:
        kind = msg["type"]
        self.order.append(kind)
        if kind == "ready":
            self.ready = msg
        elif kind == "phrase":
            self.phrases.append(msg)
        elif kind == "words":
            self.words.append(msg)
        elif kind == "audio":
            self.audio.append(msg)
        elif kind == "done":
            self.done = msg
        elif kind == "error":
            self.errors.append(msg)
        elif kind == "cancelled":
            self.cancelled = msg

    @property
    def finished(self) -> bool:
        return self.done is not None or self.cancelled is not None or bool(self.errors)


class ProtocolClient:
    """One socket; `recv` returns decoded server maps in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, url: str, **kwargs: Any) -> ProtocolClient:
        return cls(await http.ws_connect(url, max_msg_size=0, **kwargs))

    async def send(self, msg: Msg) -> None:
        await self.ws.send_bytes(msgpack.packb(msg, use_bin_type=True))

    async def recv(self, timeout: float = 20.0) -> Msg:
        """The next server message; raises ConnectionError when the socket closed instead.
        The timeout is absolute: aiohttp's own restarts at every ping it answers (the server
        pings each second while a stream is live)."""
        async with asyncio.timeout(timeout):
            frame = await self.ws.receive()
        if frame.type is not aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"socket closed: {frame.type.name} {frame.data!r} "
                                  f"{frame.extra!r}")
        msg = msgpack.unpackb(frame.data, raw=False)
        assert isinstance(msg, dict) and isinstance(msg.get("type"), str), msg
        return msg

    async def recv_until(self, stop: Callable[[Msg], bool], timeout: float = 30.0) -> list[Msg]:
        """Messages up to and including the first one for which `stop` is true."""
        got: list[Msg] = []
        async with asyncio.timeout(timeout):
            while True:
                got.append(await self.recv(timeout=timeout))
                if stop(got[-1]):
                    return got

    async def collect(self, ctxs: list[str], timeout: float = 60.0,
                      into: dict[str, Utterance] | None = None) -> dict[str, Utterance]:
        """Receive until every ctx has finished (done, cancelled or an error), adding to
        `into`'s utterances where given."""
        out = {ctx: Utterance(ctx) for ctx in ctxs} | (into or {})
        async with asyncio.timeout(timeout):
            while not all(u.finished for u in out.values()):
                msg = await self.recv(timeout=timeout)
                ctx = msg.get("ctx", "default")
                out.setdefault(ctx, Utterance(ctx)).add(msg)
        return out

    async def speak(self, text: str | list[str], *, ctx: str = "default", timeout: float = 60.0,
                    **start: Any) -> Utterance:
        """start, text (one message per fragment), end; then everything up to `done`."""
        await self.send({"type": "start", "ctx": ctx, **start})
        for fragment in [text] if isinstance(text, str) else text:
            await self.send({"type": "text", "ctx": ctx, "text": fragment})
        await self.send({"type": "end", "ctx": ctx})
        return (await self.collect([ctx], timeout=timeout))[ctx]

    async def speak_when_admitted(self, text: str, *, ctx: str = "default", tries: int = 10,
                                  timeout: float = 60.0, **start: Any) -> Utterance:
        """`speak`, as a client refused for load does it: a `start` answered `overloaded` is
        asked again after the hint (at most 2 s). For tests about something else than
        admission, whose streams starting together a loaded host may refuse."""
        for _ in range(tries):
            await self.send({"type": "start", "ctx": ctx, **start})
            [*_, answer] = await self.recv_until(
                lambda m: m.get("ctx") == ctx and m["type"] in ("ready", "error"), timeout)
            if answer["type"] == "ready":
                break
            assert answer["code"] == "overloaded", answer
            await asyncio.sleep(min(answer.get("retry_after_s") or 1, 2))
        else:
            raise AssertionError(f"start of {ctx!r} refused {tries} times")
        await self.send({"type": "text", "ctx": ctx, "text": text})
        await self.send({"type": "end", "ctx": ctx})
        heard = Utterance(ctx)
        heard.add(answer)
        return (await self.collect([ctx], timeout=timeout, into={ctx: heard}))[ctx]

    async def close(self) -> None:
        await self.ws.close()


def audio_duration_ms(msg: Msg, *, sample_rate: int) -> float:
    """Duration of one `audio` message: opus 20 ms per packet, pcm from its byte length."""
    data = msg["data"]
    if isinstance(data, list):
        return 20.0 * len(data)
    return len(data) / 2 * 1000.0 / sample_rate
