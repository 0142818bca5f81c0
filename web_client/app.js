// Browser client for the streaming TTS server (protocol v1, see docs/protocol.md).
//
// Served by the server itself: the page at GET /, this directory under /static/ (so this file is
// /static/app.js and the msgpack package is /static/node_modules/@msgpack/msgpack/...). No
// bundler: modules are imported relative to this file.
//
// Every URL the page uses is relative to the page (`pageUrl`), never absolute: behind a reverse
// proxy that serves the server under a prefix (page at /tts/), /tts/v1/stream is the server's
// /v1/stream, and "/v1/stream" would be the proxy's own. The paths below are the server's.
//
// HTTP endpoints this page uses (same origin; an entered API token goes in an
// `Authorization: Bearer` header, and as `?token=` only on the WebSocket, because browsers
// cannot set headers on one). Every fetch is given up after a few seconds, so a stalled server
// shows as "unavailable" rather than freezing the page:
//   GET /v1/voices  -> [{id, language, sample_rate, speakers, quality, loaded}, ...]
//                      also the auth check before opening the socket: 401 means a bad token.
//   GET /v1/status  -> {active_streams, max_streams, capacity_load, vram_used_bytes,
//                       vram_total_bytes, gpu_power_w, event_loop_busy, retry_after_s, ready,
//                       ...}; any field may be null when unknown.
//                      capacity_load is a fraction (1.0 = full). Polled every 2 s for the server
//                      panel (not after a 401, until the token changes), and read to explain a
//                      refused connection (503 before the upgrade is invisible to the WebSocket
//                      API); `ready` false means the server is still loading its voice.
//   GET /v1/stream  -> (plain GET, no upgrade) why an upgrade was refused: 401 / 503 + body.
//   GET /healthz    -> {status: "failed", error} when the voice could not be loaded.
//   WS  /v1/stream  -> binary msgpack frames: start/text/end/cancel out; ready/audio/phrase/
//                      words/done/cancelled/error in.
//
// Data path: socket -> (Opus: WebCodecs AudioDecoder | PCM: s16le -> f32) -> AudioWorklet ring
// buffer -> speakers. The worklet reports what it actually rendered; that clock drives the
// captions' current word and the "played" statistic.

import { decode, encode } from "./node_modules/@msgpack/msgpack/dist.esm/index.mjs";

const SAMPLE_RATE = 48000; // requested from the AudioContext, and from the server for Opus
// PCM sample rates the server accepts besides the voice's native rate (docs/protocol.md, §3).
const PCM_RATES = [8000, 12000, 16000, 24000, 48000];
const STARTUP_BUFFER_MS = 80; // cushion the worklet fills before it starts playing
// Each time the listener runs dry while the server owes audio, the cushion a restart waits for
// doubles, up to this: a link slower than the audio then gives fewer, longer pauses rather than
// a stutter every few hundred ms (the same silence in all).
const CUSHION_MAX_MS = 1000;
const STATUS_POLL_MS = 2000;
const STATUS_TIMEOUT_MS = 4000; // a status fetch slower than this shows "status unavailable"
const FETCH_TIMEOUT_MS = 8000; // any other fetch (voices, explaining a refusal)
const OPEN_TIMEOUT_MS = 10000; // the WebSocket upgrade
const AUDIO_BLOCKED_MS = 1000; // an AudioContext not running by then is blocked (autoplay policy)
const OPUS_CONFIG = { codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 };
const MSG_AUTH = "Authentication failed: check the API token";
const MSG_NEED_TOKEN = "This server needs an API token: enter it above";

/** A 401 or 403: the token given is wrong, or none was given. */
function authMessage(token) {
  return token ? MSG_AUTH : MSG_NEED_TOKEN;
}
const MSG_STARTING = "Server is starting (loading the voice)";
const MSG_UNREACHABLE = "Cannot reach the server";
const MSG_AUDIO_BLOCKED =
  "The browser is holding back audio: click anywhere on the page to allow it";
const MSG_SHUTTING_DOWN = "The server is shutting down; try again in a moment";
const MSG_SLOW = "The audio is arriving too slowly (slow network?) — buffering…";
const PARAMS = new URLSearchParams(window.location.search);
// A full server is retried after the wait it suggests (`retry_after_s` / Retry-After; the
// server spreads its hints so refused clients do not all come back at once), for up to
// RETRY_FOR_S seconds from the first refusal. `?retry_s=N` in the page's URL changes that;
// `?retry_s=0` shows the refusal at once. A server that is still starting is waited for as
// long as it takes (Stop ends the wait).
const RETRY_FOR_S = retryWindowS(PARAMS.get("retry_s"), 60);
const RETRY_DEFAULT_S = 2; // when the server gave no hint
const RETRY_MAX_WAIT_S = 30; // never wait longer than this for one hint
// Watchdog: nothing from the server for STALL_NOTICE_S while the listener has nothing left to
// hear says "connection stalled"; after STALL_GIVE_UP_S (`?stall_s=N`) the stream is cancelled
// and the socket closed.
const STALL_NOTICE_S = 4;
const STALL_GIVE_UP_S = Math.max(STALL_NOTICE_S + 1, retryWindowS(PARAMS.get("stall_s"), 30));
const HEALTH_CHECK_MS = 250;
// From this many underruns in a stream on, running dry says "too slow" (and for a while after).
const SLOW_UNDERRUNS = 2;
const SLOW_NOTICE_HOLD_MS = 4000;
// Audio that arrives less than this before the listener reaches it came late: decoding it and
// handing it to the player takes about that long, so running dry then is not the page's doing.
const LATE_MARGIN_MS = 20;
// Text sent word by word with more than this between words asks for a longer
// `max_buffer_delay_ms` (docs/protocol.md, "Text that trickles in").
const SLOW_TYPING_MS = 250;
const DEFAULT_BUFFER_DELAY_MS = 300; // the protocol's max_buffer_delay_ms when none is sent

// The stream's figures in words are rewritten at most this often (their data-* attributes at
// every report); a change of state rewrites them at once.
const STATS_TEXT_MS = 250;

const $ = (id) => document.getElementById(id);

/**
 * Show `text` in `el`, touching the page only when it differs. Assigning textContent replaces the
 * text even when it is the same, and the browser then lays out and repaints the page: the stream's
 * statistics are rendered at every audio message and player report (~70 times a second), and a
 * repaint's cost grows with the captions above them.
 */
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/**
 * A server URL relative to the page ("v1/voices", no leading slash), so that it stays under the
 * prefix the page is served at (/tts/ -> /tts/v1/voices). The page's own query (?retry_s=...)
 * is not carried over.
 */
function pageUrl(path) {
  return new URL(path, window.location.href);
}

/** The WebSocket's URL, with the API token (if any) as ?token= (no headers on a WebSocket). */
function streamUrl(token) {
  const url = pageUrl("v1/stream");
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

/** An AbortSignal that fires after `ms`. */
function timeoutSignal(ms) {
  if (typeof AbortSignal.timeout === "function") return AbortSignal.timeout(ms);
  const ctrl = new AbortController();
  setTimeout(() => ctrl.abort(new DOMException("timed out", "TimeoutError")), ms);
  return ctrl.signal;
}

/**
 * GET a server path relative to the page (see `pageUrl`), the API token (if any) in an
 * Authorization header, not the URL (URLs end up in logs and history). Rejects if no answer
 * comes within `timeoutMs`.
 */
function apiFetch(path, token, timeoutMs = FETCH_TIMEOUT_MS) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  return fetch(pageUrl(path), {
    cache: "no-store",
    headers,
    signal: timeoutSignal(timeoutMs),
  });
}

function retryWindowS(param, fallback) {
  const n = param === null ? NaN : Number(param);
  return Number.isFinite(n) && n >= 0 ? n : fallback;
}

/**
 * The server refused a stream for capacity, or (`starting`) because it is still loading its
 * voice; `retryAfterS` is its hint (NaN if none).
 */
class CapacityError extends Error {
  constructor(retryAfterS, starting = false) {
    super(starting ? MSG_STARTING : capacityMessage(retryAfterS));
    this.retryAfterS = retryAfterS;
    this.starting = starting;
  }
}

/** Does an `overloaded` refusal's message say the server is still loading its voice? */
// Finished with no audio: the text had no words to speak (emoji, punctuation, code left unread).
const NOTHING_TO_SAY = "Nothing to speak: the text has no words the voice reads";

function isStartingMessage(message) {
  return /not ready|loading the voice/i.test(String(message ?? ""));
}

function isShuttingDown(message) {
  return /shutting down/i.test(String(message ?? ""));
}

function capacityMessage(retryAfterS) {
  const n = Number.isFinite(retryAfterS) ? Math.max(1, Math.ceil(retryAfterS)) : null;
  return n === null
    ? "Server is at capacity — try again in a few seconds"
    : `Server is at capacity — try again in ${n} s`;
}

function fmt(value, digits, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "n/a";
  return `${Number(value).toFixed(digits)}${unit}`;
}

/** Split text into LLM-like tokens: each word with its trailing whitespace. */
function nonSpace(text) {
  return String(text ?? "").replace(/\s+/g, "").length;
}

function tokenize(text) {
  const tokens = text.match(/\S+\s*/g) || [];
  const lead = text.match(/^\s*/)[0];
  if (tokens.length && lead) tokens[0] = lead + tokens[0];
  return tokens;
}

function pcmToFloat32(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(i * 2, true) / 32768;
  return out;
}

/** Linear resampler, only used if the AudioContext could not run at the stream's rate. */
class LinearResampler {
  constructor(fromRate, toRate) {
    this.step = fromRate / toRate;
    this.pos = 0; // fractional read position into [last, ...input]
    this.last = 0;
  }

  process(input) {
    const src = new Float32Array(input.length + 1);
    src[0] = this.last;
    src.set(input, 1);
    const out = [];
    while (this.pos + 1 < src.length) {
      const i = Math.floor(this.pos);
      const f = this.pos - i;
      out.push(src[i] * (1 - f) + src[i + 1] * f);
      this.pos += this.step;
    }
    this.pos -= input.length;
    this.last = input[input.length - 1] ?? this.last;
    return Float32Array.from(out);
  }
}

async function opusSupported() {
  if (typeof AudioDecoder === "undefined") return false;
  try {
    return (await AudioDecoder.isConfigSupported(OPUS_CONFIG)).supported === true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Player: AudioContext + the worklet's ring buffer

class Player {
  constructor(onReport) {
    this.onReport = onReport;
    this.ctx = null;
    this.node = null;
    this.last = null; // the latest worklet report of the current stream
    this.untilRunning = null; // promise while waiting for a gesture to allow audio
  }

  /** Create the AudioContext (call from a user gesture) and load the worklet once. */
  async init() {
    if (!this.ctx) {
      if (!window.isSecureContext || !window.AudioWorkletNode) {
        throw new Error("Audio playback needs a secure page (https:// or localhost)");
      }
      this.ctx = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
      await this.ctx.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
      this.node = new AudioWorkletNode(this.ctx, "player-processor", {
        numberOfInputs: 0,
        numberOfOutputs: 1,
        outputChannelCount: [1],
      });
      this.node.port.onmessage = (event) => this.handleReport(event.data);
      this.node.connect(this.ctx.destination);
    }
  }

  /**
   * Start the AudioContext. True once it runs; false if it still does not after `waitMs`: the
   * browser's autoplay policy holds it until the user interacts with the page (`resume()` then
   * neither resolves nor fails).
   */
  async resume(waitMs) {
    if (this.ctx.state === "running") return true;
    const resumed = this.ctx.resume().catch(() => {});
    await Promise.race([resumed, new Promise((r) => setTimeout(r, waitMs))]);
    return this.ctx.state === "running";
  }

  /** Resolves once the AudioContext runs; meanwhile each click or key press tries to start it. */
  running() {
    if (this.ctx.state === "running") return Promise.resolve();
    if (!this.untilRunning) {
      this.untilRunning = new Promise((resolve) => {
        const events = ["pointerdown", "keydown", "touchend"];
        const kick = () => this.ctx.resume().catch(() => {});
        const check = () => {
          if (this.ctx.state !== "running") return;
          for (const e of events) document.removeEventListener(e, kick, true);
          this.ctx.removeEventListener("statechange", check);
          resolve();
        };
        for (const e of events) document.addEventListener(e, kick, true);
        this.ctx.addEventListener("statechange", check);
      }).then(() => {
        this.untilRunning = null;
      });
    }
    return this.untilRunning;
  }

  get sampleRate() {
    return this.ctx ? this.ctx.sampleRate : SAMPLE_RATE;
  }

  handleReport(report) {
    if (report.gen !== this.gen) return;
    this.last = report;
    this.onReport(report);
  }

  reset(gen) {
    this.gen = gen;
    this.last = null;
    const startupSamples = Math.round((this.sampleRate * STARTUP_BUFFER_MS) / 1000);
    this.node.port.postMessage({ type: "reset", gen, startupSamples });
  }

  push(gen, samples) {
    this.node.port.postMessage({ type: "push", gen, samples }, [samples.buffer]);
  }

  draining(gen) {
    this.node.port.postMessage({ type: "draining", gen });
  }

  end(gen) {
    this.node.port.postMessage({ type: "end", gen });
  }

  clear(gen) {
    this.node.port.postMessage({ type: "clear", gen });
  }

  /** After running dry, restart `gen` only once `ms` of audio is buffered. */
  cushion(gen, ms) {
    const samples = Math.round((this.sampleRate * ms) / 1000);
    this.node.port.postMessage({ type: "cushion", gen, samples });
  }

  /**
   * Stream position (ms) the worklet has rendered by now (its last report, extrapolated while it
   * plays); null before the stream started playing.
   */
  renderedMs() {
    const r = this.last;
    if (!r || !this.ctx || r.state === "buffering") return null;
    let samples = r.played;
    if (r.state === "playing") {
      const since = Math.max(0, this.ctx.currentTime - r.time) * this.sampleRate;
      samples += Math.min(since, r.buffered);
    }
    return (samples * 1000) / this.sampleRate;
  }

  /** Stream position (ms) the listener hears now: rendered samples, minus output latency. */
  heardMs() {
    const rendered = this.renderedMs();
    if (rendered === null) return 0;
    const latency = (this.ctx.outputLatency || 0) + (this.ctx.baseLatency || 0);
    return Math.max(0, rendered - latency * 1000);
  }
}

// ---------------------------------------------------------------------------------------------
// Opus decoding with WebCodecs

class OpusStreamDecoder {
  /** onSamples(float32, ptsMs) gets decoded audio in order. */
  constructor(onSamples, onError) {
    this.decoder = new AudioDecoder({
      output: (data) => this.output(data, onSamples),
      error: (err) => onError(err),
    });
    this.decoder.configure(OPUS_CONFIG);
  }

  output(data, onSamples) {
    try {
      const samples = new Float32Array(data.numberOfFrames);
      data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
      onSamples(samples, data.timestamp / 1000);
    } finally {
      data.close();
    }
  }

  /** packets: raw Opus packets, 20 ms each, starting at ptsMs. */
  decode(packets, ptsMs, frameMs) {
    packets.forEach((packet, i) => {
      const timestamp = Math.round((ptsMs + i * frameMs) * 1000); // microseconds
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: packet }));
    });
  }

  async flush() {
    if (this.decoder.state === "configured") await this.decoder.flush();
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Connection: one WebSocket, reused across utterances (each is its own `ctx`)

class Connection {
  constructor(token, onMessage, onClose) {
    this.token = token;
    this.onMessage = onMessage;
    this.onClose = onClose;
    this.ws = null;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Resolves when open; rejects if the server refuses, is unreachable or does not answer. */
  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(streamUrl(this.token));
      ws.binaryType = "arraybuffer";
      let opened = false;
      // A stopped server (or a dead network path) may accept the TCP connection and never
      // answer the upgrade: give up rather than wait for the browser's own minutes-long timeout.
      const timer = setTimeout(() => {
        if (this.ws === ws) this.ws = null;
        ws.close();
        reject(new Error("the server did not answer the connection"));
      }, OPEN_TIMEOUT_MS);
      ws.onopen = () => {
        clearTimeout(timer);
        opened = true;
        resolve();
      };
      ws.onmessage = (event) => this.receive(event.data);
      ws.onclose = (event) => {
        clearTimeout(timer);
        if (this.ws === ws) this.ws = null;
        if (opened) this.onClose(event);
        else reject(new Error(`connection failed (close code ${event.code})`));
      };
      this.ws = ws;
    });
  }

  receive(data) {
    if (!(data instanceof ArrayBuffer)) {
      console.warn("ignoring a text frame; the protocol is binary msgpack only");
      return;
    }
    let msg;
    try {
      msg = decode(new Uint8Array(data));
    } catch (err) {
      console.warn("undecodable frame", err);
      return;
    }
    if (msg && typeof msg === "object" && typeof msg.type === "string") this.onMessage(msg);
  }

  send(msg) {
    if (this.isOpen) this.ws.send(encode(msg));
  }

  close() {
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
  }
}

/**
 * Why did the WebSocket upgrade fail? The browser hides the HTTP status, so ask over HTTP.
 * Returns the error to show: a CapacityError (with the server's retry hint) for a full server
 * or one still loading its voice.
 */
async function explainRefusal(token) {
  try {
    // A server that refuses before the upgrade answers a plain GET the same way (401 / 503).
    const probe = await apiFetch("v1/stream", token);
    if (probe.status === 401 || probe.status === 403) return new Error(authMessage(token));
    if (probe.status === 503) {
      const body = await probe.json().catch(() => ({}));
      const header = probe.headers.get("Retry-After");
      const retry = Number(body?.error?.retry_after_s ?? (header === null ? NaN : Number(header)));
      if (isStartingMessage(body?.error?.message)) return startingOrFailed(retry);
      return new CapacityError(retry);
    }
  } catch {
    // fall through to the status endpoint
  }
  try {
    const status = await (await apiFetch("v1/status", token)).json();
    if (status.ready === false) return startingOrFailed(Number(status.retry_after_s ?? NaN));
    const full =
      (status.max_streams !== null && status.active_streams >= status.max_streams) ||
      (status.capacity_load !== null && status.capacity_load >= 1);
    if (full) return new CapacityError(Number(status.retry_after_s ?? NaN));
  } catch {
    return new Error(MSG_UNREACHABLE);
  }
  return new Error("Could not open the stream connection to the server");
}

/** The server is not ready: still loading its voice (wait), or it failed to (`/healthz`). */
async function startingOrFailed(retryAfterS) {
  try {
    const health = await (await apiFetch("healthz", null)).json();
    if (health?.status === "failed") {
      return new Error(`The server could not load its voice: ${health.error ?? "unknown error"}`);
    }
  } catch {
    // no answer: assume it is still starting
  }
  return new CapacityError(retryAfterS, true);
}

// ---------------------------------------------------------------------------------------------
// Captions: phrases as they are scheduled, words highlighted by playback position

/**
 * Where a timed word lies in its phrase's text, from `cursor`: [start, end) or null. Words name
 * what was read, which is not always what was written: with Markdown on, "**bold**," is read as
 * "bold,". Then the word's letters and digits are looked for, and the markup stays outside it.
 */
function locateWord(text, word, cursor) {
  const at = text.indexOf(word, cursor);
  if (at >= 0) return [at, at + word.length];
  const core = word.replace(/^[^\p{L}\p{N}]+|[^\p{L}\p{N}]+$/gu, "");
  if (core && core !== word) {
    const inner = text.indexOf(core, cursor);
    if (inner >= 0) return [inner, inner + core.length];
  }
  return null;
}

class Captions {
  constructor(root) {
    this.root = root;
    this.reset();
  }

  reset() {
    const placeholder = document.createElement("p");
    placeholder.className = "placeholder";
    placeholder.textContent = "Captions appear here as the speech plays.";
    this.root.replaceChildren(placeholder);
    this.phrases = new Map(); // phrase id -> {el, start, end}
    this.words = []; // word spans sorted by start time
    this.current = -1; // index of the word being heard (null: mark every word again)
    this.finished = false; // played out: nothing is highlighted any more
    this.heard = 0; // furthest position shown, so jitter in the estimate never steps back
    this.root.dataset.currentIndex = "-1";
    this.root.dataset.currentWord = "";
  }

  phraseElement(id, text, start, end) {
    let p = this.phrases.get(id);
    if (!p) {
      this.root.querySelector(".placeholder")?.remove();
      const el = document.createElement("span");
      el.className = "phrase";
      el.dataset.phraseId = String(id);
      el.textContent = text;
      p = { el, start, end, text };
      this.phrases.set(id, p);
      // Keep phrases in timeline order even if messages interleave.
      const later = [...this.phrases.values()].find((q) => q !== p && q.start > start);
      this.root.insertBefore(el, later ? later.el : null);
    }
    return p;
  }

  addPhrase(msg) {
    // space_before: the whitespace the text had before this phrase (line breaks included; ""
    // where a flush cut a word), so the captions read as the text was written.
    const space = typeof msg.space_before === "string" ? msg.space_before : " ";
    const text = space + String(msg.text ?? "");
    const p = this.phraseElement(msg.id, text, msg.start_ms, msg.end_ms);
    p.start = msg.start_ms;
    p.end = msg.end_ms;
  }

  /** Wrap each timed word in a span, keeping the phrase's own punctuation and spacing. */
  addWords(msg) {
    const items = msg.items || [];
    const start = items.length ? items[0][1] : 0;
    const end = items.length ? items[items.length - 1][2] : 0;
    const fallback = " " + items.map((it) => it[0]).join(" ");
    const p = this.phraseElement(msg.phrase_id, fallback, start, end);
    const text = p.text;
    const frag = document.createDocumentFragment();
    let cursor = 0;
    const before = this.words.length;
    for (const [word, wStart, wEnd] of items) {
      const found = locateWord(text, word, cursor);
      const span = document.createElement("span");
      span.className = "word";
      span.dataset.word = word;
      span.dataset.start = String(wStart);
      span.dataset.end = String(wEnd);
      if (found) {
        const [at, after] = found;
        if (at > cursor) frag.append(text.slice(cursor, at));
        span.textContent = text.slice(at, after); // as written, markup around it kept outside
        cursor = after;
      } // else: not in the text as written; timed but not shown, never shown twice
      frag.append(span);
      this.words.push(span);
    }
    frag.append(text.slice(cursor));
    p.el.replaceChildren(frag);
    p.el.classList.add("timed");
    const byStart = (a, b) => Number(a.dataset.start) - Number(b.dataset.start);
    const added = this.words.slice(before).sort(byStart);
    const last = before > 0 ? Number(this.words[before - 1].dataset.start) : -Infinity;
    if (!added.length || Number(added[0].dataset.start) >= last) {
      // The usual case: a phrase after those before it. Only its words get indexes, and the
      // highlight goes on from where it is.
      this.words.splice(before, added.length, ...added);
      added.forEach((w, i) => (w.dataset.index = String(before + i)));
      return;
    }
    this.words.sort(byStart);
    this.words.forEach((w, i) => (w.dataset.index = String(i)));
    this.current = null; // indexes moved: every word is marked again on the next update
  }

  /**
   * Scroll the captions box (only it: scrollIntoView would scroll the page too, pulling a
   * reader on a small screen away from the text and controls) so that `el` is in view.
   */
  reveal(el) {
    const box = this.root.getBoundingClientRect();
    const word = el.getBoundingClientRect();
    if (word.top < box.top) this.root.scrollTop -= box.top - word.top;
    else if (word.bottom > box.bottom) this.root.scrollTop += word.bottom - box.bottom;
  }

  /** The end: no word is being heard any more. */
  finish() {
    this.words.forEach((w) => {
      w.classList.remove("current");
      w.classList.add("spoken");
    });
    this.current = this.words.length;
    this.finished = true;
    this.root.dataset.currentIndex = String(this.current);
    this.root.dataset.currentWord = "";
  }

  /** Highlight what is heard at stream time `ms`. */
  update(ms) {
    if (this.finished) return;
    ms = Math.max(ms, this.heard);
    this.heard = ms;
    const idx = this.lastStartedBefore(ms);
    if (idx !== this.current) {
      // Only the words between the old and the new position change (the position only moves
      // on), so a long reply costs no more per update than a short one.
      const from = this.current === null ? 0 : Math.max(0, Math.min(this.current, idx));
      const to = this.current === null ? this.words.length - 1 : Math.max(this.current, idx);
      for (let i = from; i <= to && i < this.words.length; i++) {
        this.words[i].classList.toggle("current", i === idx);
        this.words[i].classList.toggle("spoken", i < idx);
      }
      this.current = idx;
      this.root.dataset.currentIndex = String(idx);
      this.root.dataset.currentWord = idx >= 0 ? this.words[idx].dataset.word : "";
      if (idx >= 0) this.reveal(this.words[idx]);
    }
    for (const p of this.phrases.values()) {
      const state = ms >= p.end ? "spoken" : ms >= p.start ? "current" : "";
      if (state === p.state) continue; // touch the page only where a phrase changes
      p.state = state;
      p.el.classList.toggle("current", state === "current");
      p.el.classList.toggle("spoken", state === "spoken");
    }
  }

  lastStartedBefore(ms) {
    let lo = 0;
    let hi = this.words.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (Number(this.words[mid].dataset.start) <= ms) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return found;
  }
}

// ---------------------------------------------------------------------------------------------
// Utterance: one `ctx` on the socket, from `start` to `done`/`cancelled`/`error`

class Utterance {
  constructor(gen, settings) {
    this.gen = gen;
    this.ctx = `u${gen}`;
    this.settings = settings; // {text, voice, speaker, speed, wps, format, readCode, markdown, normalize}
    // starting -> streaming -> draining -> done | cancelled | error;
    // starting -> waiting (server full) -> starting ... until RETRY_FOR_S has passed
    this.phase = "starting";
    this.retries = 0;
    this.firstRefusedAt = null; // performance.now() of the first capacity refusal
    this.retryAt = 0;
    this.retryTimer = null;
    // Time to first audio as the user lives it: from Speak, so a wait for room on a full
    // server (each retry sends a new start) is counted, not hidden.
    this.requestedAt = performance.now();
    this.ttfaMs = null;
    this.audioBytes = 0;
    this.audioMs = 0;
    // Audio messages that came when the listener had (almost) nothing left to hear: they tell
    // whether running dry was the server's or network's doing (late) or the page's (not late).
    this.lateArrivals = 0;
    this.pushedSamples = 0; // where the next decoded sample sits on the stream timeline
    this.decoder = null;
    this.resampler = null;
    this.feedTimer = null;
    this.usage = null;
    this.ready = false; // the server accepted the stream
    this.startSent = false; // `start` went out for the current ctx (the server may hold it)
    this.format = settings.format;
    this.requestedRate = SAMPLE_RATE; // start.sample_rate
    this.streamRate = SAMPLE_RATE;
    this.frameMs = 20;
    this.audioBlocked = false; // waiting for a click: the browser holds audio back (autoplay)
    this.lastHeardAt = performance.now(); // last message from the server (watchdog)
    // What the server owes (watchdog): text sent and not yet in a `phrase` is spoken once no
    // more has come for the stream's max_buffer_delay_ms; all of it in phrases, and no `end`
    // yet, the server owes nothing and its silence is a pause in the text, not a stall.
    this.sentChars = 0; // non-space characters sent in `text`
    this.phrasedChars = 0; // ... and those back in `phrase` messages
    this.textSentAt = 0; // performance.now() of the last `text`
    this.endSentAt = null; // ... and of `end`
    this.delayMs = DEFAULT_BUFFER_DELAY_MS; // start.max_buffer_delay_ms
    this.underrunsSeen = 0; // the player's underrun count at the last check
    this.underrunsExcused = 0; // ... of which the listener ran dry while nothing was owed
    this.cushionAfter = 0; // owed underruns the player's restart cushion has grown for
    this.stalled = false; // the "connection stalled" notice is shown
    this.slowUntil = 0; // show "too slow" until then (performance.now())
    this.lostReason = null; // the socket closed mid-stream: shown once what arrived has played
  }

  get active() {
    return (
      this.phase === "starting" ||
      this.phase === "waiting" ||
      this.phase === "streaming" ||
      this.phase === "draining"
    );
  }

  stopFeeding() {
    if (this.feedTimer !== null) clearTimeout(this.feedTimer);
    this.feedTimer = null;
  }

  stopWaiting() {
    if (this.retryTimer !== null) clearInterval(this.retryTimer);
    this.retryTimer = null;
  }

  release() {
    this.stopFeeding();
    this.stopWaiting();
    if (this.decoder) this.decoder.close();
    this.decoder = null;
  }
}

// ---------------------------------------------------------------------------------------------
// The page

class App {
  constructor() {
    this.el = {
      text: $("text"),
      voice: $("voice"),
      speaker: $("speaker"),
      speakerControl: $("speaker-control"),
      speed: $("speed"),
      speedValue: $("speed-value"),
      wps: $("wps"),
      token: $("token"),
      format: $("format"),
      readCode: $("read-code"),
      markdown: $("markdown"),
      normalize: $("normalize"),
      speak: $("speak"),
      stop: $("stop"),
      notice: $("notice"),
      message: $("message"),
      captions: $("captions"),
      stats: $("stats"),
    };
    this.player = new Player((report) => this.onWorkletReport(report));
    this.captions = new Captions(this.el.captions);
    this.conn = null;
    this.utt = null;
    this.gen = 0;
    // The stream a Speak cut short (barge-in): its `cancelled` comes after the new one began,
    // with what it used, shown apart from the new reply's usage.
    this.cutCtx = null;
    this.following = false; // the captions' frame loop is running
    this.statsTextDue = 0; // performance.now() before which the figures in words stay as shown
    this.voices = [];
    this.voicesLoaded = false; // the last /v1/voices answered with a list
    this.voicesError = ""; // the alert loadVoices() showed, cleared when a later load works
    this.opusOk = null;
    this.serverReady = undefined; // from /v1/status: true, false (starting), null (no answer)
    this.statusRefusedFor = undefined; // the token /v1/status answered 401 to: poll no more
    this.stateLabel = ""; // the stats' state label, restored after a watchdog notice
    this.healthNotice = ""; // the notice the watchdog shows, if any
  }

  start() {
    // Speak is the form's submit button, so Enter in a field speaks too.
    $("compose").addEventListener("submit", (e) => {
      e.preventDefault();
      this.speak();
    });
    this.el.stop.addEventListener("click", () => this.stop());
    this.el.text.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        $("compose").requestSubmit(); // as Speak does: the fields are checked first
      }
    });
    // Escape stops speech from anywhere on the page (an open <select> list takes it first).
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || e.defaultPrevented || !this.utt || !this.utt.active) return;
      e.preventDefault();
      this.stop();
    });
    this.el.speed.addEventListener("input", () => this.showSpeed());
    this.el.voice.addEventListener("change", () => this.showSpeakers());
    this.el.token.addEventListener("change", () => {
      this.statusRefusedFor = undefined; // a new token: ask for the status again
      this.loadVoices();
      this.refreshStatus();
    });
    this.showSpeed();
    this.renderStats("idle");
    this.loadVoices();
    this.pollStatus();
    setInterval(() => this.checkHealth(), HEALTH_CHECK_MS);
  }

  /**
   * Move the captions' highlight at every frame while an utterance is under way. The loop ends
   * with it: a page left open between replies asks the browser for no frames at all.
   */
  followCaptions() {
    if (this.following) return;
    this.following = true;
    const tick = () => {
      const utt = this.utt;
      if (!utt || utt.phase === "done" || utt.phase === "cancelled" || utt.phase === "error") {
        this.following = false;
        return;
      }
      this.updateCaptions();
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  get token() {
    return this.el.token.value.trim();
  }

  // --- messages -------------------------------------------------------------------------------

  showError(text) {
    this.el.message.textContent = text;
    this.el.message.hidden = !text;
  }

  showNotice(text) {
    this.el.notice.textContent = text;
    this.healthNotice = "";
  }

  /** Stop can no longer be used: disable it, and if it had the focus, give it to Speak. */
  disableStop() {
    if (document.activeElement === this.el.stop) this.el.speak.focus();
    this.el.stop.disabled = true;
  }

  // --- voices and the server panel --------------------------------------------------------------

  async loadVoices() {
    let resp;
    let voices;
    try {
      resp = await apiFetch("v1/voices", this.token);
      if (resp.ok) voices = await resp.json();
    } catch {
      return this.voicesFailed(MSG_UNREACHABLE, "server unreachable");
    }
    if (resp.status === 401 || resp.status === 403) {
      return this.voicesFailed(authMessage(this.token), "API token needed");
    }
    if (!resp.ok) {
      return this.voicesFailed(`Could not load voices (HTTP ${resp.status})`, "unavailable");
    }
    this.voices = Array.isArray(voices) ? voices : [];
    this.voicesLoaded = true;
    this.fillVoices();
    const shown = this.el.message.textContent;
    if ((this.voicesError && shown === this.voicesError) || /token|authentication/i.test(shown)) {
      this.showError("");
    }
    this.voicesError = "";
    return true;
  }

  /** The voices could not be listed: say why, and in the list itself while it is empty. */
  voicesFailed(text, short) {
    this.voicesLoaded = false;
    this.voicesError = text;
    this.showError(text);
    if (!this.voices?.length) {
      const opt = document.createElement("option");
      opt.value = "";
      opt.textContent = `No voices: ${short}`;
      this.el.voice.replaceChildren(opt);
    }
    return false;
  }

  fillVoices() {
    const previous = this.el.voice.value;
    const options = this.voices.map((v) => {
      const opt = document.createElement("option");
      opt.value = v.id;
      // Piper ids already name language and quality (en_US-joe-medium): repeat only what is not.
      const parts = [v.language, v.quality].filter((p) => p && !String(v.id).includes(p));
      const n = this.speakerList(v).length;
      if (n > 1) parts.push(`${n} speakers`);
      opt.textContent = `${v.id}${parts.length ? ` (${parts.join(", ")})` : ""}${
        v.loaded === false ? " — not loaded" : ""
      }`;
      return opt;
    });
    if (!options.length) {
      const opt = document.createElement("option");
      opt.value = "";
      opt.textContent = "Server default";
      options.push(opt);
    }
    this.el.voice.replaceChildren(...options);
    const keep = this.voices.find((v) => v.id === previous);
    const firstLoaded = this.voices.find((v) => v.loaded !== false);
    this.el.voice.value = (keep || firstLoaded || this.voices[0] || { id: "" }).id;
    this.showSpeakers();
  }

  /** speakers may be a count, a list of names or a {name: id} map. Returns [[label, value]]. */
  speakerList(voice) {
    const s = voice?.speakers;
    if (Array.isArray(s)) return s.map((name, i) => [String(name), i]);
    if (s && typeof s === "object") return Object.entries(s).map(([name, id]) => [name, id]);
    const n = Number(s) || 0;
    return Array.from({ length: n }, (_, i) => [`Speaker ${i}`, i]);
  }

  showSpeakers() {
    const voice = this.voices.find((v) => v.id === this.el.voice.value);
    const list = this.speakerList(voice);
    this.el.speakerControl.hidden = list.length <= 1;
    this.el.speaker.replaceChildren(
      ...list.map(([label, value]) => new Option(label, String(value))),
    );
  }

  showSpeed() {
    this.el.speedValue.textContent = `${Number(this.el.speed.value).toFixed(2)}×`;
  }

  async pollStatus() {
    if (!document.hidden) await this.refreshStatus();
    setTimeout(() => this.pollStatus(), STATUS_POLL_MS);
  }

  async refreshStatus() {
    const token = this.token;
    // Refused for this token: asking again every 2 s would only fill the console with 401s.
    if (this.statusRefusedFor === token) return;
    let status = null;
    try {
      const resp = await apiFetch("v1/status", token, STATUS_TIMEOUT_MS);
      if (resp.status === 401 || resp.status === 403) {
        this.statusRefusedFor = token;
        this.renderServer(null, token ? "status: wrong API token" : "status: API token needed");
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      status = await resp.json();
    } catch {
      status = null; // no answer in time, or none at all
    }
    if (token !== this.token) return; // the token changed meanwhile: that answer is stale
    this.renderServer(status);
    this.noteReadiness(status);
  }

  /** Reload the voices when the server becomes ready (after warm-up, a restart or an outage). */
  noteReadiness(status) {
    const ready = status ? status.ready !== false : null;
    const was = this.serverReady;
    this.serverReady = ready;
    if (ready !== null && this.el.message.textContent === MSG_UNREACHABLE) {
      this.showError(""); // it answers again
    }
    if (ready !== true || was === true) return;
    // was: false (starting), null (unreachable) or undefined (first poll: reload only if the
    // page's first load of the voices failed).
    if (was !== undefined || !this.voicesLoaded) this.loadVoices();
  }

  renderServer(s, why = "status unavailable") {
    const streams = $("server-streams");
    const capacity = $("server-capacity");
    const vram = $("server-vram");
    const power = $("server-power");
    if (!s) {
      streams.textContent = why;
      capacity.textContent = "";
      vram.hidden = power.hidden = true;
      return;
    }
    const max = s.max_streams ?? "?";
    streams.textContent = `${s.active_streams ?? "?"}/${max} streams`;
    if (s.status === "failed") capacity.textContent = "failed: could not load the voice";
    else if (s.ready === false) capacity.textContent = "starting: loading the voice";
    else if (s.status === "shutting_down") capacity.textContent = "shutting down: no new streams";
    else if (s.status === "unresponsive") capacity.textContent = "not answering: no new streams";
    else if (s.capacity_load == null) capacity.textContent = "capacity n/a";
    else capacity.textContent = `capacity ${Math.round(s.capacity_load * 100)}%`;
    vram.hidden = s.vram_used_bytes == null;
    if (!vram.hidden) {
      const gib = (b) => (b / 2 ** 30).toFixed(1);
      const total = s.vram_total_bytes == null ? "" : ` / ${gib(s.vram_total_bytes)}`;
      vram.textContent = `VRAM ${gib(s.vram_used_bytes)}${total} GiB`;
    }
    power.hidden = s.gpu_power_w == null;
    if (!power.hidden) power.textContent = `GPU ${Math.round(s.gpu_power_w)} W`;
  }

  // --- speaking --------------------------------------------------------------------------------

  readSettings() {
    const wps = Math.max(0, Number(this.el.wps.value) || 0);
    const speed = Math.min(2, Math.max(0.5, Number(this.el.speed.value) || 1));
    const speakerVisible = !this.el.speakerControl.hidden;
    return {
      text: this.el.text.value,
      voice: this.el.voice.value || null,
      speaker: speakerVisible ? this.speakerValue() : null,
      speed,
      wps,
      format: this.el.format.value,
      readCode: this.el.readCode.checked,
      markdown: this.el.markdown.checked,
      normalize: this.el.normalize.checked,
    };
  }

  speakerValue() {
    const v = this.el.speaker.value;
    return /^\d+$/.test(v) ? Number(v) : v;
  }

  async speak() {
    const settings = this.readSettings();
    if (!settings.text.trim()) {
      this.showError("Type some text to speak");
      return;
    }
    this.renderCutUsage(null);
    if (this.utt && this.utt.active) this.stop({ quiet: true });
    this.showError("");
    this.showNotice("");
    const utt = new Utterance(++this.gen, settings);
    this.utt = utt;
    this.captions.reset();
    this.followCaptions();
    this.clearUsage();
    this.renderStats("streaming", "connecting…");
    this.el.stop.disabled = false;
    try {
      await this.player.init(); // inside the click: browsers only start audio from a gesture
      this.player.reset(utt.gen);
      if (!(await this.player.resume(AUDIO_BLOCKED_MS))) {
        // The autoplay policy holds audio until the user interacts with the page. Ask for a
        // click before taking a stream on the server: nothing could be heard meanwhile.
        if (this.utt !== utt || !utt.active) return;
        utt.audioBlocked = true;
        this.renderStats("waiting", "waiting for permission to play audio");
        this.showNotice(MSG_AUDIO_BLOCKED);
        await this.player.running();
        if (this.utt !== utt || !utt.active) return; // stopped, or another Speak took over
        utt.audioBlocked = false;
        this.showNotice("");
        this.renderStats("streaming", "connecting…");
      }
      if (this.utt !== utt || !utt.active) return;
      utt.format = await this.chooseFormat(settings.format);
    } catch (err) {
      if (this.utt === utt && utt.active) this.fail(utt, err.message || String(err));
      return;
    }
    if (this.utt !== utt || !utt.active) return;
    await this.connectAndStart(utt);
  }

  async connectAndStart(utt) {
    utt.lastHeardAt = performance.now(); // the watchdog counts from here
    try {
      await this.ensureConnection();
    } catch (err) {
      if (this.utt !== utt || !utt.active) return; // stopped while connecting
      if (err instanceof CapacityError) this.refused(utt, err.retryAfterS, err.starting);
      else this.fail(utt, err.message || String(err));
      return;
    }
    if (this.utt !== utt || !utt.active) return; // stopped while connecting
    this.sendStart(utt);
  }

  /**
   * The server is full (or, `starting`, still loading its voice): wait as long as it suggests
   * and try again. A full server is waited for up to RETRY_FOR_S, one that is starting until
   * it is ready.
   */
  refused(utt, retryAfterS, starting = false) {
    const now = performance.now();
    utt.startSent = false; // the refused ctx never became live
    if (!starting && utt.firstRefusedAt === null) utt.firstRefusedAt = now;
    const hinted = Number.isFinite(retryAfterS) && retryAfterS > 0 ? retryAfterS : RETRY_DEFAULT_S;
    const waitMs = Math.min(hinted, RETRY_MAX_WAIT_S) * 1000;
    if (!starting && now + waitMs - utt.firstRefusedAt > RETRY_FOR_S * 1000) {
      this.fail(utt, capacityMessage(retryAfterS));
      return;
    }
    utt.phase = "waiting";
    utt.retryAt = now + waitMs;
    const what = starting ? MSG_STARTING : "Server is at capacity";
    this.renderStats("waiting", starting ? "waiting for the server to start" : "waiting for room");
    const tick = () => {
      if (this.utt !== utt || utt.phase !== "waiting") return;
      const left = utt.retryAt - performance.now();
      if (left > 0) {
        this.showNotice(`${what} — retrying in ${Math.ceil(left / 1000)} s`);
        return;
      }
      utt.stopWaiting();
      utt.retries += 1;
      if (starting) this.retryWhenReady(utt, retryAfterS);
      else this.retry(utt);
    };
    utt.retryTimer = setInterval(tick, 200);
    tick();
  }

  retry(utt) {
    utt.ctx = `u${utt.gen}.${utt.retries}`; // late messages about the refused try are ignored
    utt.phase = "starting";
    this.showNotice(""); // the countdown is over
    this.renderStats("streaming", "connecting…");
    this.connectAndStart(utt);
  }

  /**
   * A starting server: ask /v1/status (which answers during warm-up) whether it is ready before
   * trying the socket again, rather than be refused each time; now and then ask /healthz
   * whether loading failed, which no wait would mend.
   */
  async retryWhenReady(utt, retryAfterS) {
    let status = null;
    try {
      status = await (await apiFetch("v1/status", this.token, STATUS_TIMEOUT_MS)).json();
    } catch {
      status = null; // not answering: try the socket, which explains itself
    }
    if (this.utt !== utt || utt.phase !== "waiting") return; // stopped meanwhile
    if (status?.ready !== false) {
      this.retry(utt);
      return;
    }
    if (utt.retries % 5 === 0) {
      const why = await startingOrFailed(retryAfterS);
      if (this.utt !== utt || utt.phase !== "waiting") return;
      if (!(why instanceof CapacityError)) {
        this.fail(utt, why.message);
        return;
      }
    }
    this.refused(utt, retryAfterS, true);
  }

  async chooseFormat(choice) {
    if (this.opusOk === null) this.opusOk = await opusSupported();
    if (choice === "opus" && !this.opusOk) throw new Error("This browser cannot decode Opus");
    if (choice === "auto") return this.opusOk ? "opus" : "pcm_s16le";
    return choice;
  }

  /**
   * start.sample_rate. Opus: 48 kHz, what WebCodecs decodes to, whatever the rate (the bitrate
   * sets the bytes). PCM costs 2 bytes a sample: ask for no more than the voice has (its native
   * rate, 22.05 kHz for most Piper voices) and the AudioContext plays; the page resamples.
   */
  requestRate(utt) {
    if (utt.format !== "pcm_s16le") return SAMPLE_RATE;
    const id = utt.settings.voice;
    const voice =
      this.voices.find((v) => v.id === id) ||
      (id ? null : this.voices.find((v) => v.loaded !== false));
    const native = Number(voice?.sample_rate) || 0;
    const outRate = this.player.sampleRate;
    if (native > 0 && native <= outRate) return native; // the server accepts the native rate
    return PCM_RATES.find((r) => r >= outRate) || SAMPLE_RATE;
  }

  async ensureConnection() {
    if (this.conn && this.conn.isOpen && this.conn.token === this.token) return;
    if (this.conn) this.conn.close();
    this.conn = null;
    // A 401 before the upgrade looks like any other failed connection, so check the token first.
    const resp = await apiFetch("v1/voices", this.token).catch(() => null);
    if (!resp) throw new Error(MSG_UNREACHABLE);
    if (resp.status === 401 || resp.status === 403) throw new Error(authMessage(this.token));
    const conn = new Connection(
      this.token,
      (msg) => this.onMessage(msg),
      (ev) => this.onSocketClosed(conn, ev),
    );
    try {
      await conn.open();
    } catch {
      throw await explainRefusal(this.token);
    }
    this.conn = conn;
  }

  sendStart(utt) {
    const s = utt.settings;
    utt.requestedRate = this.requestRate(utt);
    const start = {
      type: "start",
      ctx: utt.ctx,
      format: utt.format,
      sample_rate: utt.requestedRate,
      speed: s.speed,
      words: true,
    };
    // The server's defaults are true: only a choice against them is sent.
    if (!s.readCode) start.read_code = false;
    if (!s.markdown) start.markdown = false;
    if (!s.normalize) start.normalize = false;
    if (s.voice) start.voice = s.voice;
    if (s.speaker !== null && s.speaker !== "") start.speaker = s.speaker;
    // Words typed slower than the default max_buffer_delay_ms (300 ms) would each be spoken as
    // a phrase of their own: at caption pace, ask for the time three words take.
    if (s.wps > 0 && 1000 / s.wps > SLOW_TYPING_MS) {
      start.max_buffer_delay_ms = Math.min(10000, Math.round(3000 / s.wps));
    }
    utt.delayMs = start.max_buffer_delay_ms ?? DEFAULT_BUFFER_DELAY_MS;
    this.conn.send(start);
    utt.startSent = true;
    utt.lastHeardAt = performance.now();
    this.renderStats("streaming", "waiting for the server…");
  }

  /** Send the text: all at once, or word by word at `wps` like an LLM streaming tokens. */
  feed(utt) {
    const { text, wps } = utt.settings;
    if (wps <= 0) {
      this.sendText(utt, text);
      this.sendEnd(utt);
      return;
    }
    const tokens = tokenize(text);
    const interval = 1000 / wps;
    const t0 = performance.now();
    let i = 0;
    const next = () => {
      utt.feedTimer = null;
      if (this.utt !== utt || utt.phase !== "streaming" || !this.conn) return;
      this.sendText(utt, tokens[i]);
      i += 1;
      if (i >= tokens.length) {
        this.sendEnd(utt);
        return;
      }
      // Schedule against the start time so timer jitter does not accumulate.
      utt.feedTimer = setTimeout(next, Math.max(0, t0 + i * interval - performance.now()));
    };
    next();
  }

  sendText(utt, text) {
    this.conn.send({ type: "text", ctx: utt.ctx, text });
    utt.sentChars += nonSpace(text);
    utt.textSentAt = performance.now();
  }

  sendEnd(utt) {
    this.conn.send({ type: "end", ctx: utt.ctx });
    utt.endSentAt = performance.now();
  }

  stop({ quiet = false } = {}) {
    const utt = this.utt;
    if (!utt || !utt.active) return;
    this.player.clear(utt.gen); // silence first: the worklet drops its buffer at once
    const live = utt.startSent && utt.phase !== "waiting"; // a refused stream has nothing to cancel
    utt.phase = "cancelled";
    utt.release();
    if (this.conn && live) this.conn.send({ type: "cancel", ctx: utt.ctx });
    if (live) this.cutCtx = utt.ctx;
    this.disableStop();
    this.renderStats("idle");
    if (!quiet) this.showNotice("Cancelled");
  }

  /**
   * Give up on `utt` and say why. A stream the server may still hold is cancelled: left alone,
   * it would keep its admission slot (and wait for text) until the socket closes.
   */
  fail(utt, text) {
    const live = utt.startSent && (utt.phase === "starting" || utt.phase === "streaming");
    if (utt.active) this.player.clear(utt.gen);
    utt.phase = "error";
    utt.release();
    if (live && this.conn) this.conn.send({ type: "cancel", ctx: utt.ctx });
    this.disableStop();
    this.showError(text);
    this.renderStats("error");
    this.refreshStatus(); // a refusal is often about load: show the current numbers now
  }

  /**
   * Why the socket closed, in words (close codes: docs/protocol.md, §6). `slow`: the player
   * kept running dry before, so a connection lost without a reason was most likely too slow.
   */
  closeMessage(event, slow) {
    const tooSlow =
      "The connection is too slow for this audio stream: the server closed it. Try again" +
      (this.utt?.format === "pcm_s16le" ? ", or choose Opus, which needs far less data" : "");
    if (event.code === 1013) return capacityMessage(null);
    if (event.code === 1008 && /slow/i.test(event.reason || "")) return tooSlow;
    if (event.code === 1001) return MSG_SHUTTING_DOWN;
    if (slow) return "Connection to the server was lost; the network seemed too slow for the audio";
    return "Connection to the server was lost";
  }

  onSocketClosed(conn, event) {
    if (this.conn === conn) this.conn = null;
    const utt = this.utt;
    if (!utt || !(utt.phase === "starting" || utt.phase === "streaming")) return;
    const slow = this.underruns(utt, this.player.last) >= SLOW_UNDERRUNS;
    const why = this.closeMessage(event, slow);
    if (utt.phase === "streaming" && this.hasAudioLeft(utt)) {
      this.playOutThenSay(utt, why, "connection lost");
      return;
    }
    this.fail(utt, why);
  }

  /** The stream ends early (`why`): let what has arrived play out, then say why. */
  playOutThenSay(utt, why, what) {
    utt.lostReason = why;
    utt.stopFeeding();
    this.showNotice(`${what[0].toUpperCase()}${what.slice(1)} — playing the audio already received`);
    this.finishStream(utt, `${what}: playing what arrived`);
  }

  /** Is audio of `utt` still queued in the player or the decoder? */
  hasAudioLeft(utt) {
    const played = this.player.last ? this.player.last.played : 0;
    const decoding = utt.decoder ? utt.decoder.decoder.decodeQueueSize : 0;
    return utt.pushedSamples > played || decoding > 0;
  }

  /** No more audio will come for `utt`: decode what is left, play it out, then "ended". */
  async finishStream(utt, label) {
    utt.phase = "draining";
    this.player.draining(utt.gen);
    this.renderStats("streaming", label);
    try {
      if (utt.decoder) await utt.decoder.flush();
    } catch (err) {
      console.warn("decoder flush failed", err);
    }
    if (this.utt === utt && utt.phase === "draining") this.player.end(utt.gen);
  }

  // --- watchdog ---------------------------------------------------------------------------------

  /**
   * Every HEALTH_CHECK_MS while a stream is open: nothing from the server for STALL_NOTICE_S
   * while the listener has nothing left to hear is a stalled server or network (the socket
   * would say nothing for minutes); after STALL_GIVE_UP_S the stream is given up. Underruns
   * that repeat say the audio comes in too slowly.
   */
  checkHealth() {
    const utt = this.utt;
    if (!utt || utt.audioBlocked || !(utt.phase === "starting" || utt.phase === "streaming")) {
      return;
    }
    const now = performance.now();
    const r = this.player.last;
    const dry = !r || r.buffered === 0;
    const owedSince = this.owedSince(utt);
    if (r) {
      // Running dry while the server owed nothing (a pause in the text) is no underrun.
      const more = r.underruns - utt.underrunsSeen;
      if (more > 0 && (owedSince === null || owedSince > now)) utt.underrunsExcused += more;
      utt.underrunsSeen = r.underruns;
    }
    const silentS = owedSince === null ? 0 : Math.max(0, now - owedSince) / 1000;
    if (dry && silentS >= STALL_NOTICE_S) {
      if (silentS >= STALL_GIVE_UP_S) {
        this.giveUp(utt, silentS);
        return;
      }
      utt.stalled = true;
      this.showHealth(
        `Connection stalled: nothing from the server for ${Math.floor(silentS)} s`,
        "connection stalled",
      );
      return;
    }
    if (utt.stalled) {
      utt.stalled = false;
      this.showHealth("", null);
    }
    const owedUnderruns = this.underruns(utt, r);
    if (owedUnderruns > utt.cushionAfter) {
      utt.cushionAfter = owedUnderruns;
      this.player.cushion(utt.gen, Math.min(CUSHION_MAX_MS, STARTUP_BUFFER_MS * 2 ** owedUnderruns));
    }
    if (utt.phase !== "streaming" || owedUnderruns < SLOW_UNDERRUNS) return;
    if (dry) utt.slowUntil = now + SLOW_NOTICE_HOLD_MS;
    if (now < utt.slowUntil) {
      this.showHealth(MSG_SLOW, "buffering");
    } else if (this.healthNotice) {
      this.showHealth("", null);
    }
  }

  /**
   * Since when the server owes `utt` a message (performance.now()), or null when it owes
   * nothing: `ready` after `start`; `done` after `end`; a `phrase` once text has waited the
   * stream's max_buffer_delay_ms (it may come sooner); with all text sent back in phrases and
   * no `end`, nothing (the text paused: an LLM calling a tool, a user thinking).
   */
  owedSince(utt) {
    if (utt.phase === "starting" || utt.endSentAt !== null) {
      return Math.max(utt.lastHeardAt, utt.endSentAt ?? 0);
    }
    if (utt.phrasedChars >= utt.sentChars) return null;
    return Math.max(utt.lastHeardAt, utt.textSentAt + utt.delayMs);
  }

  /** Times the listener ran dry while the server owed it audio. */
  underruns(utt, r) {
    return r ? Math.max(0, r.underruns - (utt ? utt.underrunsExcused : 0)) : 0;
  }

  /** Show (or, with "", clear) the watchdog's notice; `label` overrides the state label. */
  showHealth(text, label) {
    if (text) {
      setText(this.el.notice, text);
      this.healthNotice = text;
    } else if (this.healthNotice && this.el.notice.textContent === this.healthNotice) {
      this.el.notice.textContent = "";
      this.healthNotice = "";
    }
    setText($("stat-state"), label || this.stateLabel);
  }

  /** Stalled too long: cancel the stream and close the socket (the next Speak opens a new one). */
  giveUp(utt, silentS) {
    const conn = this.conn;
    this.fail(
      utt,
      `The server stopped answering (nothing for ${Math.round(silentS)} s): the stream was ` +
        "cancelled. Check the connection and try again",
    );
    if (conn) {
      this.conn = null;
      conn.close();
    }
  }

  // --- server messages -------------------------------------------------------------------------

  onMessage(msg) {
    const utt = this.utt;
    const ctx = msg.ctx ?? "default";
    if (utt && ctx === utt.ctx) utt.lastHeardAt = performance.now();
    if (msg.type === "error") {
      this.onServerError(msg);
      return;
    }
    const cut = msg.type === "cancelled" && ctx === this.cutCtx;
    if (cut) this.cutCtx = null;
    if (!utt || ctx !== utt.ctx) {
      // A stream we already left behind; one a new Speak cut short still says what it used.
      if (cut && msg.usage) this.renderCutUsage(msg.usage);
      return;
    }
    if (msg.type === "cancelled") {
      if (utt.phase === "cancelled") this.showNotice("Cancelled"); // not after an error
      if (msg.usage) this.renderUsage((utt.usage = msg.usage)); // what the cut reply used
      return;
    }
    if (!utt.active || utt.lostReason) return; // given up: only what arrived before plays
    switch (msg.type) {
      case "ready":
        this.onReady(utt, msg);
        break;
      case "audio":
        this.onAudio(utt, msg);
        break;
      case "phrase":
        utt.phrasedChars += nonSpace(msg.text);
        this.captions.addPhrase(msg);
        break;
      case "words":
        this.captions.addWords(msg);
        break;
      case "done":
        this.onDone(utt, msg);
        break;
      default:
        break; // additions to the protocol are allowed; ignore what we do not know
    }
  }

  describeError(msg) {
    const m = msg.message ? `: ${msg.message}` : "";
    switch (msg.code) {
      case "overloaded":
        if (isShuttingDown(msg.message)) return MSG_SHUTTING_DOWN;
        return isStartingMessage(msg.message) ? MSG_STARTING : capacityMessage(msg.retry_after_s);
      case "unauthorized":
        return authMessage(this.token);
      case "unknown_voice":
        return `Unknown voice${m}`;
      case "text_too_long":
        return `The text is too long for one stream${m}`;
      case "too_many_contexts":
        return `Too many streams on this connection${m}`;
      case "bad_request":
        return `The server did not accept the request${m}`;
      case "internal":
        if (isShuttingDown(msg.message)) return MSG_SHUTTING_DOWN;
        return `The server failed while speaking${m}. Try again`;
      default:
        return `The server reported an error${m}${msg.code ? ` (${msg.code})` : ""}`;
    }
  }

  onServerError(msg) {
    const utt = this.utt;
    const mine = utt && utt.active && (msg.ctx === undefined || msg.ctx === utt.ctx);
    if (msg.ctx !== undefined && utt && msg.ctx !== utt.ctx) return; // an old stream
    if (mine && msg.code === "overloaded" && utt.phase === "starting" && !isShuttingDown(msg.message)) {
      // the socket stays usable: retry on it (not on a server shutting down: it closes next)
      this.refused(utt, Number(msg.retry_after_s ?? NaN), isStartingMessage(msg.message));
      return;
    }
    if (mine && msg.code === "internal" && utt.phase === "streaming" && this.hasAudioLeft(utt)) {
      // The server gave up on the stream (shutting down, its back end gone): what has arrived
      // is still worth hearing, as when the connection drops. The stream has ended there; a
      // cancel (answered whether live or not) makes sure it holds no slot.
      if (this.conn) this.conn.send({ type: "cancel", ctx: utt.ctx });
      this.playOutThenSay(utt, this.describeError(msg), "the server stopped the stream");
      return;
    }
    if (mine) this.fail(utt, this.describeError(msg));
    else this.showError(this.describeError(msg));
  }

  onReady(utt, msg) {
    utt.phase = "streaming";
    utt.ready = true;
    utt.format = msg.format || utt.format;
    utt.streamRate = msg.sample_rate || utt.requestedRate;
    utt.frameMs = msg.frame_ms || 20;
    if (utt.streamRate !== this.player.sampleRate) {
      utt.resampler = new LinearResampler(utt.streamRate, this.player.sampleRate);
    }
    if (utt.format === "opus") {
      utt.decoder = new OpusStreamDecoder(
        (samples, ptsMs) => this.enqueue(utt, samples, ptsMs),
        (err) => {
          if (this.utt !== utt || !utt.active) return; // closed on Stop or at the end
          this.fail(utt, `Audio decoder error: ${err.message || err}`);
        },
      );
    }
    this.renderStats("streaming", "speaking");
    this.feed(utt);
  }

  onAudio(utt, msg) {
    if (utt.ttfaMs === null) {
      utt.ttfaMs = performance.now() - utt.requestedAt;
    }
    const pts = Number(msg.pts_ms) || 0;
    const rendered = this.player.renderedMs();
    if (rendered !== null && pts - rendered < LATE_MARGIN_MS) {
      utt.lateArrivals += 1;
    }
    if (utt.format === "opus") {
      const packets = Array.isArray(msg.data) ? msg.data : [msg.data];
      for (const p of packets) utt.audioBytes += p.byteLength;
      utt.audioMs += packets.length * utt.frameMs;
      utt.decoder.decode(packets, pts, utt.frameMs);
    } else {
      const bytes = msg.data;
      utt.audioBytes += bytes.byteLength;
      utt.audioMs += (bytes.byteLength / 2 / utt.streamRate) * 1000;
      this.enqueue(utt, pcmToFloat32(bytes), pts);
    }
    this.renderStats();
  }

  /** Hand decoded audio to the worklet, keeping it on the stream's timeline. */
  enqueue(utt, samples, ptsMs) {
    if (this.utt !== utt || !utt.active) return;
    const rate = this.player.sampleRate;
    let data = utt.resampler ? utt.resampler.process(samples) : samples;
    const expected = Math.round((ptsMs * rate) / 1000);
    const gap = expected - utt.pushedSamples;
    if (gap > rate * 0.005) {
      // The timeline is contractually gap-free; if audio is missing anyway, keep captions in sync.
      console.warn(`audio gap of ${((gap / rate) * 1000).toFixed(1)} ms filled with silence`);
      this.player.push(utt.gen, new Float32Array(gap));
      utt.pushedSamples += gap;
    }
    if (data.buffer.byteLength !== data.byteLength) data = data.slice(); // transferable alone
    utt.pushedSamples += data.length;
    this.player.push(utt.gen, data);
  }

  onDone(utt, msg) {
    utt.usage = msg.usage || {};
    this.renderUsage(utt.usage);
    this.finishStream(utt, "playing the rest…");
  }

  onWorkletReport(report) {
    const utt = this.utt;
    if (!utt || report.gen !== utt.gen) return;
    if (report.type === "ended" && utt.phase === "draining") {
      this.updateCaptions();
      if (utt.lostReason) {
        // The connection went mid-stream; what had arrived has now been heard.
        utt.phase = "error";
        utt.release();
        this.disableStop();
        this.showError(utt.lostReason);
        this.renderStats("error");
        return;
      }
      utt.phase = "done";
      utt.release();
      this.disableStop();
      this.captions.finish();
      if (!utt.pushedSamples) this.showNotice(NOTHING_TO_SAY);
      this.renderStats("done");
      return;
    }
    this.renderStats();
    this.updateCaptions();
  }

  updateCaptions() {
    const utt = this.utt;
    if (!utt || utt.phase === "cancelled" || utt.phase === "error") return;
    this.captions.update(this.player.heardMs());
  }

  // --- statistics ------------------------------------------------------------------------------

  renderStats(state, label) {
    const stats = this.el.stats;
    if (state) {
      stats.dataset.state = state;
      this.stateLabel = label || state;
      setText($("stat-state"), this.stateLabel);
      if (state !== "streaming") this.showNotice(state === "done" ? "Finished" : "");
    }
    const utt = this.utt;
    const r = this.player.last;
    const rate = this.player.sampleRate;
    const playedMs = r ? (r.played * 1000) / rate : 0;
    const bufferedMs = r ? (r.buffered * 1000) / rate : 0;
    stats.dataset.playedMs = String(Math.round(playedMs));
    stats.dataset.bufferedMs = String(Math.round(bufferedMs));
    const underruns = this.underruns(utt, r);
    stats.dataset.underruns = String(underruns);
    stats.dataset.lateArrivals = String(utt ? utt.lateArrivals : 0);
    stats.dataset.outputPeak = String(r ? Number(r.peak.toFixed(4)) : 0);
    stats.dataset.ttfaMs = utt && utt.ttfaMs !== null ? String(Math.round(utt.ttfaMs)) : "";
    stats.dataset.retries = String(utt ? utt.retries : 0);
    stats.dataset.cushionMs = r && r.cushion ? String(Math.round((r.cushion * 1000) / rate)) : "";
    // The figures in words change at every audio message and player report; a person reads them
    // a few times a second, and each change repaints the page (the captions' text included).
    const now = performance.now();
    if (!state && now < this.statsTextDue) return;
    this.statsTextDue = now + STATS_TEXT_MS;
    setText($("stat-played"), `${(playedMs / 1000).toFixed(1)} s`); // tenths: data-played-ms is exact
    setText($("stat-buffered"), `${Math.round(bufferedMs)} ms`);
    const silentMs = r ? Math.round((r.underrunSamples * 1000) / rate) : 0;
    const late = utt && utt.lateArrivals ? `; audio came late ${utt.lateArrivals}×` : "";
    setText($("stat-underruns"), underruns ? `${underruns} (${silentMs} ms silent${late})` : "0");
    setText($("stat-ttfa"), utt && utt.ttfaMs !== null ? `${Math.round(utt.ttfaMs)} ms` : "–");
    setText($("stat-format"), this.formatLabel(utt));
    setText($("stat-kbps"), utt && utt.audioMs > 0 ? `${((utt.audioBytes * 8) / utt.audioMs).toFixed(1)} kbps` : "–");
  }

  /** What the reply a new Speak cut short used (its `cancelled.usage`); null hides it. */
  renderCutUsage(u) {
    const el = $("usage-cut");
    el.hidden = !u;
    el.dataset.computeMs = u ? String(u.compute_ms ?? "") : "";
    if (!u) return;
    const cost = u.cost == null ? "" : `, cost ${Number(u.cost).toPrecision(3)}`;
    el.textContent =
      `The reply cut short used ${u.chars ?? "n/a"} characters, ` +
      `${fmt(u.audio_ms == null ? null : u.audio_ms / 1000, 2, " s")} of audio, ` +
      `${fmt(u.compute_ms, 0, " ms")} of compute${cost}`;
  }

  formatLabel(utt) {
    if (!utt || !utt.ready) return "–";
    const khz = `${utt.streamRate / 1000} kHz`;
    return utt.format === "opus" ? `Opus ${khz}` : `PCM ${khz}`;
  }

  clearUsage() {
    this.el.stats.dataset.audioMs = "";
    for (const id of ["chars", "audio", "compute", "encode", "energy", "cost", "ttfa"]) {
      $(`usage-${id}`).textContent = "–";
    }
  }

  /** Usage from `done` or `cancelled`; null fields (no GPU power meter, no tariff) show as n/a. */
  renderUsage(u) {
    this.el.stats.dataset.audioMs = u.audio_ms == null ? "" : String(u.audio_ms);
    $("usage-chars").textContent = u.chars == null ? "n/a" : String(u.chars);
    $("usage-audio").textContent = fmt(u.audio_ms == null ? null : u.audio_ms / 1000, 2, " s");
    $("usage-compute").textContent = fmt(u.compute_ms, 0, " ms");
    $("usage-encode").textContent = fmt(u.encode_ms, 1, " ms");
    $("usage-energy").textContent = fmt(u.energy_j, 2, " J");
    $("usage-cost").textContent = u.cost == null ? "n/a" : Number(u.cost).toPrecision(3);
    $("usage-ttfa").textContent = fmt(u.ttfa_ms, 0, " ms");
  }
}

new App().start();
