// The staff dashboard refreshes its cards and agents table by itself: every 10 s it
// fetches the same part of the page rendered by the server (#live's data-live-url) and
// swaps it in. It pauses while the tab is hidden and refreshes at once when it is shown
// again. Without this script the page is the same, only reload it to see changes.
(function () {
  "use strict";

  const EVERY_MS = 10000;
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!live) return;

  let timer = null;
  let busy = false;

  function schedule(ms) {
    clearTimeout(timer);
    timer = null;
    if (document.visibilityState === "visible") timer = setTimeout(refresh, ms);
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(live.dataset.liveUrl, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.redirected || response.status === 401 || response.status === 403) {
        if (status) status.textContent = "Logged out: reload the page.";
        busy = false;
        return; // stop: the next reload goes to the login page
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const holder = document.createElement("template");
      holder.innerHTML = await response.text();
      live.replaceChildren(holder.content);
      live.dataset.refreshedAt = String(Date.now());
      if (status) status.textContent = `Refreshed at ${new Date().toLocaleTimeString()}; every 10 s while this tab is visible.`;
    } catch (err) {
      console.warn("StreamSpace: could not refresh the dashboard", err);
    }
    busy = false;
    schedule(EVERY_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") schedule(0);
    else schedule(EVERY_MS); // clears the timer: nothing runs while hidden
  });

  schedule(EVERY_MS);
})();
