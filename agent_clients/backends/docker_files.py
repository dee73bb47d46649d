"""File transfers in a Docker desktop's home: execs that run AS THE DESKTOP'S USER.

The engine (root) never touches a path: every step is an exec with an explicit non-root
``user`` (the container's configured USER, numeric and not 0, else the transfer is
refused), so a symlink swapped in between the check and the transfer can only lead to
what the desktop's user could read or write anyway. The home is the session's home
volume's mount point (the ``streamspace.home`` label set at create, else the mount of the
session's home volume), never ``$HOME``.

Every path is first resolved inside the container (an exec of ``sh`` with coreutils'
``realpath``), and refused unless the resolved target lies in the home: ``..`` in a name
never gets here (``protocol.file_path_problem``), and a symlink anywhere on the way that
points out of the home is refused with 400 before a byte moves. Then:

* put: an exec of ``sh -c 'cat > "$1"'`` writes a temporary file ``.ss-upload-<random>``
  in the target folder, its stdin fed chunk by chunk from the tunnel through the exec's
  socket; an exec of ``mv -T`` (a rename in one folder) gives it its name. On any failure
  or abort the temporary file is removed (as the user, that exact name): nothing
  half-written ever carries the name.
* get: an exec of ``cat -- <resolved file>``, its stdout streamed (the engine's stream
  framing demultiplexed) and sent on as it comes; exactly the size checked is sent, or
  the transfer is aborted.
* list: an exec of ``find -maxdepth 1 -printf`` (NUL-separated, at most MAX_ENTRIES;
  ``.ss-upload-*`` temporary files are hidden).

Nothing holds a whole file: the tunnel's pipe holds at most 2 MiB each way.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from typing import Any

import docker
import requests

from agent_clients import protocol
from agent_clients.backends.base import BackendError
from agent_clients.runtime.files import FileError, FileStream

CHUNK = 1024 * 1024
SEND_BATCH = 256 * 1024  # a download's bytes go to the tunnel's pipe in pieces this size
MAX_ENTRIES = 1000
DEFAULT_DIRS = ("Uploads", "Downloads")  # made on demand (the desktop image makes them too)
LABEL_HOME = "streamspace.home"  # on containers: the session's home path (spec.home_path)
TEMP_PREFIX = ".ss-upload-"

# $1 = mode (list|get|put), $2 = path relative to the home ('' = the home itself), $3 = the home.
# Exit 40: refused (400), 44: not found (404); stdout's first NUL-ended field says why.
# Success: NUL-ended fields (list: the folder, then the entries; get: the file, its size;
# put: the folder).
RESOLVE = r"""
set -u
mode=$1 rel=$2
home=$(realpath -e -- "$3" 2>/dev/null) || { printf 'the home folder is missing\0'; exit 44; }
inside() { case "$1/" in "$home"/*) return 0;; esac; return 1; }
no() { printf '%s\0' "$2"; exit "$1"; }
target="$home${rel:+/$rel}"
if [ "$mode" = put ]; then
    dir=$(dirname -- "$target"); name=$(basename -- "$target")
else
    dir=$target
fi
for d in Uploads Downloads; do
    if [ "$dir" = "$home/$d" ] && [ ! -e "$dir" ] && [ ! -L "$dir" ]; then mkdir -- "$dir" 2>/dev/null; fi
done
if [ "$mode" = get ]; then
    real=$(realpath -e -- "$target" 2>/dev/null) || no 44 "no such file"
    inside "$real" && [ "$real" != "$home" ] || no 40 "the path leads out of the home folder"
    [ -f "$real" ] || no 40 "not a regular file"
    [ -r "$real" ] || no 40 "the file is not readable"
    printf '%s\0%s\0' "$real" "$(stat -c %s -- "$real")"; exit 0
fi
real=$(realpath -e -- "$dir" 2>/dev/null) || no 44 "no such folder"
inside "$real" || no 40 "the path leads out of the home folder"
[ -d "$real" ] || no 40 "not a folder"
if [ "$mode" = list ]; then
    printf '%s\0' "$real"
    find "$real" -mindepth 1 -maxdepth 1 ! -name 'TEMP*' -printf '%y\t%s\t%T@\t%f\0' 2>/dev/null | head -z -n MAX
    exit 0
fi
t="$real/$name"
if [ -L "$t" ]; then
    to=$(realpath -m -- "$t")
    inside "$to" || no 40 "the file is a link out of the home folder"
fi
[ -d "$t" ] && no 40 "a folder of that name exists"
[ -w "$real" ] || no 40 "the folder is not writable"
printf '%s\0' "$real"
""".replace("MAX", str(MAX_ENTRIES + 1)).replace("TEMP", TEMP_PREFIX)

# $1 = the temporary file: refuses to follow or replace anything already there (noclobber).
WRITE = 'set -C; umask 022; exec cat > "$1"'

_TYPES = {"f": "file", "d": "dir", "l": "link"}
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class Desktop:
    """One container seen by a transfer: its home and the non-root user every exec runs as."""

    def __init__(self, client: docker.DockerClient, container: Any, session_home: str | None = None):
        self.client, self.container = client, container
        self.api = client.api
        self.user = desktop_user(container)
        self.home = desktop_home(container, session_home)

    def exec(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        try:
            code, (out, err) = self.container.exec_run(argv, demux=True, user=self.user)
        except _ENGINE_ERRORS as exc:
            raise BackendError("could not run a command in the desktop", retryable=True, detail=str(exc)) from None
        return code, out or b"", err or b""

    def exec_create(self, argv: list[str], *, stdin: bool = False) -> str:
        return self.api.exec_create(self.container.id, argv, stdin=stdin, stdout=True, stderr=True, user=self.user)[
            "Id"
        ]

    def exit_code(self, exec_id: str, timeout: float = 10.0) -> int | None:
        """The exec's exit code once it has ended (the stream may close a moment earlier)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.api.exec_inspect(exec_id)
            if not info.get("Running") or time.monotonic() > deadline:
                return info.get("ExitCode")
            time.sleep(0.05)


def desktop_user(container: Any) -> str:
    """The container's configured USER when it is a numeric, non-zero uid (``uid`` or
    ``uid:gid``); anything else is refused: a transfer never runs as root."""
    configured = str(((container.attrs or {}).get("Config") or {}).get("User") or "").strip()
    uid, _, gid = configured.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise BackendError(
            f"the desktop image's USER is {configured or 'unset (root)'!r}: file transfers need a numeric, "
            "non-root uid (USER 1000:1000 in the image)",
            retryable=False,
        )
    if int(uid) == 0:
        raise BackendError("the desktop runs as root (uid 0): file transfers are refused", retryable=False)
    return configured


def desktop_home(container: Any, session_home: str | None) -> str:
    """The session's home path: the create-time label, else the given one."""
    home = ((container.labels or {}).get(LABEL_HOME) or session_home or "").strip()
    if not home.startswith("/") or home == "/":
        raise BackendError(f"the desktop's home path {home!r} is unknown", retryable=False)
    return home


def resolve(desktop: Desktop, mode: str, rel: str) -> list[bytes]:
    """The script's NUL-separated fields for a path that passed; FileError for a refused one."""
    code, out, err = desktop.exec(["sh", "-c", RESOLVE, "sh", mode, rel, desktop.home])
    if code == 0:
        return out.split(b"\0")
    why = out.split(b"\0", 1)[0].decode("utf-8", "replace") or err.decode("utf-8", "replace")[:200]
    if code == 40:
        raise FileError(400, "invalid", why)
    if code == 44:
        raise FileError(404, "not_found", why)
    raise BackendError("the desktop could not check the path", retryable=True, detail=f"exit {code}: {err[:300]!r}")


def transfer(client: docker.DockerClient, container: Any, request: dict[str, Any], stream: FileStream,
             session_home: str | None = None) -> None:  # fmt: skip
    op, rel = request["op"], request["path"]
    problem = protocol.file_path_problem(rel, allow_empty=op == "list")
    if problem:  # checked by the control plane already; the agent does not trust it
        raise FileError(400, "invalid", problem)
    desktop = Desktop(client, container, session_home)
    if op == "list":
        _list(desktop, rel, stream)
    elif op == "get":
        _get(desktop, rel, stream)
    else:
        _put(desktop, rel, int(request["size"]), stream)


def _list(desktop: Desktop, rel: str, stream: FileStream) -> None:
    fields = resolve(desktop, "list", rel)
    entries = []
    for raw in fields[1:]:
        if not raw:
            continue
        kind, size, mtime, name = raw.split(b"\t", 3)
        entries.append({
            "name": name.decode("utf-8", "replace"),
            "type": _TYPES.get(kind.decode(), "other"),
            "size": int(size),
            "mtime": float(mtime),
        })  # fmt: skip
    truncated = len(entries) > MAX_ENTRIES
    entries = sorted(entries[:MAX_ENTRIES], key=lambda e: (e["type"] != "dir", e["name"].lower()))
    stream.header(ok=True, path=rel, entries=entries, truncated=truncated)


def _get(desktop: Desktop, rel: str, stream: FileStream) -> None:
    fields = resolve(desktop, "get", rel)
    real, size = fields[0].decode("utf-8", "surrogateescape"), int(fields[1])
    try:
        exec_id = desktop.exec_create(["cat", "--", real])
        output = desktop.api.exec_start(exec_id, stream=True, demux=True)
    except _ENGINE_ERRORS as exc:
        raise BackendError("the desktop could not read the file", retryable=True, detail=str(exc)) from None
    stream.header(ok=True, name=rel.rsplit("/", 1)[-1], size=size)
    sent, errors, batch = 0, b"", bytearray()
    try:
        for out, err in output:  # the engine's frames are small (32 KiB): sent on in batches
            if err:
                errors = (errors + err)[-300:]
            if out and sent + len(batch) < size:
                batch += out[: size - sent - len(batch)]
                if len(batch) >= SEND_BATCH:
                    stream.send(bytes(batch))
                    sent += len(batch)
                    batch.clear()
        if batch:
            stream.send(bytes(batch))
            sent += len(batch)
    except _ENGINE_ERRORS as exc:
        raise BackendError("the desktop stopped sending the file", retryable=True, detail=str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            output.close()
    if sent < size:
        detail = f"{sent} of {size} bytes: {errors.decode('utf-8', 'replace')}"
        raise BackendError("the file ended early (changed or unreadable)", retryable=True, detail=detail)


def _put(desktop: Desktop, rel: str, size: int, stream: FileStream) -> None:
    real = resolve(desktop, "put", rel)[0].decode("utf-8", "surrogateescape")
    name = rel.rsplit("/", 1)[-1]
    temp = f"{real}/{TEMP_PREFIX}{secrets.token_hex(8)}"
    stream.header(ok=True, ready=True)
    committed = False
    try:
        _write(desktop, temp, size, stream)
        code, out, err = desktop.exec(["mv", "-f", "-T", "--", temp, f"{real}/{name}"])
        if code != 0:
            raise FileError(400, "invalid", f"could not name the file: {(err or out)[:200].decode('utf-8', 'replace')}")
        committed = True
        stream.header(ok=True, name=name, path=rel, size=size)
    finally:
        if not committed:
            with contextlib.suppress(BackendError):
                desktop.exec(["rm", "-f", "--", temp])


def _write(desktop: Desktop, temp: str, size: int, stream: FileStream) -> None:
    """Feed ``size`` bytes from the tunnel to an exec of ``cat > temp`` (as the user)."""
    try:
        exec_id = desktop.exec_create(["sh", "-c", WRITE, "sh", temp], stdin=True)
        sock = desktop.api.exec_start(exec_id, socket=True)
    except _ENGINE_ERRORS as exc:
        raise BackendError("the desktop could not write the file", retryable=True, detail=str(exc)) from None
    raw = getattr(sock, "_sock", sock)
    try:
        left = size
        try:
            while left:
                chunk = stream.recv(min(left, CHUNK))
                raw.sendall(chunk)
                left -= len(chunk)
            raw.shutdown(socket.SHUT_WR)  # EOF on cat's stdin
            raw.settimeout(60)
            output = b""
            while data := raw.recv(65536):  # until the exec ends (its framed stderr, if any)
                output = (output + data)[-1000:]
        except OSError as exc:
            raise BackendError("the desktop stopped taking the file", retryable=True, detail=str(exc)) from None
        try:
            code = desktop.exit_code(exec_id)
        except _ENGINE_ERRORS as exc:
            raise BackendError("the desktop could not write the file", retryable=True, detail=str(exc)) from None
        if code != 0:
            why = output[8:].decode("utf-8", "replace").strip()[:200]  # past the stream frame's header
            raise FileError(400, "invalid", f"could not write the file: {why or f'exit {code}'}")
    finally:
        with contextlib.suppress(Exception):
            sock.close()
        with contextlib.suppress(Exception):
            raw.close()
