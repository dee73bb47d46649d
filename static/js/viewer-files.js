// Files in and out of the session, beside the viewer: drop files anywhere on the viewer
// (or pick them) to upload them into ~/Uploads with a progress bar each, and download
// what is in ~/Downloads with one click. It uses the REST API
// (/api/v1/sessions/<id>/files...) with the login cookie and the CSRF token, like the
// rest of the viewer. State for tests: window.streamspaceFiles.

const config = JSON.parse(document.getElementById("viewer-config").textContent);
const base = `/api/v1/sessions/${encodeURIComponent(config.session_id)}/files`;
const UPLOAD_DIR = "Uploads";
const DOWNLOAD_DIR = "Downloads";

const files = { uploads: [], downloads: [], listed: 0, error: "" };
window.streamspaceFiles = files;

const style = document.createElement("link");
style.rel = "stylesheet";
style.href = new URL("../css/viewer-files.css", import.meta.url).href;
document.head.append(style);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : config.csrf_token;
}

function fileUrl(path) {
  return `${base}/${path.split("/").map(encodeURIComponent).join("/")}`;
}

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 / 1024 / 1024).toFixed(2)} GB`;
}

// --- the panel ---------------------------------------------------------------------------

const toggle = el("button", { type: "button", id: "viewer-files", "aria-expanded": "false",
  "aria-controls": "files-panel" }, "Files");
document.querySelector(".viewer-bar .tools")?.prepend(toggle);

const picker = el("input", { type: "file", multiple: true, id: "files-picker", class: "files-picker" });
const uploadList = el("ul", { class: "files-uploads", id: "files-uploads", "aria-live": "polite" });
const downloadList = el("ul", { class: "files-downloads", id: "files-downloads" });
const downloadNote = el("p", { class: "muted", id: "files-downloads-note" }, "Loading…");
const refresh = el("button", { type: "button", id: "files-refresh" }, "Refresh");
const panel = el("aside", { id: "files-panel", class: "files-panel", hidden: true, "aria-label": "Files" },
  el("h2", {}, "Files"),
  el("p", {}, "Drop files on the desktop to upload them to ~/", UPLOAD_DIR, ", or ",
    el("label", { htmlFor: "files-picker", class: "button" }, "choose files…"), picker),
  uploadList,
  el("h3", {}, "~/", DOWNLOAD_DIR, " ", refresh),
  downloadNote,
  downloadList);
const dropHint = el("div", { class: "files-drop", id: "files-drop", hidden: true }, "Drop to upload to ~/" + UPLOAD_DIR);
document.body.append(panel, dropHint);

function showPanel(open) {
  panel.hidden = !open;
  toggle.setAttribute("aria-expanded", String(open));
  if (open) listDownloads();
}
toggle.addEventListener("click", () => showPanel(panel.hidden));
refresh.addEventListener("click", () => listDownloads());

// --- uploads -----------------------------------------------------------------------------

function upload(file) {
  const entry = { name: file.name, total: file.size, loaded: 0, state: "uploading", detail: "" };
  files.uploads.push(entry);
  const bar = el("progress", { max: Math.max(file.size, 1), value: 0 });
  const text = el("span", { class: "files-state" }, "uploading…");
  uploadList.append(el("li", {}, el("span", { class: "files-name" }, file.name), " ", bar, " ", text));
  showPanel(true);

  const xhr = new XMLHttpRequest();
  xhr.open("PUT", fileUrl(`${UPLOAD_DIR}/${file.name}`));
  xhr.setRequestHeader("X-CSRFToken", csrfToken());
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.setRequestHeader("Accept", "application/json");
  xhr.upload.addEventListener("progress", (e) => {
    entry.loaded = e.loaded;
    bar.value = e.loaded;
    text.textContent = `${size(e.loaded)} of ${size(entry.total)}`;
  });
  const done = (state, detail) => {
    entry.state = state;
    entry.detail = detail;
    text.textContent = detail;
    if (state === "done") bar.value = bar.max;
  };
  xhr.addEventListener("load", () => {
    let body = {};
    try {
      body = JSON.parse(xhr.responseText);
    } catch {
      // not JSON: the status says enough
    }
    if (xhr.status === 201) done("done", `in ~/${body.path || UPLOAD_DIR}`);
    else done("failed", `failed: ${body.detail || xhr.status}`);
  });
  xhr.addEventListener("error", () => done("failed", "failed: the connection broke"));
  xhr.send(file);
}

picker.addEventListener("change", () => {
  for (const file of picker.files) upload(file);
  picker.value = "";
});

// Drag and drop anywhere on the viewer (the desktop's canvas included).
let dragDepth = 0;
const carriesFiles = (e) => Array.from(e.dataTransfer?.types || []).includes("Files");
window.addEventListener("dragenter", (e) => {
  if (!carriesFiles(e)) return;
  dragDepth += 1;
  dropHint.hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) dropHint.hidden = true;
});
window.addEventListener("dragover", (e) => {
  if (carriesFiles(e)) e.preventDefault();
});
window.addEventListener("drop", (e) => {
  if (!e.dataTransfer?.files?.length) return;
  e.preventDefault();
  dragDepth = 0;
  dropHint.hidden = true;
  for (const file of e.dataTransfer.files) upload(file);
});

// --- downloads ---------------------------------------------------------------------------

async function listDownloads() {
  let response;
  let body = {};
  try {
    response = await fetch(`${base}?path=${encodeURIComponent(DOWNLOAD_DIR)}`, {
      headers: { Accept: "application/json" }, credentials: "same-origin" });
    body = await response.json();
  } catch {
    body = { detail: "the control plane did not answer" };
  }
  files.listed += 1;
  downloadList.replaceChildren();
  if (!response || !response.ok) {
    files.error = body.detail || `error ${response && response.status}`;
    downloadNote.textContent = `Cannot list ~/${DOWNLOAD_DIR}: ${files.error}`;
    return;
  }
  files.error = "";
  const entries = body.entries.filter((e) => e.type === "file");
  files.downloads = entries.map((e) => e.name);
  downloadNote.textContent = entries.length ? "" : `Nothing in ~/${DOWNLOAD_DIR} yet: save files there in the desktop.`;
  for (const entry of entries) {
    const link = el("a", { href: fileUrl(`${DOWNLOAD_DIR}/${entry.name}`), download: entry.name }, entry.name);
    downloadList.append(el("li", {}, link, " ", el("span", { class: "muted" }, size(entry.size))));
  }
}
