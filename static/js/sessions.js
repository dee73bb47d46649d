// "My sessions" refreshes itself: poll the sessions API (quickly while something is
// changing, slowly otherwise); when a session of ours changed, swap in the rows the
// server renders and announce the change. A flash message about one session (e.g.
// "Hibernating Desktop.") goes once that session is in another state. Without this
// script the forms still work.
(function () {
  "use strict";

  const FAST_MS = 1500;
  const SLOW_MS = 10000;

  const configEl = document.getElementById("portal-config");
  const tbody = document.getElementById("session-rows");
  const announcer = document.getElementById("session-announcer");
  if (!configEl || !tbody) return;
  const config = JSON.parse(configEl.textContent);
  const transitional = new Set(config.transitional_states);

  let timer = null;
  let busy = false;

  // id -> {state, agent, region, name} as the table shows it now.
  function shownRows() {
    const rows = new Map();
    for (const tr of tbody.querySelectorAll("tr[data-session-id]")) {
      rows.set(tr.dataset.sessionId, {
        state: tr.dataset.state,
        agent: tr.dataset.agent,
        region: tr.dataset.region,
        name: tr.dataset.templateName,
      });
    }
    return rows;
  }

  // The API lists everything the user may see (staff: everyone's); the portal shows our own, live ones.
  function wantedRows(sessions) {
    const rows = new Map();
    for (const s of sessions) {
      if (s.owner !== config.username || s.state === "terminated") continue;
      rows.set(String(s.id), { state: s.state, agent: s.agent_id || "", region: s.region || "" });
    }
    return rows;
  }

  function differs(shown, wanted) {
    if (shown.size !== wanted.size) return true;
    for (const [id, w] of wanted) {
      const s = shown.get(id);
      if (!s || s.state !== w.state || s.agent !== w.agent || s.region !== w.region) return true;
    }
    return false;
  }

  function label(state) {
    return state.charAt(0).toUpperCase() + state.slice(1);
  }

  function announce(before, sessions) {
    const messages = [];
    const byId = new Map(sessions.map((s) => [String(s.id), s]));
    const after = shownRows();
    for (const [id, row] of after) {
      const old = before.get(id);
      if (!old) messages.push(`${row.name}: new session, ${label(row.state)}.`);
      else if (old.state !== row.state) messages.push(`${row.name}: ${label(row.state)}.`);
    }
    for (const [id, old] of before) {
      if (after.has(id)) continue;
      const gone = byId.get(id);
      messages.push(`${old.name}: ${label(gone ? gone.state : "removed")}.`);
    }
    if (messages.length) announcer.textContent = messages.join(" ");
  }

  // Keep keyboard focus on the same button when the rows are replaced.
  function focusKey() {
    const el = document.activeElement;
    if (!el || !tbody.contains(el)) return null;
    const tr = el.closest("tr[data-session-id]");
    return tr && el.dataset.action ? [tr.dataset.sessionId, el.dataset.action] : null;
  }

  function restoreFocus(key) {
    if (!key) return;
    const tr = tbody.querySelector(`tr[data-session-id="${CSS.escape(key[0])}"]`);
    const el = tr && tr.querySelector(`[data-action="${CSS.escape(key[1])}"]`);
    if (el) el.focus();
  }

  // A message names its session and the state it describes (data-session-id,
  // data-session-state): it is stale once the row shows another state, or is gone.
  function dropStaleMessages() {
    for (const li of document.querySelectorAll(".messages .message[data-session-id]")) {
      const tr = tbody.querySelector(`tr[data-session-id="${CSS.escape(li.dataset.sessionId)}"]`);
      if (!tr || tr.dataset.state !== li.dataset.sessionState) li.remove();
    }
    for (const list of document.querySelectorAll(".messages")) {
      if (!list.children.length) list.remove();
    }
  }

  async function refreshRows(sessions) {
    const response = await fetch(config.rows_url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!response.ok || response.redirected) throw new Error(`rows: HTTP ${response.status}, or logged out`);
    const html = await response.text();
    const before = shownRows();
    const key = focusKey();
    const holder = document.createElement("template");
    holder.innerHTML = html;
    tbody.replaceChildren(holder.content);
    restoreFocus(key);
    announce(before, sessions);
    dropStaleMessages();
  }

  function anyTransitional() {
    for (const row of shownRows().values()) if (transitional.has(row.state)) return true;
    return false;
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  async function poll() {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(config.api_sessions_url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.status === 401 || response.status === 403) {
        // Logged out elsewhere: the next reload goes to the login page. Stop polling.
        busy = false;
        return;
      }
      if (!response.ok) throw new Error(`sessions: HTTP ${response.status}`);
      const sessions = await response.json();
      if (differs(shownRows(), wantedRows(sessions))) await refreshRows(sessions);
    } catch (err) {
      console.warn("StreamSpace: could not refresh the session list", err);
    }
    busy = false;
    schedule(anyTransitional() && !document.hidden ? FAST_MS : SLOW_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(0);
  });

  dropStaleMessages();
  schedule(anyTransitional() ? FAST_MS : SLOW_MS);
})();
