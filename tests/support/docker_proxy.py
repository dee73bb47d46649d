"""A unix-socket proxy in front of the Docker engine's socket that a test can cut.

An agent started with ``DOCKER_HOST=unix://<proxy.path>`` talks to the real engine through
it. ``cut()`` closes every connection at once and refuses new ones (accepted, then closed
at once: the client sees the engine vanish) until ``restore()``. ``cut_on(marker)`` cuts
the moment a request containing ``marker`` (e.g. ``b"/containers/create"``) is seen,
before it reaches the engine: an engine lost at an exact point of a create.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from pathlib import Path

DEFAULT_UPSTREAM = "/var/run/docker.sock"


class DockerSocketProxy:
    def __init__(self, upstream: str | None = None):
        host = os.environ.get("DOCKER_HOST", "")
        self.upstream = upstream or (host.removeprefix("unix://") if host.startswith("unix://") else DEFAULT_UPSTREAM)
        self._dir = tempfile.mkdtemp(prefix="ss-docker-proxy-")
        self.path = str(Path(self._dir) / "docker.sock")
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._cut = False
        self._marker: bytes | None = None
        self.cut_happened = threading.Event()
        self._server: socket.socket | None = None
        self._closed = False

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> DockerSocketProxy:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(128)
        threading.Thread(target=self._accept_loop, name="docker-proxy-accept", daemon=True).start()
        return self

    def cut_on(self, marker: bytes) -> None:
        """Cut when a request containing ``marker`` arrives (that request never reaches the engine)."""
        self.cut_happened.clear()
        with self._lock:
            self._marker = marker

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._marker = None
            conns, self._conns = self._conns, set()
        for sock in conns:
            _close(sock)
        self.cut_happened.set()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        if self._server is not None:
            _close(self._server)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    # --- internals ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                _close(client)
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                _close(client)
                _close(upstream)
                continue
            with self._lock:
                if self._cut:
                    _close(client)
                    _close(upstream)
                    continue
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    cut, marker = self._cut, self._marker
                if cut:
                    return  # cut while this connection was still being closed: nothing more passes
                if from_client and marker is not None and marker in data:
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._conns.discard(sock)
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
