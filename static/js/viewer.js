// The desktop viewer: noVNC (served locally from @novnc/novnc) over the StreamSpace
// relay socket. Opened on a hibernated session, it wakes it; a session hibernated while
// the viewer is open (the user in the portal, or a policy) stays hibernated, and the
// viewer offers a Wake button instead. It waits for a session that is starting,
// reconnects with exponential backoff when the link drops, and reports what it does
// in #viewer-status (text + data-state) and in window.streamspaceViewer for tests.
// The desktop follows the window's size (noVNC's resizeSession: SetDesktopSize on open,
// on resize and on full screen) unless the user picks Scale (remembered in localStorage);
// the clipboard lives in viewer-clipboard.js.

import { setupClipboard } from "./viewer-clipboard.js";

const config = JSON.parse(document.getElementById("viewer-config").textContent);
const statusEl = document.getElementById("viewer-status");
const screenEl = document.getElementById("screen");
const screenWrap = screenEl.parentElement;
const wakeButton = document.getElementById("viewer-wake");
const warningEl = document.getElementById("viewer-warning");
const warningText = document.getElementById("viewer-warning-text");
const stayButton = document.getElementById("viewer-stay");

// Start fetching noVNC at once, while the session's state is being looked at.
const rfbModule = import(config.rfb_module_url);

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10000;
const GOOD_CONNECTION_MS = 5000; // a connection that lasted this long resets the backoff
const POLL_MS = 1500;
const SLOW_POLL_MS = 3000;
const WATCH_MS = config.watch_ms || 5000; // while connected, how often to look at the session's state
const MAX_RELOADS = 3; // page reloads when noVNC's modules fail to load
const RELOADS_KEY = `streamspace-viewer-reloads-${config.session_id}`;
const FIT_KEY = "streamspace-viewer-fit"; // "resize" (the desktop follows the window) or "scale"
// States that end a connection even if the desktop's socket stays open meanwhile.
const LEAVING_STATES = new Set(["hibernating", "hibernated", "terminating", "terminated", "failed"]);

const viewer = {
  state: "loading", // loading | waiting | waking | hibernated | connecting | connected | disconnected | error | ended
  connects: 0, // successful connects so far
  sessionState: config.state,
  closeCode: null,
  closeReason: "",
  message: "",
  warning: null, // the lifecycle warning shown ("Still there?"), as the API gave it
  fit: localStorage.getItem(FIT_KEY) === "scale" ? "scale" : "resize",
  reconnect: () => reconnectNow(),
};
window.streamspaceViewer = viewer;
const fitButton = document.getElementById("viewer-fit");

let rfb = null;
const clipboard = setupClipboard(config, viewer, () => rfb);
let timer = null; // the one pending step (poll or reconnect)
let generation = 0; // bumped by a manual reconnect, so stale callbacks do nothing
let backoff = BACKOFF_MIN_MS;
// Only opening the viewer of a hibernated (or hibernating) session wakes it by itself.
let wakeOnArrival = config.state === "hibernated" || config.state === "hibernating";

// --- status ------------------------------------------------------------------------------

function setStatus(state, text, link) {
  viewer.state = state;
  viewer.message = text;
  statusEl.dataset.state = state;
  statusEl.textContent = text;
  wakeButton.hidden = state !== "hibernated";
  if (link) {
    const a = document.createElement("a");
    a.href = link.href;
    a.textContent = link.text;
    statusEl.append(" ", a);
  }
}

function later(ms, step) {
  clearTimeout(timer);
  const gen = generation;
  timer = setTimeout(() => {
    if (gen === generation) step();
  }, ms);
}

function nextBackoff() {
  const delay = backoff;
  backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  return delay;
}

function seconds(ms) {
  return `${(ms / 1000).toLocaleString(undefined, { maximumFractionDigits: 1 })} s`;
}

function loginAgain() {
  setStatus("error", "Your login has expired.", { href: config.login_url, text: "Log in again" });
}

// --- the lifecycle warning ---------------------------------------------------------------

let warningTimer = null;
let warningDue = 0;

function showWarning(warning) {
  viewer.warning = warning || null;
  clearInterval(warningTimer);
  if (!warning) {
    warningEl.hidden = true;
    return;
  }
  warningDue = Date.now() + warning.seconds_left * 1000;
  const verb = warning.action === "terminate" ? "terminated" : "hibernated";
  const tick = () => {
    const left = Math.max(0, Math.ceil((warningDue - Date.now()) / 1000));
    warningText.textContent = `${warning.detail} This desktop will be ${verb} in ${left} s.`;
  };
  tick();
  warningTimer = setInterval(tick, 1000);
  stayButton.hidden = !warning.can_stay;
  warningEl.hidden = false;
}

async function stay() {
  let res;
  try {
    res = await api(config.keepalive_url, "POST");
  } catch {
    return; // the next look at the session shows the warning again if it still stands
  }
  if (res.status === 200) {
    showWarning(res.body.lifecycle_warning);
    if (rfb) rfb.focus();
  } else if (res.status === 401) {
    loginAgain();
  }
}

// --- the session's state -----------------------------------------------------------------

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : config.csrf_token;
}

async function api(url, method = "GET") {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
  const response = await fetch(url, { method, headers, credentials: "same-origin" });
  let body = {};
  try {
    body = await response.json();
  } catch {
    // an HTML error page: the status says enough
  }
  return { status: response.status, body };
}

// Look at the session and take the next step towards a connected desktop.
async function settle() {
  const gen = generation;
  let res;
  try {
    res = await api(config.session_url);
  } catch {
    if (gen !== generation) return;
    const delay = nextBackoff();
    setStatus("disconnected", `Cannot reach StreamSpace. Retrying in ${seconds(delay)}…`);
    later(delay, settle);
    return;
  }
  if (gen !== generation) return;
  if (res.status === 401 || res.status === 403) return loginAgain();
  if (res.status === 404) return setStatus("error", "No such session.");
  if (res.status !== 200) {
    const delay = nextBackoff();
    setStatus("disconnected", `StreamSpace answered ${res.status}. Retrying in ${seconds(delay)}…`);
    later(delay, settle);
    return;
  }
  act(res.body.state, res.body.error_message, res.body.lifecycle_reason);
}

function act(state, errorMessage, lifecycleReason = "") {
  viewer.sessionState = state;
  if (state !== "running") showWarning(null);
  // Why a lifecycle policy hibernated or ended it, e.g. "hibernated after 30 min without input".
  const byPolicy = lifecycleReason ? ` It was ${lifecycleReason}.` : "";
  if (state !== "hibernated" && state !== "hibernating") wakeOnArrival = false;
  switch (state) {
    case "running":
      return connect();
    case "hibernated":
      if (!wakeOnArrival) return setStatus("hibernated", `The desktop is hibernated.${byPolicy}`);
      wakeOnArrival = false;
      return wake();
    case "pending":
    case "starting":
      setStatus("waiting", "Starting the desktop…");
      return later(POLL_MS, settle);
    case "waking":
      setStatus("waking", "Waking the desktop…");
      return later(POLL_MS, settle);
    case "hibernating":
      setStatus(
        "waiting",
        wakeOnArrival ? "The desktop is hibernating; it will be woken when that is done…" : "The desktop is hibernating…",
      );
      return later(POLL_MS, settle);
    case "degraded":
      setStatus("waiting", "The desktop's agent is not answering. Waiting for it to come back…");
      return later(SLOW_POLL_MS, settle);
    case "failed":
      return setStatus("ended", `This session failed${errorMessage ? `: ${errorMessage}` : "."}`);
    case "terminating":
    case "terminated":
      return setStatus("ended", `This session has ended.${byPolicy}`);
    default:
      setStatus("waiting", `The session is ${state}. Waiting…`);
      return later(SLOW_POLL_MS, settle);
  }
}

async function wake() {
  const gen = generation;
  setStatus("waking", "Waking the desktop…");
  let res;
  try {
    res = await api(config.wake_url, "POST");
  } catch {
    if (gen !== generation) return;
    const delay = nextBackoff();
    setStatus("disconnected", `Cannot reach StreamSpace. Retrying in ${seconds(delay)}…`);
    return later(delay, settle);
  }
  if (gen !== generation) return;
  if (res.status === 202 || res.status === 409) {
    // 409: someone else moved the session meanwhile; look again.
    return later(POLL_MS, settle);
  }
  if (res.status === 401) return loginAgain();
  if (res.status === 404) return setStatus("error", "No such session.");
  const detail = res.body.detail || `HTTP ${res.status}`;
  setStatus("error", `Cannot wake the desktop: ${detail}`);
}

// --- the connection ----------------------------------------------------------------------

async function connect() {
  const gen = generation;
  setStatus("connecting", "Connecting…");
  let RFB;
  try {
    RFB = (await rfbModule).default;
  } catch (err) {
    return moduleFailed(err);
  }
  if (gen !== generation) return;
  sessionStorage.removeItem(RELOADS_KEY);

  // Our own socket, handed to noVNC, so the close code and reason can be read.
  const socket = new WebSocket(config.ws_url, ["binary"]);
  let closed = null;
  socket.addEventListener("close", (e) => {
    closed = { code: e.code, reason: e.reason };
  });

  const client = new RFB(screenEl, socket, { credentials: { password: config.password } });
  rfb = client;
  applyFit(client);
  client.focusOnClick = true;
  clipboard.attach(client);

  let goodTimer = null;
  let watchTimer = null;
  let securityFailure = null;
  client.addEventListener("credentialsrequired", () => client.sendCredentials({ password: config.password }));
  client.addEventListener("securityfailure", (e) => {
    securityFailure = e.detail;
  });
  client.addEventListener("desktopname", (e) => {
    if (e.detail.name) document.title = `${e.detail.name} · StreamSpace`;
  });
  client.addEventListener("connect", () => {
    if (gen !== generation) return;
    viewer.connects += 1;
    viewer.closeCode = null;
    viewer.closeReason = "";
    setStatus("connected", "Connected.");
    client.focus();
    goodTimer = setTimeout(() => {
      backoff = BACKOFF_MIN_MS;
    }, GOOD_CONNECTION_MS);
    watchTimer = setInterval(() => watch(client, gen), WATCH_MS);
  });
  client.addEventListener("disconnect", () => {
    clearTimeout(goodTimer);
    clearInterval(watchTimer);
    if (rfb === client) rfb = null;
    if (gen !== generation) return; // a reconnect we asked for
    dropped(closed, securityFailure);
  });
}

// While connected, notice a session hibernated or ended elsewhere (the desktop's socket
// may stay open a while): drop the connection and follow the session (a hibernated one
// stays hibernated until the user wakes it).
async function watch(client, gen) {
  let res;
  try {
    res = await api(config.session_url);
  } catch {
    return; // the connection itself tells us if the link is gone
  }
  if (gen !== generation || rfb !== client || res.status !== 200) return;
  viewer.sessionState = res.body.state;
  showWarning(res.body.lifecycle_warning);
  if (!LEAVING_STATES.has(res.body.state)) return;
  generation += 1;
  clearTimeout(timer);
  rfb = null;
  client.disconnect();
  act(res.body.state, res.body.error_message, res.body.lifecycle_reason);
}

// A module that failed to load stays failed in this document: reload the page, a few times.
function moduleFailed(err) {
  const reloads = Number(sessionStorage.getItem(RELOADS_KEY) || 0);
  if (reloads >= MAX_RELOADS) {
    sessionStorage.removeItem(RELOADS_KEY);
    return setStatus("error", `Could not load the viewer (noVNC): ${err.message}`, {
      href: window.location.href,
      text: "Reload",
    });
  }
  sessionStorage.setItem(RELOADS_KEY, String(reloads + 1));
  const delay = BACKOFF_MIN_MS * 2 ** (reloads + 1);
  setStatus("disconnected", `Could not load the viewer (noVNC). Reloading in ${seconds(delay)}…`);
  setTimeout(() => window.location.reload(), delay);
}

function dropped(closed, securityFailure) {
  const code = closed ? closed.code : null;
  const reason = closed && closed.reason ? closed.reason : "";
  viewer.closeCode = code;
  viewer.closeReason = reason;
  if (securityFailure) {
    const why = securityFailure.reason || "authentication failed";
    return setStatus("error", `The desktop refused the connection: ${why}.`);
  }
  if (code === 4401) return loginAgain();
  if (code === 4404) return setStatus("error", "No such session (it ended, or it is not yours).");
  const delay = nextBackoff();
  const retry = `Reconnecting in ${seconds(delay)}…`;
  const because = reason ? ` (${reason})` : "";
  let text;
  switch (code) {
    case 4503:
      text = `The desktop is not available${because}. ${retry}`;
      break;
    case 4001:
      text = `The desktop went away${because}. ${retry}`;
      break;
    case 4413:
      text = `Too much data for the connection${because}. ${retry}`;
      break;
    default:
      text = `Connection lost${code ? ` (code ${code}${reason ? `: ${reason}` : ""})` : ""}. ${retry}`;
  }
  setStatus("disconnected", text);
  later(delay, settle);
}

// The Wake button, shown while the session is hibernated.
function wakeNow() {
  generation += 1;
  clearTimeout(timer);
  backoff = BACKOFF_MIN_MS;
  wake();
}

function reconnectNow() {
  generation += 1;
  clearTimeout(timer);
  backoff = BACKOFF_MIN_MS;
  if (rfb) {
    const old = rfb;
    rfb = null;
    old.disconnect();
  }
  settle();
}

// --- controls ----------------------------------------------------------------------------

// Resize: the desktop takes the screen area's size (noVNC debounces window resizes).
// Scale: the desktop keeps its size and is scaled to fit. Both scale a desktop that
// refused a size.
function showFit() {
  const resize = viewer.fit === "resize";
  fitButton.textContent = resize ? "Scale instead" : "Fit to window";
  fitButton.title = resize ? "Keep the desktop's size and scale it to the window" : "Resize the desktop to the window";
}

function applyFit(client) {
  client.scaleViewport = true;
  client.resizeSession = viewer.fit === "resize";
  showFit();
}

function toggleFit() {
  viewer.fit = viewer.fit === "resize" ? "scale" : "resize";
  localStorage.setItem(FIT_KEY, viewer.fit);
  showFit();
  if (rfb) {
    applyFit(rfb);
    rfb.focus();
  }
}

function toggleFullscreen() {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else if (screenWrap.requestFullscreen) {
    screenWrap.requestFullscreen().catch(() => {});
  }
  if (rfb) rfb.focus();
}

const SHORTCUTS = { KeyF: toggleFullscreen, KeyR: reconnectNow };
const swallowed = new Set();

// Capture phase, before noVNC's handlers on the canvas see the key.
window.addEventListener(
  "keydown",
  (e) => {
    if (!(e.ctrlKey && e.altKey && e.shiftKey && SHORTCUTS[e.code])) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    swallowed.add(e.code);
    if (!e.repeat) SHORTCUTS[e.code]();
  },
  true,
);
window.addEventListener(
  "keyup",
  (e) => {
    if (!swallowed.delete(e.code)) return;
    e.preventDefault();
    e.stopImmediatePropagation();
  },
  true,
);

document.getElementById("viewer-fullscreen").addEventListener("click", toggleFullscreen);
fitButton.addEventListener("click", toggleFit);
showFit();
document.getElementById("viewer-reconnect").addEventListener("click", reconnectNow);
wakeButton.addEventListener("click", wakeNow);
stayButton.addEventListener("click", stay);
document.getElementById("viewer-ctrl-alt-del").addEventListener("click", () => {
  if (rfb) {
    rfb.sendCtrlAltDel();
    rfb.focus();
  }
});

act(config.state, config.error_message, config.lifecycle_reason);
