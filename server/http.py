"""HTTP endpoints: the WebSocket upgrade (auth, origin, admission first), status, voices,
health, metrics and the browser client.

Refusals happen before the upgrade, as plain HTTP with a JSON `error_body`, so a client learns
why without opening a socket: 403 (Origin not allowed), 401 (API key), 503 + `Retry-After`
(capacity, loading, shutting down). A plain GET on /v1/stream answers the same way, which is how
the browser client explains a failed WebSocket (browsers hide the upgrade's HTTP status).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from server.admission import RefusalReason
from server.metrics import CONTENT_TYPE
from server.protocol import ErrorCode, error_body
from server.session import Session
from server.state import STATE, ServerState

log = logging.getLogger(__name__)


WEB_CLIENT_DIR: Final = Path(__file__).resolve().parent.parent / "web_client"
# aiohttp closes a socket (1009) on a frame over max_msg_size instead of handing it to us; with
# twice the protocol limit, frames up to that size are answered with `bad_request` instead.
FRAME_SIZE_HEADROOM: Final = 2


def add_routes(app: web.Application, *, web_client_dir: Path = WEB_CLIENT_DIR) -> None:
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/v1/voices", voices)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", _index(web_client_dir / "index.html"))
    app.router.add_static("/static/", web_client_dir)


# ---------------------------------------------------------------------------- the socket


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /v1/stream: refuse over HTTP when we must, else upgrade and serve a Session."""
    state = request.app[STATE]
    client = client_of(request, state)
    # A plain GET is no connection refused but a question: why was mine? (the browser client
    # asks so after a failed upgrade): answered alike, neither counted nor logged again.
    asked = request.headers.get("Upgrade", "").lower() != "websocket"
    refusal = (_access_refusal(request, state, check_origin=True)
               or _socket_refusal(state, client, peer=request.remote, count=not asked)
               or _capacity_refusal(state, peer=request.remote, count=not asked))
    if refusal is not None:
        return refusal
    limits = state.cfg.limits
    ws = web.WebSocketResponse(
        max_msg_size=FRAME_SIZE_HEADROOM * limits.max_frame_bytes,
        heartbeat=limits.heartbeat_s,
        # The session answers pings itself and sees every pong: its lag probe times them, and
        # its idle deadline holds (aiohttp's receive() swallows them and restarts its timeout).
        autoping=False,
        compress=False,  # audio does not deflate; compressing it would only burn loop CPU
    )
    if not ws.can_prepare(request).ok:
        return _error(426, ErrorCode.BAD_REQUEST, "this endpoint is a WebSocket (upgrade "
                      "required)", headers={"Upgrade": "websocket", "Connection": "Upgrade"},
                      state=state)
    try:
        await ws.prepare(request)
    except ConnectionError:   # the client went before the upgrade's answer reached it
        # Routine (a client that gave up waiting, a reset): aiohttp logged each one as an
        # ERROR with its traceback, with no limit on how many.
        log.debug("socket %s: gone before the upgrade was answered", request.remote)
        return ws
    session = Session(ws, request, state, client=client)
    state.session_opened(session, client)
    try:
        await session.run()
    finally:
        state.session_closed(session, client)
    return ws


def _socket_refusal(state: ServerState, client: str, *, peer: str | None,
                    count: bool = True) -> web.Response | None:
    """503 before the upgrade when `limits.max_sockets` WebSockets are open (past the process's
    open-file limit a connection would be dropped unanswered: server/fds.py), or this client
    holds `limits.sockets_per_client`."""
    per_client = state.cfg.limits.sockets_per_client
    if len(state.sessions) >= state.max_sockets:
        why, message = (f"{len(state.sessions)} WebSockets open (limits.max_sockets)",
                        "too many connections open on this server; try again later")
    elif per_client and state.clients.held(client)[1] >= per_client:
        who = state.client_kind
        why, message = (f"{per_client} WebSockets of this {who} open "
                        "(limits.sockets_per_client)",
                        f"at most {per_client} open connections per {who}; close one first")
    else:
        return None
    return _refused(state, RefusalReason.SOCKETS, "socket", peer, why, message, count=count)


def _capacity_refusal(state: ServerState, *, peer: str | None,
                      count: bool = True) -> web.Response | None:
    """503 before the upgrade when a `start` would be refused anyway (one log line, rate-limited:
    a stream that could not start is a lifecycle event like the `start` refused after the
    upgrade)."""
    if (why := state.unavailable()) is not None:
        reason, message = why
        return _refused(state, reason, "stream", peer, message, message, count=count)
    decision = state.admission.check(count=count)
    if decision.ok:
        return None
    if count:
        state.refusal_log.refused(decision.reason or "", "stream refused before the upgrade "
                                  "peer=%s: overloaded (%s)", peer, decision.message)
    return _overloaded(state, decision.message, decision.retry_after_s, count=count)


def _refused(state: ServerState, reason: RefusalReason, what: str, peer: str | None, why: str,
             message: str, *, count: bool = True) -> web.Response:
    """A refusal decided here, not by admission's load check: counted, logged, 503."""
    if count:
        state.admission.count_refusal(reason)
        state.refusal_log.refused(reason, "%s refused before the upgrade peer=%s: %s", what,
                                  peer, why)
    return _overloaded(state, message, count=count)


def _overloaded(state: ServerState, message: str, retry_after_s: int | None = None, *,
                count: bool = True) -> web.Response:
    if retry_after_s is None:
        retry_after_s = state.admission.retry_hint()
    body = error_body(ErrorCode.OVERLOADED, message, retry_after_s=retry_after_s)
    if count:
        state.count_error(ErrorCode.OVERLOADED.value)
    return web.json_response(body, status=503, headers={"Retry-After": str(retry_after_s)})


# ---------------------------------------------------------------------------- auth


def _access_refusal(
    request: web.Request, state: ServerState, *, check_origin: bool,
) -> web.Response | None:
    """403 for a browser Origin not allowed, 401 for a missing or wrong API key."""
    cfg = state.cfg.server
    origin = request.headers.get("Origin")
    origin_checked = check_origin and cfg.allowed_origins and origin is not None
    if origin_checked and origin not in cfg.allowed_origins:
        state.refusal_log.refused("origin", "refused %s peer=%s: Origin %r is not in "
                                  "server.allowed_origins", request.path, request.remote, origin)
        return _error(403, ErrorCode.UNAUTHORIZED, "origin not allowed", state=state)
    if cfg.api_keys and not _key_ok(_presented_key(request), cfg.api_keys):
        state.refusal_log.refused("api_key", "refused %s peer=%s: %s API key", request.path,
                                  request.remote, "wrong" if _presented_key(request) else "no")
        return _error(401, ErrorCode.UNAUTHORIZED,
                      "missing or wrong API key (Authorization: Bearer KEY, or ?token=KEY)",
                      headers={"WWW-Authenticate": "Bearer"}, state=state)
    return None


def client_of(request: web.Request, state: ServerState) -> str:
    """Who a socket's contexts count for (`limits.contexts_per_client`): the API key presented
    (checked before the upgrade) where keys are configured, else the peer's address."""
    key = _presented_key(request) if state.cfg.server.api_keys else None
    if key:
        return "key " + hashlib.sha256(key.encode()).hexdigest()[:16]   # never the key itself
    return f"address {request.remote}"


def _presented_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.query.get("token")


def _key_ok(key: str | None, keys: tuple[str, ...]) -> bool:
    if not key:
        return False
    given = key.encode()
    # Compare with every key, without stopping early: timing must not tell which key is close.
    return any([hmac.compare_digest(given, k.encode()) for k in keys])


def _error(
    status: int, code: ErrorCode, message: str, *, state: ServerState,
    headers: dict[str, str] | None = None,
) -> web.Response:
    state.count_error(code.value)
    return web.json_response(error_body(code, message), status=status, headers=headers)


# ---------------------------------------------------------------------------- endpoints


async def voices(request: web.Request) -> web.Response:
    """GET /v1/voices: every known voice; `loaded` is true for the one that can speak now."""
    state = request.app[STATE]
    refusal = _access_refusal(request, state, check_origin=False)
    if refusal is not None:
        return refusal
    served = state.model.voice
    listed = {v.id: v for v in state.voices.voices()}
    listed.setdefault(served.id, served)  # the engine.voice config may be a path
    return web.json_response([
        {"id": v.id, "language": v.language, "sample_rate": v.sample_rate,
         "speakers": v.speakers, "quality": v.quality,
         "loaded": v.id == served.id and state.model.ready}
        for v in sorted(listed.values(), key=lambda v: v.id)
    ])


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: load at a glance (the browser client polls it); null when unknown."""
    state = request.app[STATE]
    refusal = _access_refusal(request, state, check_origin=False)
    if refusal is not None:
        return refusal
    return web.json_response(status_body(state))


def status_body(state: ServerState) -> dict[str, Any]:
    scheduler = state.model.scheduler
    utilisation = None if scheduler is None else scheduler.load().utilisation
    load = None if utilisation is None else round(utilisation, 4)   # None: not measured yet
    gpu = state.gpu_sample
    return {
        "active_streams": state.admission.server_streams,
        "max_streams": state.cfg.admission.max_streams,
        "capacity_load": load,
        "vram_used_bytes": None if gpu is None else gpu.vram_used_bytes,
        "vram_total_bytes": None if gpu is None else gpu.vram_total_bytes,
        "gpu_power_w": None if gpu is None else gpu.power_w,
        "event_loop_busy": None if state.loop_busy is None else round(state.loop_busy, 4),
        "encoders_busy": None if state.encoders is None else round(state.encoders.busy, 4),
        "retry_after_s": state.cfg.admission.retry_after_s,
        "ready": state.model.ready,
        "status": health(state)[1]["status"],   # /healthz's: "ok" only while it takes streams
    }


def health(state: ServerState) -> tuple[int, dict[str, Any]]:
    """/healthz's answer: 200 once the voice is loaded and warmed up; 503 before (or if it
    failed), from the moment the server starts shutting down (draining its live streams), and
    while a back end does not answer (front ends)."""
    model = state.model
    if state.shutting_down:   # draining: a load balancer should send new users elsewhere
        return 503, {"status": "shutting_down", "voice": model.voice.id}
    if model.ready and (why := model.unanswered()) is not None:
        return 503, {"status": "unresponsive", "error": why}
    if model.ready:
        return 200, {"status": "ok", "voice": model.voice.id}
    if model.failure is not None:
        return 503, {"status": "failed", "error": model.failure}
    return 503, {"status": "loading", "voice": model.voice.id}


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: `health`."""
    code, body = health(request.app[STATE])
    return web.json_response(body, status=code)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition (no auth: scrapers usually have no key)."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _index(path: Path) -> Any:
    async def index(request: web.Request) -> web.FileResponse:
        """GET /: the browser client."""
        return web.FileResponse(path)
    return index
