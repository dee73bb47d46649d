"""Files from the viewer in a real browser: Chromium (Playwright) on Daphne B, the Docker
agent on Daphne A (every byte crosses Redis), a real desktop container.

A 20 MB file built in the page is dropped on the desktop with a real ``drop`` event
(a DataTransfer made in the page) and must arrive in ~/Uploads with the same SHA-256;
a file put in ~/Downloads inside the container is downloaded from the Files panel with
one click and must have the same SHA-256 as in the container."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent_clients.backends.docker import container_name
from tests.browser.test_viewer_e2e import VIEWER_CONNECTED, login, wait_row_state
from tests.live import wait_for
from vnc_app.models import FileTransfer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

ALICE_PASSWORD = "alice-password-1"
SIZE = 20 * 1024 * 1024

# Builds a 20 MB file in the page, drops it on the desktop's canvas, returns its SHA-256.
DROP_FILE = """async (size) => {
  const bytes = new Uint8Array(size);
  let x = 2463534242;
  for (let i = 0; i < size; i++) { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; bytes[i] = x & 255; }
  const file = new File([bytes], 'dropped file.bin', { type: 'application/octet-stream' });
  const dt = new DataTransfer();
  dt.items.add(file);
  const target = document.querySelector('#screen canvas') || document.getElementById('screen');
  for (const type of ['dragenter', 'dragover', 'drop']) {
    target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}"""


def in_desktop(docker_client, session_id: str, script: str) -> str:
    code, out = docker_client.containers.get(container_name(session_id)).exec_run(["sh", "-c", script])
    assert code == 0, f"{script!r} failed ({code}): {out!r}"
    return out.decode()


def test_drop_a_file_on_the_viewer_and_download_one_from_the_panel(
    control_plane, control_plane_b, docker_agent, docker_client, desktop_template, alice, new_context
):
    base = control_plane_b.http_url
    page = new_context("alice").new_page()
    login(page, base, "alice", ALICE_PASSWORD)
    page.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    session_id = page.locator("tr[data-session-id]").get_attribute("data-session-id")
    wait_row_state(page, session_id, "running", 60)
    page.goto(f"{base}/vnc-viewer/{session_id}")
    page.wait_for_function(VIEWER_CONNECTED, timeout=30_000)

    digest = page.evaluate(DROP_FILE, SIZE)
    page.wait_for_function(
        "() => window.streamspaceFiles.uploads.length === 1"
        " && window.streamspaceFiles.uploads[0].state !== 'uploading'",
        timeout=90_000,
    )
    upload = page.evaluate("() => window.streamspaceFiles.uploads[0]")
    assert upload["state"] == "done", upload
    assert page.locator("#files-uploads progress").evaluate("p => p.value === p.max")
    in_home = in_desktop(docker_client, session_id, "sha256sum '/home/user/Uploads/dropped file.bin'").split()[0]
    assert in_home == digest

    in_desktop(docker_client, session_id, "mkdir -p ~/Downloads; head -c 3000000 /dev/urandom >~/Downloads/report.bin")
    expected = in_desktop(docker_client, session_id, "sha256sum ~/Downloads/report.bin").split()[0]
    page.locator("#files-refresh").click()
    link = page.locator("#files-downloads").get_by_role("link", name="report.bin")
    with page.expect_download() as download:
        link.click()
    saved = Path(download.value.path())
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == expected
    assert download.value.suggested_filename == "report.bin"

    def audit():
        return list(FileTransfer.objects.order_by("started_at").values_list("direction", "path", "bytes", "outcome"))

    expected_rows = [
        ("upload", "Uploads/dropped file.bin", SIZE, "ok"),
        ("download", "Downloads/report.bin", 3000000, "ok"),
    ]
    # The row is finished just after the last byte went out: wait for it, bounded.
    wait_for(lambda: audit() == expected_rows, 10, 0.1, what=f"the audit rows {expected_rows}")
