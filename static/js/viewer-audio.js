// The desktop's sound, for templates with sound: a second socket (/api/v1/audio/<session>)
// carries the desktop's Ogg Opus stream through the same relay as the picture; WebCodecs'
// AudioDecoder decodes each 10 ms packet and it is played at once through Web Audio.
//
// Browsers only play sound after a user gesture: nothing is opened before the first click
// or key press on the page (the desktop included). The Mute button mutes and unmutes.
// Buffering is kept minimal: each decoded packet is scheduled START_LEAD after "now"
// when the queue ran dry, back to back otherwise, and a packet that would play more than
// MAX_LEAD ahead is dropped (the desktop's clock runs a little faster than the speaker's).
//
// window.streamspaceAudio shows what happens (state, packets, drops, the AnalyserNode after
// the mute gain) for tests and for curious users.

const config = JSON.parse(document.getElementById("viewer-config").textContent);
const button = document.getElementById("viewer-sound");

const START_LEAD = 0.03; // seconds scheduled ahead when (re)starting
const MAX_LEAD = 0.12; // seconds ahead beyond which a packet is dropped
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 10000;
const GOOD_CONNECTION_MS = 5000;
const WATCH_MS = 500; // how often to look whether the picture is connected
// Close codes after which trying again cannot help: log in first, no such session, and 4403:
// not offered, or the agent or the desktop cannot carry sound (vnc_app/audio.py).
const FINAL_CODES = new Set([4401, 4403, 4404]);

const audio = {
  state: "waiting", // waiting (for a gesture) | connecting | playing | disconnected | refused | unavailable
  muted: false,
  packets: 0, // Opus packets decoded
  dropped: 0, // packets dropped to keep the latency down
  underruns: 0, // times the queue ran dry and playback restarted
  closeCode: null,
  closeReason: "",
  context: null,
  analyser: null,
};
window.streamspaceAudio = audio;

let gain = null;
let socket = null;
let backoff = BACKOFF_MIN_MS;
let retryAt = 0;

function setState(state, title) {
  audio.state = state;
  button.dataset.state = state;
  if (title) button.title = title;
}

function showMuted() {
  button.textContent = audio.muted ? "Unmute" : "Mute";
  button.setAttribute("aria-pressed", String(audio.muted));
  if (gain) gain.gain.value = audio.muted ? 0 : 1;
}

// --- start on the first gesture ----------------------------------------------------------

function start() {
  if (audio.context) return;
  if (typeof AudioDecoder === "undefined") {
    // WebCodecs exists only in secure contexts: HTTPS, or http://localhost.
    setState("unavailable", "Sound needs HTTPS (WebCodecs) in a recent Chromium, Edge or Firefox.");
    button.disabled = true;
    return;
  }
  const ctx = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
  ctx.resume();
  gain = ctx.createGain();
  audio.analyser = ctx.createAnalyser();
  gain.connect(audio.analyser).connect(ctx.destination);
  audio.context = ctx;
  showMuted();
  setState("connecting", "Connecting the sound…");
  setInterval(watch, WATCH_MS);
  watch();
}

function onGesture(event) {
  if (event.target === button) return; // the button's own click decides
  window.removeEventListener("pointerdown", onGesture, true);
  window.removeEventListener("keydown", onGesture, true);
  start();
}

window.addEventListener("pointerdown", onGesture, true);
window.addEventListener("keydown", onGesture, true);
button.addEventListener("click", () => {
  if (!audio.context) return start();
  audio.muted = !audio.muted;
  showMuted();
});

// --- the socket follows the picture ------------------------------------------------------

function watch() {
  if (audio.state === "refused") return;
  const viewer = window.streamspaceViewer;
  const pictureUp = viewer && viewer.state === "connected";
  if (!pictureUp) {
    if (socket) {
      socket.byPage = true; // the picture dropped: no fault of the sound's, no backoff
      socket.close(1000);
    }
    return;
  }
  if (!socket && Date.now() >= retryAt) connect();
}

function connect() {
  const ws = new WebSocket(config.audio_url, ["binary"]);
  ws.binaryType = "arraybuffer";
  socket = ws;
  setState("connecting", "Connecting the sound…");
  const player = new Player(audio.context, gain);
  let goodTimer = null;
  ws.onopen = () => {
    goodTimer = setTimeout(() => {
      backoff = BACKOFF_MIN_MS;
    }, GOOD_CONNECTION_MS);
  };
  ws.onmessage = (e) => {
    if (audio.state !== "playing") setState("playing", "Sound is on.");
    player.feed(new Uint8Array(e.data));
  };
  ws.onclose = (e) => {
    clearTimeout(goodTimer);
    player.close();
    if (socket === ws) socket = null;
    audio.closeCode = e.code;
    audio.closeReason = e.reason;
    if (FINAL_CODES.has(e.code)) {
      setState("refused", `No sound: ${e.reason || e.code}`);
      return;
    }
    if (ws.byPage) {
      backoff = BACKOFF_MIN_MS;
      retryAt = 0; // again as soon as the picture is back
    } else {
      retryAt = Date.now() + backoff;
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
    setState("disconnected", `Sound disconnected${e.reason ? `: ${e.reason}` : ""}; retrying.`);
  };
}

// --- Ogg pages -> Opus packets -> AudioDecoder -> Web Audio --------------------------------

class Player {
  constructor(ctx, output) {
    this.ctx = ctx;
    this.output = output;
    this.pending = new Uint8Array(0); // bytes not yet parsed into pages
    this.partial = []; // the segments of a packet continued on the next page
    this.timestamp = 0;
    this.playAt = 0;
    this.decoder = new AudioDecoder({
      output: (data) => this.play(data),
      error: (err) => {
        audio.closeReason = `decoder: ${err.message}`;
        if (socket) socket.close(1000);
      },
    });
    this.decoder.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: 2 });
  }

  feed(bytes) {
    const all = new Uint8Array(this.pending.length + bytes.length);
    all.set(this.pending);
    all.set(bytes, this.pending.length);
    let at = 0;
    while (all.length - at >= 27) {
      const segments = all[at + 26];
      const headerEnd = at + 27 + segments;
      if (all.length < headerEnd) break;
      let bodyLength = 0;
      for (let i = 0; i < segments; i++) bodyLength += all[at + 27 + i];
      if (all.length < headerEnd + bodyLength) break;
      let offset = headerEnd;
      for (let i = 0; i < segments; i++) {
        const size = all[at + 27 + i];
        this.partial.push(all.subarray(offset, offset + size));
        offset += size;
        if (size < 255) this.packet();
      }
      at = headerEnd + bodyLength;
    }
    this.pending = all.slice(at);
  }

  packet() {
    const parts = this.partial;
    this.partial = [];
    const length = parts.reduce((n, p) => n + p.length, 0);
    const data = new Uint8Array(length);
    let at = 0;
    for (const p of parts) {
      data.set(p, at);
      at += p.length;
    }
    // The stream's two header packets (OpusHead, OpusTags) carry no sound.
    if (length >= 8 && data[0] === 0x4f && data[1] === 0x70 && data[2] === 0x75 && data[3] === 0x73) {
      const magic = String.fromCharCode(...data.subarray(0, 8));
      if (magic === "OpusHead" || magic === "OpusTags") return;
    }
    if (this.decoder.state !== "configured") return;
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data }));
    this.timestamp += 10000; // microseconds; only their order matters here
  }

  play(data) {
    audio.packets += 1;
    const now = this.ctx.currentTime;
    if (this.playAt < now) {
      if (this.playAt) audio.underruns += 1;
      this.playAt = now + START_LEAD;
    } else if (this.playAt - now > MAX_LEAD) {
      audio.dropped += 1;
      data.close();
      return;
    }
    const frames = data.numberOfFrames;
    const buffer = this.ctx.createBuffer(data.numberOfChannels, frames, data.sampleRate);
    for (let c = 0; c < data.numberOfChannels; c++) {
      const plane = new Float32Array(frames);
      data.copyTo(plane, { planeIndex: c, format: "f32-planar" });
      buffer.copyToChannel(plane, c);
    }
    data.close();
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    source.start(this.playAt);
    this.playAt += buffer.duration;
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}
