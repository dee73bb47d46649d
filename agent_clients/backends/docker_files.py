"""File transfers in a Docker desktop's home: the engine's archive API, streamed.

Every path is first resolved *inside the container, as the desktop's user* (an exec of
``sh`` with coreutils' ``realpath``), and refused unless the resolved target lies in the
user's home: ``..`` in a name never gets here (``protocol.file_path_problem``), and a
symlink anywhere on the way that points out of the home is refused with 400 before a
byte moves. Then:

* put: ``PUT /containers/<id>/archive?path=<resolved dir>`` with a tar
  stream made on the fly (one member under a temporary name ``.ss-upload-<random>``,
  owned by the desktop's user), fed chunk by chunk from the tunnel; once the engine has
  it all, an exec of ``mv -T`` (as the user, a rename in one folder) gives it its name.
  On any failure or abort the temporary file is removed: nothing half-written ever
  carries the name.
* get: ``GET /containers/<id>/archive?path=<resolved file>``, read as a tar stream
  (``tarfile`` in stream mode), the member's bytes sent on as they come.
* list: an exec of ``find -maxdepth 1 -printf`` (NUL-separated, at most MAX_ENTRIES).

Nothing holds a whole file: the tunnel's pipe holds at most 2 MiB each way.
"""

from __future__ import annotations

import contextlib
import secrets
import tarfile
import time
from typing import Any

import docker
import requests

from agent_clients import protocol
from agent_clients.backends.base import BackendError
from agent_clients.runtime.files import Aborted, FileError, FileStream

CHUNK = 1024 * 1024
MAX_ENTRIES = 1000
DEFAULT_DIRS = ("Uploads", "Downloads")  # made on demand (the desktop image makes them too)

# $1 = mode (list|get|put), $2 = path relative to the home ('' = the home itself).
# Exit 40: refused (400), 44: not found (404); stdout's first line says why.
RESOLVE = r"""
set -u
mode=$1 rel=$2
home=$(realpath -e -- "$HOME" 2>/dev/null) || { echo "the home folder is missing"; exit 44; }
inside() { case "$1/" in "$home"/*) return 0;; esac; return 1; }
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
    real=$(realpath -e -- "$target" 2>/dev/null) || { echo "no such file"; exit 44; }
    inside "$real" && [ "$real" != "$home" ] || { echo "the path leads out of the home folder"; exit 40; }
    [ -f "$real" ] || { echo "not a regular file"; exit 40; }
    [ -r "$real" ] || { echo "the file is not readable"; exit 40; }
    printf '%s\n' "$real"; exit 0
fi
real=$(realpath -e -- "$dir" 2>/dev/null) || { echo "no such folder"; exit 44; }
inside "$real" || { echo "the path leads out of the home folder"; exit 40; }
[ -d "$real" ] || { echo "not a folder"; exit 40; }
if [ "$mode" = list ]; then
    printf '%s\n' "$real"
    find "$real" -mindepth 1 -maxdepth 1 -printf '%y\t%s\t%T@\t%f\0' 2>/dev/null | head -z -n MAX
    exit 0
fi
t="$real/$name"
if [ -L "$t" ]; then
    to=$(realpath -m -- "$t")
    inside "$to" || { echo "the file is a link out of the home folder"; exit 40; }
fi
[ -d "$t" ] && { echo "a folder of that name exists"; exit 40; }
[ -w "$real" ] || { echo "the folder is not writable"; exit 40; }
printf '%s\n%s\n%s\n' "$real" "$(id -u)" "$(id -g)"
""".replace("MAX", str(MAX_ENTRIES + 1))

_TYPES = {"f": "file", "d": "dir", "l": "link"}


def _exec(container: Any, argv: list[str]) -> tuple[int, bytes, bytes]:
    try:
        code, (out, err) = container.exec_run(argv, demux=True)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise BackendError("could not run a command in the desktop", retryable=True, detail=str(exc)) from None
    return code, out or b"", err or b""


def resolve(container: Any, mode: str, rel: str) -> bytes:
    """The script's output for a path that passed; FileError for a refused one."""
    code, out, err = _exec(container, ["sh", "-c", RESOLVE, "sh", mode, rel])
    if code == 0:
        return out
    why = out.decode("utf-8", "replace").split("\n", 1)[0] or err.decode("utf-8", "replace")[:200]
    if code == 40:
        raise FileError(400, "invalid", why)
    if code == 44:
        raise FileError(404, "not_found", why)
    raise BackendError("the desktop could not check the path", retryable=True, detail=f"exit {code}: {err[:300]!r}")


def transfer(client: docker.DockerClient, container: Any, request: dict[str, Any], stream: FileStream) -> None:
    op, rel = request["op"], request["path"]
    problem = protocol.file_path_problem(rel, allow_empty=op == "list")
    if problem:  # checked by the control plane already; the agent does not trust it
        raise FileError(400, "invalid", problem)
    if op == "list":
        _list(container, rel, stream)
    elif op == "get":
        _get(client, container, rel, stream)
    else:
        _put(client, container, rel, int(request["size"]), stream)


def _list(container: Any, rel: str, stream: FileStream) -> None:
    out = resolve(container, "list", rel)
    _, _, rest = out.partition(b"\n")
    entries = []
    for raw in rest.split(b"\0"):
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


class _ChunkReader:
    """A file-like ``read(n)`` over the engine's chunk generator (for tarfile's stream mode)."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.chunks)
            except StopIteration:
                break
        if n < 0:
            n = len(self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _get(client: docker.DockerClient, container: Any, rel: str, stream: FileStream) -> None:
    real = resolve(container, "get", rel).split(b"\n", 1)[0].decode("utf-8", "surrogateescape")
    try:
        chunks, _ = client.api.get_archive(container.id, real, chunk_size=CHUNK)
        with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|") as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise FileError(400, "invalid", "not a regular file")
            source = tar.extractfile(member)
            stream.header(ok=True, name=rel.rsplit("/", 1)[-1], size=member.size)
            while data := source.read(256 * 1024):
                stream.send(data)
    except docker.errors.NotFound:
        raise FileError(404, "not_found", "no such file") from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, tarfile.TarError) as exc:
        raise BackendError("the engine could not read the file", retryable=True, detail=str(exc)) from None


def _put(client: docker.DockerClient, container: Any, rel: str, size: int, stream: FileStream) -> None:
    real_b, uid, gid = resolve(container, "put", rel).split(b"\n")[:3]
    real = real_b.decode("utf-8", "surrogateescape")
    name = rel.rsplit("/", 1)[-1]
    temp = f".ss-upload-{secrets.token_hex(8)}"
    stream.header(ok=True, ready=True)

    def tar_stream():
        info = tarfile.TarInfo(temp)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        info.uid, info.gid = int(uid), int(gid)
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        left = size
        while left:
            chunk = stream.recv(min(left, CHUNK))
            left -= len(chunk)
            yield chunk
        yield b"\0" * ((-size) % 512 + 1024)

    api = client.api
    committed = False
    try:
        try:
            res = api._put(
                api._url("/containers/{0}/archive", container.id),
                params={"path": real},  # the member carries the user's uid and gid
                data=tar_stream(),
            )
            api._raise_for_status(res)
        except Aborted:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            if stream.aborted:
                raise Aborted() from None
            raise BackendError("the engine could not write the file", retryable=True, detail=str(exc)) from None
        code, out, err = _exec(container, ["mv", "-f", "-T", "--", f"{real}/{temp}", f"{real}/{name}"])
        if code != 0:
            raise FileError(400, "invalid", f"could not name the file: {(err or out)[:200].decode('utf-8', 'replace')}")
        committed = True
        stream.header(ok=True, name=name, path=rel, size=size)
    finally:
        if not committed:
            _remove(container, f"{real}/{temp}", again=stream.aborted)


def _remove(container: Any, path: str, *, again: bool) -> None:
    """Remove a temporary file; after an abort once more a moment later (the engine may
    still have been creating it when the connection broke)."""
    for attempt in range(2 if again else 1):
        if attempt:
            time.sleep(1.0)
        with contextlib.suppress(BackendError):
            _exec(container, ["rm", "-f", "--", path])
