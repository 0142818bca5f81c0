// AudioWorklet processor: plays one stream of mono Float32 samples as they arrive.
//
// It owns a ring buffer filled by the page (decoded audio) and drained by the audio thread, so
// playback is paced by the sound card, never by network arrival. It reports what it has actually
// rendered, which is the only honest clock for "what the listener hears now" (captions) and for
// underrun counting.
//
// Page -> worklet (port messages):
//   {type: "reset", gen, startupSamples}  new stream: empty buffer, zero counters, wait for data
//   {type: "push", gen, samples}          append a Float32Array (its buffer may be transferred)
//   {type: "draining", gen}               the server sent its last audio (decoding may still be
//                                         finishing): running dry now is the end, not an underrun
//   {type: "end", gen}                    no more data will come: play what is left, then "ended"
//   {type: "clear", gen}                  stop now: drop everything buffered, output silence
//   {type: "cushion", gen, samples}       after running dry, restart only with this much buffered
//                                         (the page grows it when the network keeps falling behind)
// Worklet -> page:
//   {type: "status"|"started"|"ended"|"cleared", gen, played, buffered, underruns,
//    underrunSamples, peak, state, time, cushion}
//   played/buffered/underrunSamples are sample counts; peak is the largest |sample| output since
//   the previous report (0 means the output was silent); time is the AudioContext time at the
//   end of the last rendered quantum.

const REPORT_INTERVAL_S = 0.05;
// After Stop or the end, keep reporting this long so the page sees the silent output (peak 0).
const TAIL_REPORT_S = 0.5;
// Stop, or a new stream, cuts the sound playing over this long: the next few ms of what was
// buffered, faded out. Cut at once mid-waveform, it clicked. Sound that resumes after the
// listener ran dry (mid-word, as a rule) fades in over as long.
const FADE_S = 0.005;

class RingBuffer {
  constructor(capacity) {
    this.data = new Float32Array(capacity);
    this.read = 0; // index of the oldest sample
    this.size = 0; // samples stored
  }

  clear() {
    this.read = 0;
    this.size = 0;
  }

  /** Append samples, doubling the storage when full: the server may run ahead of real time. */
  push(samples) {
    if (this.size + samples.length > this.data.length) {
      this.grow(this.size + samples.length);
    }
    const cap = this.data.length;
    const write = (this.read + this.size) % cap;
    const first = Math.min(samples.length, cap - write);
    this.data.set(samples.subarray(0, first), write);
    if (first < samples.length) this.data.set(samples.subarray(first), 0);
    this.size += samples.length;
  }

  /** Copy up to out.length samples into out; returns how many were copied. */
  pull(out) {
    const n = Math.min(out.length, this.size);
    const cap = this.data.length;
    const first = Math.min(n, cap - this.read);
    out.set(this.data.subarray(this.read, this.read + first), 0);
    if (first < n) out.set(this.data.subarray(0, n - first), first);
    this.read = (this.read + n) % cap;
    this.size -= n;
    return n;
  }

  grow(minCapacity) {
    let cap = this.data.length * 2;
    while (cap < minCapacity) cap *= 2;
    const next = new Float32Array(cap);
    const tmp = next.subarray(0, this.size);
    this.pull(tmp);
    this.size = tmp.length;
    this.data = next;
    this.read = 0;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new RingBuffer(sampleRate * 10);
    this.fade = new Float32Array(Math.round(sampleRate * FADE_S)); // the sound being cut
    this.fadeLength = 0; // samples of `fade` to play
    this.fadeAt = 0; // of which played
    this.fadeIn = 0; // samples of a resumed sound still to fade in
    this.gen = 0;
    this.reportEvery = Math.round(sampleRate * REPORT_INTERVAL_S);
    this.resetStream(0, Math.round(sampleRate * 0.08));
    this.state = "idle";
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  resetStream(gen, startupSamples) {
    this.ring.clear();
    this.fadeIn = 0;
    this.gen = gen;
    this.startupSamples = startupSamples;
    this.cushionSamples = startupSamples; // what a restart after running dry waits for
    // idle -> buffering -> playing -> (rebuffering -> playing)* -> ended; "cleared" after Stop.
    this.state = "buffering";
    this.ended = false; // the page said no more data will come
    this.draining = false; // the server has sent everything; only local decoding is pending
    this.played = 0;
    this.underruns = 0;
    this.underrunSamples = 0;
    this.starved = false; // inside an underrun episode (count each episode once)
    this.peak = 0;
    this.sinceReport = 0;
    this.tail = 0; // samples of reporting left after "cleared"/"ended"
  }

  /** Keep the next few ms of what is playing, faded to silence, to play as it is dropped. */
  fadeOut() {
    if (this.state !== "playing") return; // nothing sounding now: nothing to cut
    const n = Math.min(this.fade.length, this.ring.size);
    this.ring.pull(this.fade.subarray(0, n));
    for (let i = 0; i < n; i++) this.fade[i] *= 1 - (i + 1) / (n + 1);
    this.fadeLength = n;
    this.fadeAt = 0;
  }

  onMessage(msg) {
    if (msg.type === "reset") {
      this.fadeOut();
      this.resetStream(msg.gen, msg.startupSamples);
      this.report("status");
      return;
    }
    if (msg.gen !== this.gen) return; // a late message for a stream already replaced
    if (msg.type === "push") {
      if (this.state === "cleared" || this.state === "ended") return;
      this.ring.push(msg.samples);
    } else if (msg.type === "draining") {
      this.draining = true;
    } else if (msg.type === "end") {
      this.ended = true;
      const waiting = this.state === "buffering" || this.state === "rebuffering";
      if (waiting && this.ring.size === 0) this.finish();
    } else if (msg.type === "cushion") {
      this.cushionSamples = msg.samples;
    } else if (msg.type === "clear") {
      this.fadeOut();
      this.ring.clear();
      this.state = "cleared";
      this.tail = Math.round(sampleRate * TAIL_REPORT_S);
      this.report("cleared");
    }
  }

  finish() {
    this.state = "ended";
    this.tail = Math.round(sampleRate * TAIL_REPORT_S);
    this.report("ended");
  }

  report(type) {
    this.port.postMessage({
      type,
      gen: this.gen,
      played: this.played,
      buffered: this.ring.size,
      underruns: this.underruns,
      underrunSamples: this.underrunSamples,
      peak: this.peak,
      state: this.state,
      time: currentTime,
      cushion: this.cushionSamples,
    });
    this.peak = 0;
    this.sinceReport = 0;
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const frames = ch0.length;
    if (this.state === "buffering" || this.state === "rebuffering") {
      // Start (or restart after running dry) only with a cushion, or when nothing more will come.
      const cushion = this.state === "buffering" ? this.startupSamples : this.cushionSamples;
      if (this.ring.size >= cushion || (this.ended && this.ring.size > 0)) {
        const first = this.state === "buffering";
        this.state = "playing";
        if (first) this.report("started");
        else this.fadeIn = this.fade.length;
      }
    }
    if (this.state === "playing") {
      const got = this.ring.pull(ch0);
      this.played += got;
      for (let i = 0; i < got && this.fadeIn > 0; i++, this.fadeIn--) {
        ch0[i] *= 1 - this.fadeIn / (this.fade.length + 1);
      }
      for (let i = 0; i < got; i++) {
        const a = Math.abs(ch0[i]);
        if (a > this.peak) this.peak = a;
      }
      if (got < frames) {
        ch0.fill(0, got);
        if (this.ended) {
          this.finish(); // the natural end of the stream: not an underrun
        } else if (this.draining) {
          this.state = "rebuffering"; // the last decoded frames are on their way
        } else {
          // Output wanted, stream still open, nothing to play: an underrun.
          if (!this.starved) this.underruns += 1;
          this.starved = true;
          this.underrunSamples += frames - got;
          this.state = "rebuffering";
        }
      } else {
        this.starved = false;
      }
    } else if (this.state === "rebuffering" && !this.ended && !this.draining) {
      this.underrunSamples += frames;
    }
    if (this.fadeAt < this.fadeLength) {
      // The sound Stop (or a new stream) cut, fading out over the stream's own first quanta.
      const n = Math.min(frames, this.fadeLength - this.fadeAt);
      for (let i = 0; i < n; i++) {
        ch0[i] += this.fade[this.fadeAt + i];
        const a = Math.abs(ch0[i]);
        if (a > this.peak) this.peak = a;
      }
      this.fadeAt += n;
    }
    for (let c = 1; c < out.length; c++) out[c].set(ch0);

    this.sinceReport += frames;
    if (this.sinceReport >= this.reportEvery && this.state !== "idle") {
      const over = this.state === "ended" || this.state === "cleared";
      if (!over || this.tail > 0) this.report("status");
      else this.sinceReport = 0;
    }
    if (this.tail > 0) this.tail = Math.max(0, this.tail - frames);
    return true; // keep the processor alive between streams
  }
}

registerProcessor("player-processor", PlayerProcessor);
