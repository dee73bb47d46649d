"""File transfer through the control plane, beside ``docker cp`` of the same file.

Starts a throwaway PostgreSQL database, one Daphne process (production settings, the
Redis channel layer) and a real Docker agent process connected to it, and a desktop
session. Then, for a 200 MB file of random bytes (BENCH_FILE_MB to change):

* upload: ``PUT /api/v1/sessions/<id>/files/Uploads/bench.bin`` (raw body, streamed from
  disk) until its 201, and the SHA-256 in the container checked;
* download: ``GET .../files/Uploads/bench.bin`` read to the end (hashed, checked);
* ``docker cp`` of the same file into and out of the same container, timed the same way;
* the Daphne process's resident memory (VmRSS) sampled every 20 ms during each transfer:
  ``rss_growth_MB`` is the peak above what it held just before.

Figures: upload_MBps, download_MBps, docker_cp_upload_MBps, docker_cp_download_MBps,
ratio_vs_docker_cp (the worse of upload and download against docker cp; target >= 0.5),
rss_growth_MB (target <= 64). Everything made is removed at the end, and the database dropped.

Run: .venv/bin/python benchmarks/file_transfer.py     Progress on stderr; the last line is one JSON object.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from _support import bench_rows, drop_database, emit, fresh_database, production_env, progress, setup_django

IMAGE = os.environ.get("BENCH_IMAGE", "streamspace/desktop:bookworm-3")
SIZE_MB = int(os.environ.get("BENCH_FILE_MB", "200"))
DB_NAME = "streamspace_bench_file_transfer"
TARGET_RATIO = 0.5
TARGET_RSS_MB = 64
BLOCK = 1024 * 1024


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssPeak:
    """Samples a process's VmRSS every 20 ms while in the block: the peak above the start."""

    def __init__(self, pid: int):
        self.pid, self.base, self.peak, self.stop = pid, rss_mb(pid), 0.0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def growth(self) -> float:
        return max(0.0, self.peak - self.base)


def connection(http_url: str) -> http.client.HTTPConnection:
    host, port = http_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=120, blocksize=BLOCK)


def call(http_url: str, jwt: str, method: str, path: str, body=None) -> tuple[int, dict]:
    conn = connection(http_url)
    headers = {"Authorization": f"Bearer {jwt}", "Content-Type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, (json.loads(raw) if raw else {})


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def main() -> int:
    progress(f"preparing database {DB_NAME} ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    jwt, agent_id, token = bench_rows(image=IMAGE, cpu=1.0, memory_mb=512)

    from benchmarks.session_start import remove_managed, wait_online, wait_row
    from tests.live import ControlPlane, agent_process

    cp = ControlPlane("bench-files-daphne", DATABASE_URL=url, AGENT_HEARTBEAT_INTERVAL="10", **production)
    agent = None
    work = tempfile.mkdtemp(prefix="ss-bench-files-")
    source, back = os.path.join(work, "bench.bin"), os.path.join(work, "back.bin")
    figures: dict = {}
    try:
        progress(f"writing {SIZE_MB} MB of random bytes ...")
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            for _ in range(SIZE_MB):
                block = os.urandom(BLOCK)
                digest.update(block)
                f.write(block)
        expected = digest.hexdigest()
        size = SIZE_MB * BLOCK

        cp.start()
        agent = agent_process(cp, agent_id, token, module="agent_clients.docker_agent", heartbeat=10).start()
        wait_online(agent_id, agent)
        status, body = call(cp.http_url, jwt, "POST", "/api/v1/sessions", {"template": "desktop"})
        if status != 201:
            raise RuntimeError(f"POST /api/v1/sessions answered {status}: {body}")
        sid = body["id"]
        wait_row(sid, "running")
        container = f"ss-{sid}"
        pid = cp.proc.pid

        progress("upload through the control plane ...")
        with RssPeak(pid) as up_rss, open(source, "rb") as f:
            conn = connection(cp.http_url)
            started = time.perf_counter()
            conn.request("PUT", f"/api/v1/sessions/{sid}/files/Uploads/bench.bin", body=f,
                         headers={"Authorization": f"Bearer {jwt}", "Content-Length": str(size)})  # fmt: skip
            r = conn.getresponse()
            answer = r.read()
            up_s = time.perf_counter() - started
            conn.close()
        if r.status != 201:
            raise RuntimeError(f"upload answered {r.status}: {answer[:300]!r}")
        got = docker("exec", container, "sha256sum", "/home/user/Uploads/bench.bin").split()[0]
        if got != expected:
            raise RuntimeError("the uploaded file differs from the source")

        progress("download through the control plane ...")
        with RssPeak(pid) as down_rss:
            conn = connection(cp.http_url)
            started = time.perf_counter()
            conn.request("GET", f"/api/v1/sessions/{sid}/files/Uploads/bench.bin",
                         headers={"Authorization": f"Bearer {jwt}"})  # fmt: skip
            r = conn.getresponse()
            h = hashlib.sha256()
            while chunk := r.read(BLOCK):
                h.update(chunk)
            down_s = time.perf_counter() - started
            conn.close()
        if r.status != 200 or h.hexdigest() != expected:
            raise RuntimeError(f"download answered {r.status}, or its bytes differ")

        progress("docker cp in and out ...")
        started = time.perf_counter()
        docker("cp", source, f"{container}:/home/user/Uploads/cp.bin")
        cp_up_s = time.perf_counter() - started
        started = time.perf_counter()
        docker("cp", f"{container}:/home/user/Uploads/bench.bin", back)
        cp_down_s = time.perf_counter() - started

        mb = size / 1e6
        figures = {
            "file_MB": round(mb, 1),
            "upload_MBps": mb / up_s,
            "download_MBps": mb / down_s,
            "docker_cp_upload_MBps": mb / cp_up_s,
            "docker_cp_download_MBps": mb / cp_down_s,
            "upload_ratio_vs_docker_cp": cp_up_s / up_s,
            "download_ratio_vs_docker_cp": cp_down_s / down_s,
            "ratio_vs_docker_cp": min(cp_up_s / up_s, cp_down_s / down_s),
            "rss_growth_MB": max(up_rss.growth, down_rss.growth),
            "rss_growth_upload_MB": up_rss.growth,
            "rss_growth_download_MB": down_rss.growth,
            "daphne_rss_before_MB": up_rss.base,
        }
        figures["ratio_target_met"] = figures["ratio_vs_docker_cp"] >= TARGET_RATIO
        figures["rss_target_met"] = figures["rss_growth_MB"] <= TARGET_RSS_MB
        call(cp.http_url, jwt, "DELETE", f"/api/v1/sessions/{sid}")
        wait_row(sid, "terminated")
    finally:
        if agent is not None:
            agent.stop(15)
        cp.stop()
        from django.db import connections

        connections.close_all()
        removed = remove_managed([agent_id])
        if removed:
            progress(f"removed leftovers: {', '.join(removed)}")
        for path in (source, back):
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(work)
        drop_database(DB_NAME)
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
