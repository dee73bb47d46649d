// The viewer's clipboard, both ways, over noVNC's (extended, UTF-8) clipboard.
//
// Desktop -> browser: noVNC's "clipboard" event; the text goes into the browser's
// clipboard when the page may write it (navigator.clipboard.writeText: Chromium allows it
// while the page has focus) and always into the panel's text box.
// Browser -> desktop: when the page may read the clipboard without asking (the
// "clipboard-read" permission is granted), it is read whenever the page gets focus back
// and sent if it changed; everywhere else, through the panel: paste into the box, Send.
//
// config.clipboard holds the template's rules (sessions_app.clipboard): a direction that
// is off has no UI here, and the limits are checked before sending. The relay and Xvnc
// enforce the same rules themselves (vnc_app/rfb.py); this only spares a useless send.
// What happened is kept in window.streamspaceViewer.clipboard for tests.

const encoder = new TextEncoder();
const CAPS_WAIT_MS = 2000;
const bytes = (text) => encoder.encode(text).length;

export function setupClipboard(config, viewer, getRfb) {
  const rules = config.clipboard || { to_desktop: true, to_browser: true };
  const button = document.getElementById("viewer-clipboard");
  const panel = document.getElementById("viewer-clipboard-panel");
  const box = document.getElementById("viewer-clipboard-text");
  const send = document.getElementById("viewer-clipboard-send");
  const note = document.getElementById("viewer-clipboard-note");
  const state = { fromDesktop: null, written: null, sent: null, error: "" };
  viewer.clipboard = state;
  if (!rules.to_desktop && !rules.to_browser) return { attach() {} };
  // The RFB client once its handshake is done: noVNC drops a paste before that
  // (clipboardPasteFrom returns unless connected), so nothing counts as sent until then.
  let live = null;

  button.hidden = false;
  send.hidden = !rules.to_desktop;
  box.readOnly = !rules.to_desktop;
  box.placeholder = rules.to_desktop
    ? "Paste text here, then Send to the desktop." + (rules.to_browser ? " Text copied in the desktop shows here." : "")
    : "Text copied in the desktop shows here.";
  button.addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    button.setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) box.focus();
  });

  function tell(text) {
    note.textContent = text;
  }

  // --- browser -> desktop -----------------------------------------------------------------

  function sendText(text, how) {
    const rfb = getRfb();
    if (!rfb || rfb !== live || !rules.to_desktop || text === state.sent || text === state.fromDesktop) return false;
    if (bytes(text) > rules.max_to_desktop) {
      state.error = "too long";
      tell(`Not sent: ${bytes(text)} bytes; this desktop takes at most ${rules.max_to_desktop}.`);
      return false;
    }
    rfb.clipboardPasteFrom(text);
    state.sent = text;
    state.error = "";
    tell(`Sent ${bytes(text)} bytes to the desktop${how}.`);
    return true;
  }

  send.addEventListener("click", () => {
    state.sent = null; // Send always sends, even the same text again
    if (sendText(box.value, "") && getRfb()) getRfb().focus();
  });

  async function mayRead() {
    if (!navigator.clipboard || !navigator.clipboard.readText || !navigator.permissions) return false;
    try {
      return (await navigator.permissions.query({ name: "clipboard-read" })).state === "granted";
    } catch {
      return false; // a browser without that permission name (Firefox, Safari): the panel only
    }
  }

  async function readBrowserClipboard() {
    if (!rules.to_desktop || !getRfb() || !document.hasFocus() || !(await mayRead())) return;
    try {
      sendText(await navigator.clipboard.readText(), " from the browser's clipboard");
    } catch {
      // not focused any more, or refused: the panel still works
    }
  }

  // --- desktop -> browser -----------------------------------------------------------------

  async function fromDesktop(e) {
    const text = e.detail.text;
    if (!rules.to_browser || bytes(text) > rules.max_to_browser) return;
    state.fromDesktop = text;
    state.sent = text; // the browser clipboard now holds it: do not send it back
    box.value = text;
    try {
      await navigator.clipboard.writeText(text);
      state.written = text;
      tell(`Copied ${bytes(text)} bytes from the desktop to the browser's clipboard.`);
    } catch {
      tell("Copied in the desktop: the browser did not let this page write its clipboard; copy it from here.");
    }
  }

  if (rules.to_desktop) {
    window.addEventListener("focus", readBrowserClipboard);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") readBrowserClipboard();
    });
  }

  return {
    // A new RFB client (called right after new RFB, before its handshake).
    attach(client) {
      client.addEventListener("clipboard", fromDesktop);
      client.addEventListener("connect", async () => {
        live = client;
        state.sent = null; // a new desktop connection: the desktop's clipboard may differ
        // Xvnc's extended clipboard Caps come one round trip after the handshake; a paste
        // before them goes the legacy way, in Latin-1. Wait for them (noVNC 1.7 keeps them
        // in _clipboardServerCapabilitiesFormats), at most CAPS_WAIT_MS.
        for (let waited = 0; waited < CAPS_WAIT_MS && live === client; waited += 50) {
          if ((client._clipboardServerCapabilitiesFormats || {})[1]) break;
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        if (live === client) readBrowserClipboard();
      });
      client.addEventListener("disconnect", () => {
        if (live === client) live = null;
      });
    },
  };
}
