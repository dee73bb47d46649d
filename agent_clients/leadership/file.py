"""Leader election for replicas on one host: ``fcntl.flock`` on one file.

The kernel drops a flock when its process dies, so a standby takes over within one retry
period of the leader's death; leadership is only lost by ``release`` (or if the lock
file is deleted or replaced under us, which would let another replica lock a new file).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from typing import Any

from agent_clients.leadership.base import Leadership
from agent_clients.runtime.deadlines import within

log = logging.getLogger(__name__)


class FileLeadership(Leadership):
    def __init__(self, path: str, *, identity: str = "", retry_period: float = 2.0) -> None:
        self.path = path
        self.identity = identity or f"pid-{os.getpid()}"
        self.retry_period = retry_period
        self._fd: int | None = None
        self._lost = asyncio.Event()

    @classmethod
    def from_config(cls, cfg: Any) -> FileLeadership:
        return cls(cfg.ha_lock_path, identity=cfg.identity, retry_period=cfg.ha_retry_period)

    def _try_lock(self) -> bool:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # The file may have been replaced between open and flock: then our lock guards nothing.
        if not self._same_file(fd):
            os.close(fd)
            return False
        with contextlib.suppress(OSError):  # who holds it, for operators; the lock is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.identity}\n".encode(), 0)
        self._fd = fd
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            mine, now = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    async def acquire(self) -> None:
        if self._fd is not None:
            return
        while True:
            try:
                if self._try_lock():
                    break
            except OSError as exc:
                log.warning("cannot lock %s: %s (retrying)", self.path, exc)
            await asyncio.sleep(self.retry_period)
        self._lost = asyncio.Event()
        log.info("leadership acquired: flock on %s", self.path)

    async def lost(self) -> None:
        # A flock only ends with our process or our release; watch for the file being
        # removed or replaced, which would let another replica lock a different file.
        while not self._lost.is_set():
            fd = self._fd
            if fd is not None and not self._same_file(fd):
                log.warning("lock file %s was removed or replaced: stepping down", self.path)
                self._drop()
                break
            with contextlib.suppress(TimeoutError):
                await within(self.retry_period, self._lost.wait())

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._lost.set()

    async def release(self) -> None:
        self._drop()

    @property
    def is_leader(self) -> bool:
        return self._fd is not None
