"""The platform's container images for tests: built by the project's own pipeline
(scripts/build_images.sh: cached by a hash of the inputs, so this is a no-op when the
image of this checkout exists; its progress shows on the terminal while it builds), and
containers of them started and timed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_images.sh"
PREFIX = "ssimg-test-"  # every container these tests start is named so
# A test's timeout covers its fixtures, and a cold build of an image (the shared base and
# its packages, on 2 busy cores) can take minutes; the build itself is bounded below.
BUILD_TIMEOUT = 1500


def image_ref(name: str) -> str:
    done = subprocess.run(["bash", str(SCRIPT), "--tag", name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ensure_image(name: str, pytestconfig) -> str:
    """``streamspace/<name>:<hash>``, built first when missing (the build prints its steps
    live, outside pytest's capture: a cold build takes a minute or more)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        returncode = run_build([name], BUILD_TIMEOUT - 300)
    if returncode != 0:
        pytest.fail(f"scripts/build_images.sh {name} failed (exit {returncode})")
    return image_ref(name)


def run_build(args: list[str], timeout: float) -> int:
    """The build in a process group of its own; past ``timeout`` the whole group gets SIGTERM
    (the script's trap unmounts and removes its work directory), SIGKILL 30 s later."""
    proc = subprocess.Popen(["bash", str(SCRIPT), *args], start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"scripts/build_images.sh {' '.join(args)} took over {timeout:.0f}s: stopped")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, a test timeout): stop the build too
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def wait_health(container, timeout: float) -> str:
    """Docker's own health state of ``container`` once it is no longer "starting"."""
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        state = container.attrs["State"]
        health = state.get("Health", {}).get("Status", "none")
        if health != "starting" or not state["Running"] or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def process_uids(container) -> set[str]:
    """The real uids of the container's processes, as the host's kernel sees them."""
    top = container.top(ps_args="-o pid,uid,comm")
    column = top["Titles"].index("UID")
    return {row[column] for row in top["Processes"]}
