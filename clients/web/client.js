// worldgen browser client: speaks docs/protocol.md (msgpack over one websocket), draws the
// JPEG frames on a canvas and sends the keyboard and pointer-lock mouse as actions.
// Plain script, no build step; MessagePack comes from msgpack.min.js (vendored).
"use strict";

const PROTOCOL_VERSION = 1;
const SENSITIVITY = 0.15;  // degrees of yaw/pitch per pixel of mouse movement
const HELD_RESEND_MS = 100;  // while keys are held, resend them so latency keeps being measured
const FPS_WINDOW_MS = 2000;  // frames/s shown = frames received over this long (a few even at 2 fps)
// KeyboardEvent.code -> the action schema's key (worldgen/actions.py). Ctrl is avoided: Ctrl+W
// would close the tab.
const KEYMAP = {
  KeyW: "forward", ArrowUp: "forward", KeyS: "back", ArrowDown: "back",
  KeyA: "strafe_left", KeyD: "strafe_right", ArrowLeft: "turn_left", ArrowRight: "turn_right",
  Space: "attack", KeyE: "use", KeyF: "use",
};
// What each fatal error means for the person at the keyboard (the server's text follows).
const REFUSALS = {
  busy: "The server is full: it already runs as many sessions as it allows. Press Reconnect in a moment.",
  unauthorized: "The server wants a token: open the exact URL that `worldgen serve` printed (it ends in ?token=…).",
  version_mismatch: "This page and the server speak different protocol versions: reload the page.",
  idle_timeout: "The session closed after a long time without input. Press Reconnect to play again.",
  hello_required: "The server did not understand this client's greeting.",
  internal: "The server's model failed on this session. Press Reconnect to start a new one.",
};

const params = new URLSearchParams(location.search);
const canvas = document.getElementById("screen");
const ctx = canvas.getContext("2d");
const overlay = document.getElementById("overlay");
const statusEl = document.getElementById("status");
const errorEl = document.getElementById("error");

// Everything worth seeing from outside (the console, tests) lives here.
const state = window.worldgen = {
  ws: null, welcome: null, stats: null, error: null, connected: false, refused: false,
  frames: 0, lastId: -1, drawnId: -1, frameTimes: [], latency: null, latencySmooth: null,
  codes: new Set(), mouse: [0, 0], mouseButton: false, lastAction: null, lastSend: 0, retries: 0,
  // ?record=1: every frame received (its JPEG as base64) and every action sent, so a script can
  // tell which action each frame showed (benchmarks/browser_play.py replays them in the game).
  record: params.has("record") ? { frames: [], actions: [] } : null,
};

function setStatus(text) { statusEl.textContent = text; }
function showError(text) {
  state.error = text;
  errorEl.textContent = text;
  errorEl.style.display = text ? "block" : "none";
}

function serverUrl() {
  if (params.get("server")) return params.get("server");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(MessagePack.encode(msg));
}

function connect() {
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  showError("");
  state.refused = false;
  state.welcome = null;
  const url = serverUrl();
  setStatus(`connecting to ${url}…`);
  const ws = state.ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    const seed = params.has("seed") ? Number(params.get("seed")) : null;
    send({ type: "hello", version: PROTOCOL_VERSION, token: params.get("token"), seed, client: "browser" });
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") return;  // the protocol is binary only
    onMessage(MessagePack.decode(new Uint8Array(ev.data)));
  };
  ws.onclose = (ev) => {
    state.connected = false;
    if (state.refused) { setStatus(`closed by the server (${ev.code})`); return; }
    // Lost without a refusal (network, server restart): try again, backing off to 10 s.
    const wait = Math.min(10000, 1000 * 2 ** state.retries++);
    const was = state.welcome ? "lost the connection" : `cannot reach the server at ${url}`;
    showError(`${was} (code ${ev.code}); retrying in ${wait / 1000} s. Is \`worldgen serve\` running?`);
    setStatus("disconnected");
    setTimeout(() => { if (state.ws === ws) connect(); }, wait);
  };
}

function onMessage(msg) {
  switch (msg.type) {
    case "welcome":
      state.welcome = msg;
      state.connected = true;
      state.retries = 0;
      state.lastId = state.drawnId = -1;
      canvas.width = msg.width;
      canvas.height = msg.height;
      fitCanvas();
      drawStatus();
      break;
    case "frame": onFrame(msg); break;
    case "stats": state.stats = msg; break;
    case "error":
      if (msg.fatal) {
        state.refused = true;
        showError(`${REFUSALS[msg.code] || "The server closed the session."} [${msg.code}: ${msg.message}]`);
      } else {
        console.warn(`worldgen server: ${msg.code}: ${msg.message}`);
      }
      break;
  }
}

function onFrame(msg) {
  const now = performance.now();
  state.frames++;
  state.lastId = msg.id;
  state.frameTimes.push(now);
  if (msg.t !== null && msg.t !== undefined) {  // the first frame that shows an action we sent
    state.latency = now - msg.t;
    state.latencySmooth = state.latencySmooth === null ? state.latency : 0.8 * state.latencySmooth + 0.2 * state.latency;
  }
  if (state.record) {
    let bin = "";
    for (const b of msg.jpeg) bin += String.fromCharCode(b);
    state.record.frames.push({ id: msg.id, step: msg.step, t: msg.t ?? null, reset: !!msg.reset, jpeg: btoa(bin) });
  }
  const id = msg.id;
  createImageBitmap(new Blob([msg.jpeg], { type: "image/jpeg" })).then((bmp) => {
    if (id > state.drawnId || msg.reset) {  // decoding may finish out of order: never go back
      ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      state.drawnId = id;
    }
    bmp.close();
  });
  drawOverlay();
}

// Frames/s actually received lately: the server's target is only an upper bound (a slow machine
// or network delivers fewer), and when frames stop coming this falls to 0.
function measuredFps() {
  const t = state.frameTimes, now = performance.now();
  while (t.length && t[0] < now - FPS_WINDOW_MS) t.shift();
  return t.length < 2 ? 0 : (t.length - 1) * 1000 / (t[t.length - 1] - t[0]);
}

function drawStatus() {
  const w = state.welcome;
  setStatus(`session ${w.session} · seed ${w.seed} · ${w.width}×${w.height} · ` +
            `${measuredFps().toFixed(1)} fps (target ${w.fps.toFixed(2)})`);
}

function drawOverlay() {
  if (!state.welcome) { overlay.textContent = ""; return; }
  drawStatus();
  const fps = measuredFps().toFixed(1);
  const lat = state.latencySmooth === null ? "–" : `${state.latencySmooth.toFixed(0)} ms`;
  const s = state.stats;
  overlay.textContent = `${fps} fps · latency ${lat} · frame ${state.lastId}` +
    (s ? `\ndropped ${s.dropped} · model ${s.gen_ms.toFixed(1)} ms · ${s.sessions} playing` : "");
}

function fitCanvas() {
  const scale = Math.max(1, Math.floor(Math.min((innerWidth - 24) / canvas.width, (innerHeight - 140) / canvas.height)));
  canvas.style.width = `${canvas.width * scale}px`;
  canvas.style.height = `${canvas.height * scale}px`;
}

function heldKeys() {
  const keys = new Set([...state.codes].map((c) => KEYMAP[c]));
  if (state.mouseButton) keys.add("attack");
  return [...keys];
}

function sendAction() {
  if (!state.connected) return;
  const msg = { type: "action", keys: heldKeys(), mouse: [state.mouse[0], state.mouse[1]], t: performance.now() };
  state.mouse = [0, 0];  // deltas: each one is sent once
  state.lastAction = msg;
  state.lastSend = msg.t;
  if (state.record) state.record.actions.push({ t: msg.t, keys: msg.keys, mouse: msg.mouse });
  send(msg);
}

function reset() {
  send({ type: "reset", seed: params.has("seed") ? Number(params.get("seed")) : null });
}

document.addEventListener("keydown", (e) => {
  if (e.code === "KeyR" && !e.repeat) { reset(); return; }
  const key = KEYMAP[e.code];
  if (!key) return;
  e.preventDefault();  // arrows and space would scroll the page
  if (!state.codes.has(e.code)) { state.codes.add(e.code); sendAction(); }
});
document.addEventListener("keyup", (e) => {
  // Held keys are tracked by code: W and ArrowUp both walk, and letting go of one while the
  // other is down keeps walking.
  if (state.codes.delete(e.code)) sendAction();
});
window.addEventListener("blur", () => { state.codes.clear(); state.mouseButton = false; sendAction(); });

canvas.addEventListener("mousedown", (e) => {
  if (document.pointerLockElement !== canvas) { canvas.requestPointerLock(); return; }
  if (e.button === 0) { state.mouseButton = true; sendAction(); }
});
document.addEventListener("mouseup", (e) => {
  if (e.button === 0 && state.mouseButton) { state.mouseButton = false; sendAction(); }
});
let flushPending = false;
document.addEventListener("mousemove", (e) => {
  if (document.pointerLockElement !== canvas) return;
  state.mouse[0] += e.movementX * SENSITIVITY;  // right = yaw > 0
  state.mouse[1] -= e.movementY * SENSITIVITY;  // up (negative movementY) = pitch > 0
  if (!flushPending) {  // one action per animation frame, however many mouse events came
    flushPending = true;
    requestAnimationFrame(() => { flushPending = false; sendAction(); });
  }
});
setInterval(() => {
  if ((state.codes.size || state.mouseButton) && performance.now() - state.lastSend >= HELD_RESEND_MS) sendAction();
  drawOverlay();
}, HELD_RESEND_MS);

document.getElementById("reset").addEventListener("click", (e) => { e.target.blur(); reset(); });
document.getElementById("reconnect").addEventListener("click", (e) => { e.target.blur(); state.retries = 0; connect(); });
window.addEventListener("resize", fitCanvas);
connect();
