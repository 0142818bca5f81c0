"""The protocol's contract per context, checked on what one socket received (docs/protocol.md
§2, §4, §5), whatever the client sent: a context is live from `ready` until `done` or
`cancelled`; only a live context gets `phrase`, `words` and `audio`; phrases count from 0 and
each comes before its audio; audio `seq` counts from 0 and `pts_ms` runs on without a gap;
`done` counts the phrases sent; every `cancel` is answered by exactly one `cancelled`, with the
usage of the stream it stopped (at least the phrases sent; null when nothing was live). An
`internal` error (a server fault, which also ends a context) fails the check."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from server.protocol import USAGE_FIELDS
from tests.helpers.ws_client import audio_duration_ms

Msg = dict[str, Any]


@dataclass
class _Context:
    live: bool = False
    sample_rate: int = 0
    seq: int = 0
    pts_ms: float = 0.0
    phrases: dict[int, float] = field(default_factory=dict)   # id -> start_ms


@dataclass
class ContractChecker:
    contexts: dict[str, _Context] = field(default_factory=dict)
    cancelled: Counter[str] = field(default_factory=Counter)

    def feed(self, msg: Msg) -> None:
        kind, ctx = msg["type"], msg.get("ctx")
        if kind == "error" and ctx is None:
            assert msg["code"] == "bad_request", msg     # the frame named no valid context
            return
        c = self.contexts.setdefault(ctx, _Context())
        where = f"ctx {ctx!r}: {kind}"
        if kind == "ready":
            assert not c.live, f"{where} for a live context"
            self.contexts[ctx] = _Context(live=True, sample_rate=msg["sample_rate"])
        elif kind == "phrase":
            assert c.live, f"{where} for a context that is not live"
            assert msg["id"] == len(c.phrases), f"{where} id {msg['id']} after {len(c.phrases)}"
            assert c.pts_ms <= msg["start_ms"] + 0.01, f"{where} after its audio was sent"
            c.phrases[msg["id"]] = msg["start_ms"]
        elif kind == "words":
            assert c.live and msg["phrase_id"] in c.phrases, f"{where} for no phrase"
        elif kind == "audio":
            assert c.live, f"{where} for a context that is not live"
            assert msg["seq"] == c.seq, f"{where} seq {msg['seq']}, expected {c.seq}"
            assert abs(msg["pts_ms"] - c.pts_ms) <= 0.01, f"{where} pts {msg['pts_ms']} after {c.pts_ms}"
            c.seq += 1
            c.pts_ms += audio_duration_ms(msg, sample_rate=c.sample_rate)
        elif kind == "done":
            assert c.live, f"{where} for a context that is not live"
            assert msg["usage"]["phrases"] == len(c.phrases), f"{where} {msg['usage']}"
            c.live = False
        elif kind == "cancelled":
            usage = msg["usage"]
            if not c.live:
                assert usage is None, f"{where} usage for nothing live: {usage}"
            elif usage is not None:   # (null only if the server could not tell in time)
                assert set(usage) == set(USAGE_FIELDS), f"{where} {usage}"
                assert usage["phrases"] >= len(c.phrases), f"{where} {usage}"
            c.live = False
            self.cancelled[ctx] += 1
        elif kind == "error":
            assert msg["code"] != "internal", msg
        else:
            raise AssertionError(f"{where}: not a message type of the protocol")

    def live(self) -> list[str]:
        """The contexts live now."""
        return [ctx for ctx, c in self.contexts.items() if c.live]

    def check_cancels(self, sent: Counter[str]) -> None:
        """Each `cancel` sent was answered once, and no other `cancelled` came."""
        assert self.cancelled == sent, (dict(self.cancelled), dict(sent))
